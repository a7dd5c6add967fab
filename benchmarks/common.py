"""Shared by the benchmarks: timing, tables, machine facts."""

import os
import pathlib
import platform
import statistics
import time

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def results() -> pathlib.Path:
  """Where this machine's tables go: results/, or results/gpu (results/tpu)
  when JAX runs on an accelerator."""
  backend = jax.default_backend()
  return RESULTS if backend == "cpu" else RESULTS / backend


def torch_device() -> str:
  """'cuda' where JAX runs on a GPU and torch sees one, else 'cpu': the
  torch peers run on the device JAX's numbers come from."""
  import torch  # pylint: disable=g-import-not-at-top
  return ("cuda" if jax.default_backend() == "gpu"
          and torch.cuda.is_available() else "cpu")


def median_seconds(fn, *args, repeats=20, warmup=2):
  """Median wall time of ``fn(*args)`` after compilation, blocking on output."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def per_device_bytes(tree) -> int:
  """The most bytes of ``tree``'s arrays that any one device holds."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values())


def machine() -> str:
  d = jax.devices()[0]
  return (f"{d.platform} ({d.device_kind}), {jax.device_count()} devices, "
          f"{os.cpu_count()} CPU cores, {platform.python_version()}, "
          f"jax {jax.__version__}")


def table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def write(name: str, title: str, body: str):
  """Prints ``body`` and writes it, with the machine, to NAME.md in
  :func:`results`."""
  text = f"# {title}\n\nMachine: {machine()}\n\n{body}\n"
  print(text)
  results().mkdir(parents=True, exist_ok=True)
  (results() / f"{name}.md").write_text(text)
