r"""Every benchmark in one run on one machine, written to BENCHMARKS.md.

Runs each benchmark module as its own process (some set XLA flags or float64
before jax starts), in this order, and gathers their tables with the machine
and package versions:

  hvp_cost           full-data HVP: library matvec against the bare HVP
  pyhessian_compare  per iteration, compile and warm call against PyHessian
  scaling            seconds per iteration against parameters and data
  lanczos            HVPs to converge: Lanczos, scipy eigsh, power + deflation
  peers              top-5 and top-20 eigenpairs against every peer
  lanczos_steps      where a Lanczos step's time goes (pass, eigh, the rest)
  first_call         each method's first call: compile beyond the operator's
  memory             per-device memory on meshes of 8 fake devices
  processes          time per iteration with 1 and 2 processes on 127.0.0.1
  large_model        a 63M-parameter Transformer, FSDP on 8 fake devices
  scale_compile      1B, 7B, 70B on TPU slices, by the TPU compiler (libtpu)
  tpu_basis          the Krylov basis's products on a TPU chip, by its compiler
  precision          bfloat16 against float32: top-3 eigenvalues
  probes             SLQ, Hutchinson, Hutch++ probes batched against one at a time

  python -m benchmarks.report        (needs the bench and tpu extras)
  python -m benchmarks.report --reuse large_model   (keeps that part's table)
  python -m benchmarks.report --accelerator   (on a GPU: the parts in
                                               ACCELERATOR_PARTS)
  python -m benchmarks.report --accelerator peers first_call   (those alone)

Writes BENCHMARKS.md at the repository root; each table also stays in
benchmarks/results/. With --accelerator it runs the parts that mean
something on one accelerator (or those named), each within its time limit
(TIMEOUTS), going on past a part that fails, and writes their tables to
benchmarks/results/gpu/ (no BENCHMARKS.md); a later run on the CPU adds them
to BENCHMARKS.md as their own section. On an H200 the parts took 27-52 s
each, peers (PyHessian's top 20) more than 150 s and first_call 224 s:
about 11 minutes in all, so split them over two calls where one is limited
to 10.
"""

import datetime
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import time

from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ("hvp_cost", "pyhessian_compare", "scaling", "lanczos", "peers",
         "lanczos_steps", "first_call", "memory", "processes", "large_model",
         "scale_compile", "tpu_basis", "precision", "probes")
ACCELERATOR_PARTS = ("hvp_cost", "peers", "lanczos_steps", "lanczos",
                     "probes", "pyhessian_compare", "large_model",
                     "first_call")
TIMEOUTS = {"peers": 300, "first_call": 300}  # seconds; others 150
RESULT = {"pyhessian_compare": "pyhessian"}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
            "numpy", "scipy", "torch", "pyhessian", "matfree",
            "curvlinops-for-pytorch", "hessian-eigenthings", "libtpu")


def version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def accelerator(parts):
  """Runs ``parts`` (by default ACCELERATOR_PARTS) here, on an accelerator,
  each within its limit."""
  unknown = set(parts) - set(ACCELERATOR_PARTS)
  if unknown:
    raise SystemExit(f"--accelerator takes parts of {ACCELERATOR_PARTS}; "
                     f"got {sorted(unknown)}.")
  for part in parts or ACCELERATOR_PARTS:
    start, limit = time.perf_counter(), TIMEOUTS.get(part, 150)
    try:
      done = subprocess.run([sys.executable, "-m", f"benchmarks.{part}"],
                            cwd=ROOT, timeout=limit, check=False).returncode
    except subprocess.TimeoutExpired:
      done = f"stopped after {limit} s"
    print(f"{part}: {done} in {time.perf_counter() - start:.0f} s", flush=True)


def gpu_section():
  """BENCHMARKS.md's section for the tables in results/gpu, if any."""
  folder = common.RESULTS / "gpu"
  tables = [folder / f"{RESULT.get(p, p)}.md" for p in ACCELERATOR_PARTS]
  tables = [t for t in tables if t.exists()]
  if not tables:
    return []
  about = folder / "about.md"  # what the run's session noted, if anything
  return ["# On a GPU", "",
          "Measured by `python -m benchmarks.report --accelerator` on a GPU "
          "lent to a session (each table names its machine and jax); the "
          "same scripts as above, the torch peers on cuda.", "",
          *([about.read_text()] if about.exists() else [])] + [
              "#" + t.read_text() for t in tables]


def main():
  if "--accelerator" in sys.argv:
    accelerator(sys.argv[sys.argv.index("--accelerator") + 1:])
    return
  reuse = sys.argv[sys.argv.index("--reuse") + 1:] if "--reuse" in sys.argv else []
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  sections = []
  for part in PARTS:
    if part not in reuse:
      subprocess.run([sys.executable, "-m", f"benchmarks.{part}"], cwd=ROOT,
                     env=env, check=True, stdout=subprocess.DEVNULL)
    text = (common.RESULTS / f"{RESULT.get(part, part)}.md").read_text()
    sections.append("#" + text)  # each part's title one level down
  cpu = platform.processor() or platform.machine()
  header = [
      "# deeplanczos benchmarks",
      "",
      (f"Measured {datetime.date.today()} in one run of "
       "`python -m benchmarks.report`" if not reuse else
       f"Assembled {datetime.date.today()} by `python -m benchmarks.report "
       "--reuse ...` from the tables in benchmarks/results/ ("
       + (", ".join(p for p in PARTS if p not in reuse) or "no part")
       + " measured in this run; " + ", ".join(reuse)
       + " kept from earlier report runs on this kind of machine)")
      + ", all on one machine: "
      f"{os.cpu_count()} CPU cores ({cpu}), no accelerator; Python "
      f"{platform.python_version()}; "
      + ", ".join(f"{p} {version(p)}" for p in PACKAGES) + ".",
      "",
      "The GPU's tables (benchmarks/results/gpu/, if a session had one) "
      "follow the CPU's, in their own section.",
      "",
  ]
  (ROOT / "BENCHMARKS.md").write_text("\n".join(header) + "\n" +
                                      "\n".join(sections + gpu_section()))
  print((ROOT / "BENCHMARKS.md").read_text())


if __name__ == "__main__":
  main()
