r"""Probes in batched passes against one at a time: SLQ, Hutchinson, Hutch++.

The digits MLP (features (32, 32), 3,466 parameters) at its initialization,
all 1797 digits in 8 batches of 256 kept on the device. Each method runs
with ``probes_per_call=1`` and with all its probes in one batched pass (a
``vmap`` over the probes through the compiled pass); medians of 3 warm runs
after one that compiles. The estimates agree to rounding (the largest
difference is printed). ``probes_per_call='auto'`` would take the count in
the last column: as many as half the free memory holds, by the compiler's
bytes for the batched pass (``deeplanczos.probes_per_call``).

  python -m benchmarks.probes

Writes benchmarks/results/probes.md.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import models  # pylint: disable=g-import-not-at-top,wrong-import-position

RUNS = 3


def main():
  x, y = data.load_digits()
  model = models.MLP((32, 32))
  params = model.init(jax.random.key(0), x[:1])
  loss = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, xb), yb).mean()
  batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(y), 256)]
  op = deeplanczos.HessianOperator(loss, params, batches)
  cases = [
      ("SLQ density, 16 probes x 40 steps", 16, {"basis_vectors": 41},
       lambda n: deeplanczos.spectral_density(
           op, num_probes=16, num_steps=40, probes_per_call=n,
           key=jax.random.key(3), show_pbar=False),
       lambda r: r.nodes),
      ("Hutchinson, 64 probes", 64, {"vectors": 2},
       lambda n: deeplanczos.hutchinson(op, num_probes=64, probes_per_call=n,
                                        show_pbar=False),
       lambda r: r.samples),
      ("Hutch++, 96 products", 32, {"vectors": 2},
       lambda n: deeplanczos.hutchpp(op, num_hvps=96, probes_per_call=n,
                                     show_pbar=False),
       lambda r: r.samples),
  ]
  rows = []
  for name, batched, state, run, values in cases:
    seconds, results = {}, {}
    for n in (1, batched):
      run(n)  # compiles
      times = []
      for _ in range(RUNS):
        start = time.perf_counter()
        results[n] = run(n)
        times.append(time.perf_counter() - start)
      seconds[n] = float(np.median(times))
    diff = np.nanmax(np.abs(np.asarray(values(results[1])) -
                            np.asarray(values(results[batched]))))
    rows.append(f"| {name} | {results[1].num_hvps} | {seconds[1]:.3f} | "
                f"{batched} | {seconds[batched]:.3f} | "
                f"{seconds[1] / seconds[batched]:.2f}x | {diff:.1e} | "
                f"{deeplanczos.probes_per_call(op, batched, **state)} |")
  table = "\n".join([
      "| method | HVPs | one probe at a time, s | probes per call | batched, "
      "s | speed-up | largest difference | 'auto' picks |",
      "|---|---|---|---|---|---|---|---|",
      *rows])
  common.write("probes", "Probes in batched passes (digits MLP)",
               __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
  main()
