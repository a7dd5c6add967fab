r"""bfloat16 against float32: top-3 Hessian eigenvalues of the digits MLP.

The MLP (features (32, 32), 3,466 parameters) at its initialization, on all
1797 digits in batches of 256; the same weights rounded to bfloat16 (its
products in bfloat16 with float32 sums, a float32 Krylov basis); and those
rounded weights in float32, which separates the rounding of the weights
(another Hessian) from the arithmetic. Lanczos
top-3 (tol 1e-6 in float32, 1e-2 in bfloat16: the products' precision) and
30 power iterations, on one device and on 8 fake devices with FSDP (data 4 x
model 2, the split layout).

  python -m benchmarks.precision

Writes benchmarks/results/precision.md.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import models  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  x, y = data.load_digits()
  model = models.MLP((32, 32))
  params32 = model.init(jax.random.key(0), x[:1])

  def loss(p, xb, yb):
    logits = model.apply(p, xb).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(y), 256)]
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  rows, found = [], {}
  rounded = jax.tree.map(
      lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params32)
  for name, params, tol in (
      ("float32", params32, 1e-6),
      ("bfloat16 weights in float32", rounded, 1e-6),
      ("bfloat16", jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32),
       1e-2)):
    for where, kw in (("1 device", {}), ("8 devices, FSDP", {
        "shardings": deeplanczos.infer_sharding(
            params, mesh, fsdp_axis="data", min_size=64)})):
      op = deeplanczos.HessianOperator(loss, params, batches, **kw)
      r = deeplanczos.lanczos(op, 3, tol=tol, key=jax.random.key(1),
                              show_pbar=False)
      power = deeplanczos.power_iteration(op, num_iterations=30,
                                          key=jax.random.key(1),
                                          show_pbar=False)
      found[(name, where)] = r.eigenvalues
      ref = found[("float32", "1 device")]
      rel = np.abs(r.eigenvalues - ref) / np.abs(ref)
      rows.append(f"| {name} | {where} | "
                  f"{op.kernel.accumulate} | "
                  + ", ".join(f"{e:.5f}" for e in r.eigenvalues)
                  + f" | {', '.join(f'{d:.2e}' for d in rel)} | "
                  f"{r.num_hvps} | {r.converged} | {power.eigenvalue:.5f} |")
  table = "\n".join([
      "| parameters | devices | layout | Lanczos top-3 | relative "
      "difference to float32 | HVPs | converged | power (30 it.) |",
      "|---|---|---|---|---|---|---|---|", *rows])
  common.write("precision", "bfloat16 against float32 (digits MLP)",
               __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
  main()
