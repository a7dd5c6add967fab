r"""Per-device memory of parameters, vectors and a Krylov basis, by mesh.

On 8 fake CPU devices, the Transformer's parameters and a vector with their
shardings are placed on meshes with model = 1, 2, 4, 8 (data = the rest),
split over the model axis only or also over the data axis (FSDP), and a
21-vector Lanczos basis is made for them; the bytes each device holds are
read from the arrays' addressable shards.

  python -m benchmarks.memory

Writes benchmarks/results/memory.md.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")


import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos._src import basis as basis_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

BASIS = 21


def main():
  model = models.Transformer(vocab_size=512, max_len=64, d_model=256,
                             num_heads=8, num_layers=4, mlp_dim=1024)
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         jnp.zeros((1, 64), jnp.int32))
  shapes = flax.core.meta.unbox(boxed)
  rows, basis_rows = [], []
  total = basis_total = None
  for data, m in ((8, 1), (4, 2), (2, 4), (1, 8)):
    mesh = deeplanczos.make_mesh([("data", data), ("model", m)])
    cells = [f"data={data}, model={m}"]
    for fsdp in (None, "data"):
      shardings = deeplanczos.infer_sharding(shapes, mesh, fsdp_axis=fsdp)
      params = jax.jit(lambda k: flax.core.meta.unbox(model.init(
          k, jnp.zeros((1, 64), jnp.int32))), out_shardings=shardings)(
              jax.random.key(0))
      vector = deeplanczos.InitPowerMethodVector(jax.random.key(1), params)
      if total is None:
        total = sum(a.nbytes for a in jax.tree.leaves((params, vector)))
      held = common.per_device_bytes((params, vector))
      cells += [f"{held / 2**20:.2f}", f"{held / total:.3f}"]
      if fsdp is None:
        basis = basis_lib.zeros(params, BASIS, shardings)
        if basis_total is None:
          basis_total = sum(a.nbytes for a in jax.tree.leaves(basis))
        b = common.per_device_bytes(basis)
        basis_rows.append([cells[0], f"{b / 2**20:.2f}",
                           f"{basis_total / 2**20:.2f}",
                           f"{b / basis_total:.3f}", f"{1 / 8:.3f}",
                           f"{1 / m:.3f}"])
    cells.append(f"{1 / m:.3f}")
    rows.append(cells)
  n = sum(a.size for a in jax.tree.leaves(params))
  header = ["mesh", "per-device MiB (model split)", "/ total",
            "per-device MiB (FSDP + model)", "/ total", "1 / model"]
  basis_header = ["mesh", "per-device basis MiB", "basis total MiB",
                  "per-device / total", "1 / devices",
                  "before (basis replicated over data): 1 / model"]
  common.write(
      "memory", "Per-device memory: parameters, vectors, Krylov basis",
      f"Transformer (4 layers, d_model 256, vocab 512), {n:,} float32 "
      "parameters, default sharding rule (leaves under 1024 elements "
      "replicated), on 8 fake CPU devices. Parameters plus the "
      "power-method vector, split over the model axis only and with FSDP "
      "(`infer_sharding(..., fsdp_axis='data')`: the data axis splits "
      "another dimension):\n\n" + common.table(header, rows) +
      f"\n\nA Lanczos basis of {BASIS} vectors (ncv=20) for the "
      "model-split parameters: stored split over every device whatever "
      "the parameters' layout (until this release it had the parameters' "
      "sharding with a leading axis, so it divided by the model axis "
      "only):\n\n" + common.table(basis_header, basis_rows))


if __name__ == "__main__":
  main()
