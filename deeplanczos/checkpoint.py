"""Checkpoints for long runs: save every few steps and on SIGTERM, resume.

The methods (power, Lanczos, density, trace) take ``checkpointer=``, any
object with the three methods of :class:`Checkpointer`; they hand it their
whole state after each step: parameter-shaped arrays (vectors, a Krylov
basis), saved by orbax with their shardings by every process, and small host
state (scalars, the projected matrix, histories, RNG key data), saved as JSON,
which round-trips floats exactly. A run resumed from a checkpoint continues
the same sequence of operations, so it ends bit for bit where an
uninterrupted run would (same mesh, same process count).

Orbax writes a step into a temporary directory and renames it once complete,
so a step half-written when the process died is never listed; a newest step
that fails to load all the same is skipped for the one before it.
"""

import os
import signal

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """Raised after the checkpoint that a SIGTERM asked for is written."""

  def __init__(self, step):
    super().__init__(f"stopped by SIGTERM after saving step {step}")
    self.step = step


class Checkpointer:
  """Orbax-backed checkpoints of a method's state in ``directory``.

  Args:
    directory: where steps are written (created if missing).
    every: save after every ``every``-th step (0: only on SIGTERM).
    max_to_keep: how many complete steps to keep (at least 2, so a damaged
      newest one has a predecessor).
  """

  def __init__(self, directory: str, every: int = 1, max_to_keep: int = 2):
    self.every = every
    self._sigterm = False
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(2, max_to_keep), create=True,
            enable_async_checkpointing=False))

  def listen_for_sigterm(self):
    """Makes SIGTERM (a TPU VM's preemption notice) save, then stop."""
    def handler(signum, frame):
      del signum, frame
      self._sigterm = True
    signal.signal(signal.SIGTERM, handler)

  def preempted(self) -> bool:
    """Whether any process has received SIGTERM (all processes agree)."""
    flag = self._sigterm
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag

  def save(self, step: int, arrays, meta: dict):
    """Saves ``step`` when due or preempted; raises Preempted if preempted."""
    preempted = self.preempted()
    if preempted or (self.every and step % self.every == 0):
      items = {"meta": ocp.args.JsonSave(meta)}
      if arrays:
        items["arrays"] = ocp.args.StandardSave(arrays)
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
      self._manager.wait_until_finished()
    if preempted:
      raise Preempted(step)

  def restore(self, like):
    """The newest loadable ``(arrays, meta)``, or None to start afresh.

    Args:
      like: arrays shaped and sharded like the saved ones (the fresh state);
        empty when the state is host values alone.
    """
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        like)
    items = {"meta": ocp.args.JsonRestore()}
    if target:
      items["arrays"] = ocp.args.StandardRestore(target)
    self._manager.reload()
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint step %d cannot be loaded (%s: %s); "
                        "trying an older one.", step, type(e).__name__, e)
        continue
      logging.info("Resuming from checkpoint step %d.", step)
      return out.get("arrays") if target else {}, out["meta"]
    return None

  def close(self):
    self._manager.close()
