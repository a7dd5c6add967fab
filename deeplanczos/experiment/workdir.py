"""The workdir: created and checked, locked against a second run, and the
fingerprint that ties its checkpoints to one config, model and mesh."""

import os
import socket

import jax

from deeplanczos.experiment.config import ConfigError

LOCK = ".lock"
# Keys that change how a run looks, not what it computes.
COSMETIC = ("show_pbar", "checkpoint_every")


def make(workdir: str, lead: bool):
  """Creates the workdir (process 0), or says why it cannot be written."""
  if not lead:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".deeplanczos_write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"Cannot write to --workdir={workdir}: {e}") from e


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """``workdir/.lock`` for the length of a run (process 0 only).

  A second run on the same workdir is refused while the first one lives; a
  lock left by a run that was killed (its process gone on this host) is
  taken over.
  """

  def __init__(self, workdir: str, lead: bool):
    self.path = os.path.join(workdir, LOCK)
    self.lead = lead
    self.me = f"{socket.gethostname()} {os.getpid()}"

  def __enter__(self):
    if not self.lead:
      return self
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        self._check_stale()
        continue
      with os.fdopen(fd, "w") as f:
        f.write(self.me)
      return self

  def _check_stale(self):
    try:
      with open(self.path) as f:
        host, pid = f.read().split()
    except (OSError, ValueError):
      host, pid = socket.gethostname(), "-1"  # half-written: stale
    if host == socket.gethostname() and not _alive(int(pid)):
      os.remove(self.path)  # its run was killed; take over
      return
    raise ConfigError(
        f"Another run (process {pid} on {host}) is using this workdir "
        f"({self.path} exists). Wait for it, or use another workdir; if that "
        "run is gone, delete the lock file.")

  def __exit__(self, *exc):
    if self.lead and os.path.exists(self.path):
      os.remove(self.path)


def fingerprint(config, op, mesh) -> dict:
  """What must not change between a run and its resumption."""
  parameters = jax.tree_util.tree_map_with_path(
      lambda p, x: f"{jax.tree_util.keystr(p)}: {x.shape} {x.dtype}",
      op.params)
  return {
      "config": {k: v for k, v in config.to_dict().items()
                 if k not in COSMETIC},
      "parameters": jax.tree.leaves(parameters),
      "mesh": {str(k): int(v) for k, v in dict(mesh.shape).items()},
      "processes": jax.process_count(),
  }
