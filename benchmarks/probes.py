r"""Probes three ways: SLQ, Hutchinson, Hutch++ on the digits MLP.

The digits MLP (features (32, 32), 3,466 parameters) at its initialization,
all 1797 digits in 8 batches of 256 kept on the device. Each method runs
one probe at a time with a program per product (on an operator whose
``op.matvec`` has compiled the pass, where the methods keep to it), one
at a time in compiled blocks of products (the default on a fresh
operator of its own, ``driver.loops_pay``), and with all its probes in
one batched
pass (``probes_per_call``: a ``vmap`` over the probes through the compiled
pass); medians of 3 warm runs after one that compiles. The last ratio
divides the compiled blocks' time by the products at the bare compiled
HVP's speed (one jitted whole-data pass, median of 50). The estimates
agree to rounding (the largest difference between the three is printed).
``probes_per_call='auto'`` would take the count in the last column: as
many as half the free memory holds, by the compiler's bytes for the
batched pass (``deeplanczos.probes_per_call``).

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
  stepped = deeplanczos.HessianOperator(loss, params, batches)
  v = stepped.random_vector(jax.random.key(0))
  stepped.matvec(v)  # the pass compiled: methods keep to it
  pass_fn, on_device = stepped.pass_program()
  bare = common.median_seconds(
      jax.jit(lambda v: pass_fn(stepped.params, v, on_device)[0]), v,
      repeats=50)
  cases = [
      ("SLQ density, 16 probes x 40 steps", 16, {"basis_vectors": 41},
       lambda o, n: deeplanczos.spectral_density(
           o, num_probes=16, num_steps=40, probes_per_call=n,
           key=jax.random.key(3), show_pbar=False),
       lambda r: r.nodes),
      ("Hutchinson, 64 probes", 64, {"vectors": 2},
       lambda o, n: deeplanczos.hutchinson(o, num_probes=64,
                                           probes_per_call=n,
                                           show_pbar=False),
       lambda r: r.samples),
      ("Hutch++, 96 products", 32, {"vectors": 2},
       lambda o, n: deeplanczos.hutchpp(o, num_hvps=96, probes_per_call=n,
                                        show_pbar=False),
       lambda r: r.samples),
  ]
  rows = []
  for name, batched, state, run, values in cases:
    # A fresh operator a method: its loop runs only where no other program
    # holding the pass has (driver.loops_pay).
    op = deeplanczos.HessianOperator(loss, params, batches)
    seconds, results = {}, {}
    for way, (o, n) in {"program": (stepped, 1), "loop": (op, 1),
                        "batched": (op, batched)}.items():
      run(o, n)  # compiles
      times = []
      for _ in range(RUNS):
        start = time.perf_counter()
        results[way] = run(o, n)
        times.append(time.perf_counter() - start)
      seconds[way] = float(np.median(times))
    diff = max(np.nanmax(np.abs(np.asarray(values(results["program"])) -
                                np.asarray(values(r))))
               for r in results.values())
    hvps = results["loop"].num_hvps
    rows.append(
        f"| {name} | {hvps} | {seconds['program']:.3f} | "
        f"{seconds['loop']:.3f} | "
        f"{seconds['program'] / seconds['loop']:.2f}x | {batched} | "
        f"{seconds['batched']:.3f} | "
        f"{seconds['program'] / seconds['batched']:.2f}x | "
        f"{seconds['loop'] / (hvps * bare):.2f} | {diff:.1e} | "
        f"{deeplanczos.probes_per_call(op, batched, **state)} |")
  table = "\n".join([
      f"The bare compiled HVP: {bare * 1e3:.3f} ms.",
      "",
      "| method | HVPs | a program per product, s | compiled blocks, s | "
      "speed-up | probes per call | batched, s | speed-up | blocks / (HVPs "
      "x bare HVP) | largest difference | 'auto' picks |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
      *rows])
  common.write("probes", "Probes three ways (digits MLP)",
               __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
  main()
