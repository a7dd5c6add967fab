r"""Seconds per power iteration with 1 and 2 processes on 127.0.0.1.

The launcher runs configs/mlp_digits.py (global batch 256) as one process with
one CPU device, then as two processes of one device each joined by
jax.distributed with gloo collectives; each writes seconds per HVP (one
power iteration) into result.json, and the eigenvalues must agree.

  python -m benchmarks.processes

Writes benchmarks/results/processes.md.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(workdir, num_processes):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(num_processes):
    extra = ([f"--coordinator_address=127.0.0.1:{port}",
              f"--num_processes={num_processes}", f"--process_id={i}"]
             if num_processes > 1 else [])
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "launch.main", "--config=configs/mlp_digits.py",
         f"--workdir={workdir}", "--config.show_pbar=False",
         "--config.checkpoint_every=0", *extra], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
  for p in procs:
    assert p.wait(timeout=600) == 0
  return json.loads((pathlib.Path(workdir) / "result.json").read_text())


def main():
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in (1, 2):
      r = run(os.path.join(tmp, str(n)), n)
      rows.append([n, r["mesh"]["data"], f"{r['timings']['seconds_per_hvp']:.3f}",
                   f"{r['eigenvalue']:.6f}"])
  common.write(
      "processes", "Power iteration time by process count (127.0.0.1)",
      "configs/mlp_digits.py: 1797 digits, global batch 256, 30 iterations; "
      "one CPU device per process. Seconds per iteration include the first "
      "(compiling) one and, with 2 processes, the gloo all-reduce of each "
      "batch's HVP.\n\n" + common.table(
          ["processes", "devices on data axis", "s per iteration",
           "eigenvalue"], rows))


if __name__ == "__main__":
  main()
