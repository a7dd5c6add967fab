r"""Seconds per power iteration against parameter count and dataset size.

An MLP on the digits inputs with two hidden layers of width w has
w^2 + 76 w + 10 parameters; widths 68, 280, 963 and 3125 give about 1e4, 1e5,
1e6 and 1e7. Over the 1797 digits in batches of 256, with the data on the
device, a power iteration costs one full-data HVP, so its time should grow
with the parameter count once the model is large enough to fill the cores.
Against dataset size: the digits MLP 64-64 over the digits tiled 1, 4, 16 and
64 times (1797 to 115,008 examples); the time should grow linearly.

  python -m benchmarks.scaling

Writes benchmarks/results/scaling.md.
"""

import flax
import jax
import numpy as np
import optax

from benchmarks import common
import deeplanczos
from deeplanczos import data
from deeplanczos import models

ITERATIONS = 4


def seconds_per_iteration(width, x, y):
  model = models.MLP((width, width))
  params = flax.core.meta.unbox(model.init(jax.random.key(0), x[:1]))

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean()

  batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(y), 256)]
  _, hist = deeplanczos.PowerMethodIterate(loss, params, batches, ITERATIONS,
                                           show_pbar=False)
  n = sum(a.size for a in jax.tree.leaves(params))
  return n, float(np.median(hist["seconds"][1:])), float(hist["seconds"][0])


def main():
  x, y = data.load_digits()
  rows = []
  for width in (68, 280, 963, 3125):
    n, s, first = seconds_per_iteration(width, x, y)
    rows.append([f"{width}", f"{n:,}", f"{s:.4f}", f"{s / n * 1e9:.1f}",
                 f"{first:.2f}"])
  by_params = common.table(
      ["width", "parameters", "s per iteration", "ns per parameter",
       "first iteration s (with compile)"], rows)
  rows = []
  for tiles in (1, 4, 16, 64):
    xs, ys = np.tile(x, (tiles, 1, 1, 1)), np.tile(y, tiles)
    _, s, _ = seconds_per_iteration(64, xs, ys)
    rows.append([f"{len(ys):,}", f"{-(-len(ys) // 256)}", f"{s:.4f}",
                 f"{s / len(ys) * 1e6:.2f}"])
  by_data = common.table(
      ["examples", "batches", "s per iteration", "us per example"], rows)
  common.write(
      "scaling", "Seconds per power iteration: parameters and data",
      "Against parameter count (MLP 64-w-w-10, 1797 digits in batches of "
      "256, data on the device):\n\n" + by_params +
      "\n\nAgainst dataset size (MLP 64-64-10, digits tiled, batches of "
      "256):\n\n" + by_data +
      f"\n\nMedians over iterations 2 to {ITERATIONS} of one "
      "PowerMethodIterate call.")


if __name__ == "__main__":
  main()
