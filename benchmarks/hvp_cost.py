r"""Cost of one Hessian-vector product against one gradient, same batch.

Forward-over-reverse (``jax.jvp`` of ``jax.grad``) should cost about 2 to 2.5
gradients. Also times deeplanczos' one-batch ``matvec`` to show its overhead over the
bare HVP.

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


def measure(name, model, x, y):
  params = flax.core.meta.unbox(model.init(jax.random.key(0), x[:1]))

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean()

  grad = jax.jit(jax.grad(loss))
  hvp = jax.jit(lambda p, v, xb, yb: jax.jvp(
      lambda q: jax.grad(loss)(q, xb, yb), (p,), (v,))[1])
  op = deeplanczos.HessianOperator(loss, params, [(x, y)])
  v = op.random_vector(jax.random.key(1))

  t_grad = common.median_seconds(grad, params, x, y)
  t_hvp = common.median_seconds(hvp, params, v, x, y)
  t_step = common.median_seconds(op.matvec, v)
  n = sum(a.size for a in jax.tree.leaves(params))
  return [name, f"{n:,}", len(y), f"{t_grad * 1e3:.2f}", f"{t_hvp * 1e3:.2f}",
          f"{t_hvp / t_grad:.2f}", f"{t_step * 1e3:.2f}",
          f"{t_step / t_grad:.2f}"]


def main():
  x, y = data.load_digits()
  x, y = x[:256], y[:256]
  tokens, targets = data.synthetic_tokens(256, 16, 32)
  transformer = models.Transformer(vocab_size=32, max_len=16, d_model=64,
                                   num_heads=4, num_layers=2, mlp_dim=128)
  rows = [measure("MLP 64-64", models.MLP((64, 64)), x, y),
          measure("CNN 16-32", models.CNN((16, 32), 64), x, y),
          measure("Transformer 2x64", transformer, tokens, targets)]
  header = ["model", "params", "batch", "grad ms", "HVP ms", "HVP / grad",
            "deeplanczos matvec ms", "matvec / grad"]
  common.write("hvp_cost", "HVP against gradient cost (batch 256)",
               common.table(header, rows) +
               "\n\nDigits for the MLP and CNN, synthetic 16-token sequences "
               "for the Transformer. Medians of 20 runs after compilation. The matvec is the "
               "library's whole one-batch pass: batch transfer, the sharded "
               "step (shard_map, psum, accumulation), the read-back of its "
               "statistics and the division by the example count.")


if __name__ == "__main__":
  main()
