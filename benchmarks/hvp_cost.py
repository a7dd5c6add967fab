r"""Cost of a full-data Hessian-vector product: the library against the bare HVP.

For each model, over a whole dataset in batches: one gradient pass, one bare
compiled HVP pass (``jax.jvp`` of ``jax.grad``, jitted per batch, nothing
else), and deeplanczos' ``matvec`` with the data kept on the devices and
streamed. ``matvec / HVP`` is the library's whole pass (placement,
accumulation, the one psum, the read-back) over the bare HVP's: 1.0 is the
physical limit of a library that computes exactly these HVPs, and below 1.0
means the library's pass compiles better than batch-by-batch calls.

  python -m benchmarks.hvp_cost

Writes benchmarks/results/hvp_cost.md.
"""

import flax
import jax
import optax

from benchmarks import common
import deeplanczos
from deeplanczos import data
from deeplanczos import models


def measure(name, model, x, y, batch_size):
  params = flax.core.meta.unbox(model.init(jax.random.key(0), x[:1]))

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean()

  batches = [(x[i:i + batch_size], y[i:i + batch_size])
             for i in range(0, len(y), batch_size)]
  placed = jax.device_put(batches)
  grad = jax.jit(jax.grad(loss))
  hvp = jax.jit(lambda p, v, xb, yb: jax.jvp(
      lambda q: jax.grad(loss)(q, xb, yb), (p,), (v,))[1])
  v = deeplanczos.InitPowerMethodVector(jax.random.key(1), params)
  ops = {mode: deeplanczos.HessianOperator(loss, params, batches,
                                           data_on_device=mode)
         for mode in (True, False)}

  t_grad = common.median_seconds(
      lambda: [grad(params, a, b) for a, b in placed])
  t_hvp = common.median_seconds(
      lambda: [hvp(params, v, a, b) for a, b in placed])
  t_on, t_stream = (common.median_seconds(ops[m].matvec, v)
                    for m in (True, False))
  n = sum(a.size for a in jax.tree.leaves(params))
  return [name, f"{n:,}", f"{len(y)} / {len(batches)}",
          f"{t_grad * 1e3:.2f}", f"{t_hvp * 1e3:.2f}",
          f"{t_hvp / t_grad:.2f}", f"{t_on * 1e3:.2f}",
          f"{t_on / t_hvp:.2f}", f"{t_stream * 1e3:.2f}",
          f"{t_stream / t_hvp:.2f}"]


def main():
  x, y = data.load_digits()
  tokens, targets = data.synthetic_tokens(1024, 16, 32)
  transformer = models.Transformer(vocab_size=32, max_len=16, d_model=64,
                                   num_heads=4, num_layers=2, mlp_dim=128)
  rows = [measure("MLP 64-64", models.MLP((64, 64)), x, y, 256),
          measure("CNN 16-32", models.CNN((16, 32), 64), x, y, 256),
          measure("Transformer 2x64", transformer, tokens, targets, 128)]
  header = ["model", "params", "examples / batches", "grad pass ms",
            "HVP pass ms", "HVP / grad", "matvec ms (on device)",
            "matvec / HVP (on device)", "matvec ms (streamed)",
            "matvec / HVP (streamed)"]
  common.write(
      "hvp_cost", "A full-data HVP: the library's matvec against the bare HVP",
      common.table(header, rows) +
      "\n\nDigits (batches of 256) for the MLP and CNN, 1024 synthetic "
      "16-token sequences (batches of 128) for the Transformer. Medians of 20 "
      "passes after compilation. The grad and HVP passes call a jitted "
      "per-batch function on batches already on the device, nothing else. "
      "The matvec is the library's whole pass: on device, the batches "
      "stacked once and a pass compiled as one program (on CPU, unrolled "
      "scans of at most 8 batches); streamed, each batch parsed, padded, "
      "transferred (the next while the current one computes) and added to "
      "per-device accumulators, reduced once at the end.")


if __name__ == "__main__":
  main()
