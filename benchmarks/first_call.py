r"""First calls: what each method compiles beyond the operator's own pass.

The digits ReLU MLP of benchmarks/peers.py (features (32, 32), 3,466
parameters; its initial weights: compile times do not depend on them),
float32, 1797 examples in batches of 256, the data on the device.
Each measurement runs in a fresh process, so nothing is compiled before
it (JAX's persistent compilation cache off): the operator's first product
(``op.matvec`` of a numpy vector: the pass's trace and compile, the data's
placement) and each method's first call on a fresh operator at its
defaults (Lanczos top 5; density 8 probes of 64 steps; Hutchinson 30
probes; Hutch++ 30 products; power 20 iterations), then its second call
on the same operator (nothing compiles). "Beyond" is the method's first
call less the operator's first product: what the method's own programs
cost to trace and compile. Medians of 3 processes.

  python -m benchmarks.first_call

Writes benchmarks/results/first_call.md.
"""

import json
import statistics
import subprocess
import sys
import time

REPEATS = 3

CASES = {
    "operator: op.matvec": "op.matvec(ones)",
    "lanczos (k=5, default: compiled blocks)":
        "deeplanczos.lanczos(op, 5, show_pbar=False)",
    "lanczos (k=5, a step at a time)":
        "deeplanczos.lanczos(op, 5, show_pbar=False, steps_per_call=None)",
    "spectral_density": "deeplanczos.spectral_density(op, show_pbar=False)",
    "hutchinson": "deeplanczos.hutchinson(op, show_pbar=False)",
    "hutchpp": "deeplanczos.hutchpp(op, num_hvps=30, show_pbar=False)",
    "power_iteration": ("deeplanczos.power_iteration(op, num_iterations=20, "
                        "show_pbar=False)"),
}


def one(case: str):
  """Runs ``case`` twice on a fresh operator in this process; prints JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import deeplanczos  # pylint: disable=g-import-not-at-top
  from deeplanczos import data as data_lib  # pylint: disable=g-import-not-at-top
  from deeplanczos import models  # pylint: disable=g-import-not-at-top

  x, y = data_lib.load_digits()
  model = models.MLP((32, 32))
  params = model.init(jax.random.key(0), x[:1])

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean()

  batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(y), 256)]
  op = deeplanczos.HessianOperator(loss, params, batches)
  ones = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), params)
  code = compile(CASES[case], case, "eval")
  env = {"op": op, "ones": ones, "deeplanczos": deeplanczos}
  seconds = []
  for _ in range(2):
    start = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(eval(code, env)))  # pylint: disable=eval-used
    seconds.append(time.perf_counter() - start)
  print(json.dumps({"case": case, "seconds": seconds, "parameters": sum(
      np.size(a) for a in jax.tree.leaves(params))}))


def measure(case: str):
  out = subprocess.run([sys.executable, "-m", "benchmarks.first_call",
                        "--case", case], check=True, capture_output=True,
                       text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  runs = {case: [measure(case) for _ in range(REPEATS)] for case in CASES}
  first = {c: statistics.median(r["seconds"][0] for r in rs)
           for c, rs in runs.items()}
  second = {c: statistics.median(r["seconds"][1] for r in rs)
            for c, rs in runs.items()}
  base = first["operator: op.matvec"]
  rows = []
  for case in CASES:
    spread = [r["seconds"][0] for r in runs[case]]
    rows.append([case, f"{first[case]:.2f} ({min(spread):.2f}-"
                 f"{max(spread):.2f})", f"{second[case]:.3f}",
                 "" if case.startswith("operator") else
                 f"{first[case] - base:.2f}"])
  n = runs["operator: op.matvec"][0]["parameters"]
  body = (__doc__.split("\n\n", 1)[1].split("  python -m")[0].strip()
          + f"\n\n{n:,} parameters.\n\n" + common.table(
              ["call", "first call s (range)", "second call s",
               "beyond the operator's first product s"], rows))
  common.write("first_call", "First calls: compile beyond the operator's",
               body)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--case":
    one(sys.argv[2])
  else:
    main()
