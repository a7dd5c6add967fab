"""The workdir: created and checked, locked against a second run, and the
fingerprint that ties its checkpoints to one config, model and mesh."""

import fcntl
import os
import socket

import jax
import jax.numpy as jnp
import numpy as np

from deeplanczos._src import sharding as sharding_lib
from deeplanczos.experiment.config import ConfigError

LOCK = ".lock"
# Keys that change how a run looks, not what it computes.
COSMETIC = ("show_pbar", "checkpoint_every", "follow_every", "follow_until",
            "follow_timeout", "follow_poll", "follow_marker",
            "follow_learning_rate")


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


class Lock:
  """``workdir/.lock`` for the length of a run (process 0 only).

  Held with ``flock`` on the open file, so it is taken atomically and dies
  with its process: a run killed by SIGKILL leaves a file that the next run
  takes over, and of several runs started at once exactly one gets it. The
  file names its holder (host and process) for the message a refused run
  prints; a lock is only removed by the run that holds it.
  """

  def __init__(self, workdir: str, lead: bool):
    self.path = os.path.join(workdir, LOCK)
    self.lead = lead
    self.me = f"{socket.gethostname()} {os.getpid()}"
    self._fd = None

  def __enter__(self):
    if not self.lead:
      return self
    while True:
      fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").split()
        os.close(fd)
        host, pid = (holder + ["?", "?"])[:2]
        raise ConfigError(
            f"Another run (process {pid} on {host}) is using this workdir "
            f"({self.path} is locked). Wait for it, or use another "
            "workdir.") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:  # not a file its last holder removed while we opened it
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, self.me.encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is None:
      return
    try:
      if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
        os.remove(self.path)  # still ours: nobody else can hold it now
    except FileNotFoundError:
      pass
    os.close(self._fd)  # releases the flock
    self._fd = None


def fingerprint(config, params, mesh) -> dict:
  """What must not change between a run and its resumption.

  ``params``: the task's parameters (boxed or not, trained or not: only
  their tree, shapes and dtypes count), so a workdir is checked before
  training.
  """
  parameters = jax.tree_util.tree_map_with_path(
      lambda p, x: f"{jax.tree_util.keystr(p)}: {np.shape(x)} "
      f"{jnp.result_type(x)}", sharding_lib.unbox(params))
  return {
      "config": {k: v for k, v in config.to_dict().items()
                 if k not in COSMETIC},
      "parameters": jax.tree.leaves(parameters),
      "mesh": {str(k): int(v) for k, v in dict(mesh.shape).items()},
      "processes": jax.process_count(),
  }
