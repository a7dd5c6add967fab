"""Checkpoints for long runs: orbax steps of a method's state, and resume.

Every method takes ``checkpointer=``. The driver that runs the methods hands
it the whole state after every ``every``-th step, already split: arrays
(vectors, a Krylov basis), saved by orbax with their shardings by every
process, and small host values (scalars, the projected matrix, histories,
PRNG key data) as JSON, which round-trips floats exactly. A run resumed from a
checkpoint continues the same sequence of operations, so it ends bit for bit
where an uninterrupted run would (same mesh, same process count).

Orbax writes a step into a temporary directory and renames it once complete,
so a step half-written when the process died is never listed; a newest step
that fails to load all the same is skipped for the one before it.
"""

import json
import os

from absl import logging
import jax
import orbax.checkpoint as ocp


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """Raised after the checkpoint that a SIGTERM asked for is written."""

  def __init__(self, step):
    super().__init__(f"stopped by SIGTERM after saving step {step}")
    self.step = step


class Mismatch(ValueError):
  """A checkpoint written by another run: another config, model or mesh."""


def _differences(saved, current, prefix=""):
  """``['key: saved -> current', ...]`` over two nested dicts."""
  out = []
  for key in sorted(set(saved) | set(current), key=str):
    name = f"{prefix}{key}"
    a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: {a!r} -> {b!r}")
  return out


class Checkpointer:
  """Orbax-backed checkpoints of a method's state in ``directory``.

  Args:
    directory: where steps are written (created if missing).
    every: save after every ``every``-th step (0: only on SIGTERM).
    max_to_keep: how many complete steps to keep (at least 2, so a damaged
      newest one has a predecessor).
    handle_sigterm: while a method runs, SIGTERM (a TPU VM's preemption
      notice) saves at the end of the current step and raises
      :class:`Preempted`.
    fingerprint: a JSON-able dict describing the run (its config, parameter
      tree, mesh). It is saved with every step, and a step saved with
      another fingerprint is refused with :class:`Mismatch`, naming what
      changed, instead of being resumed.
  """

  def __init__(self, directory: str, every: int = 1, max_to_keep: int = 2,
               handle_sigterm: bool = False, fingerprint: dict | None = None):
    self.every = every
    self.handle_sigterm = handle_sigterm
    self.fingerprint = json.loads(json.dumps(fingerprint or {}))
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(2, max_to_keep), create=True,
            enable_async_checkpointing=False))

  def save(self, step: int, arrays: dict, meta: dict):
    """Writes ``step``: ``arrays`` (device arrays) and ``meta`` (JSON)."""
    items = {"meta": ocp.args.JsonSave({**meta,
                                        "fingerprint": self.fingerprint})}
    if arrays:
      items["arrays"] = ocp.args.StandardSave(arrays)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()

  def restore(self, like: dict):
    """The newest loadable ``(arrays, meta)``, or None to start afresh.

    Args:
      like: arrays shaped and sharded like the saved ones (the fresh state);
        empty when the state is host values alone.

    Raises:
      Mismatch: the newest readable step was saved with another fingerprint.
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
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint step %d cannot be read (%s: %s); trying "
                        "an older one.", step, type(e).__name__, e)
        continue
      changed = _differences(meta.get("fingerprint", {}), self.fingerprint)
      if changed:
        raise Mismatch(
            f"The checkpoints in {self._manager.directory} were written by "
            "another run; resuming them would mix two computations. What "
            "changed: " + "; ".join(changed) + ". Use another workdir, or "
            "delete the checkpoints to start afresh.")
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint step %d cannot be loaded (%s: %s); "
                        "trying an older one.", step, type(e).__name__, e)
        continue
      logging.info("Resuming from checkpoint step %d.", step)
      meta = dict(out["meta"])
      meta.pop("fingerprint", None)
      return (out.get("arrays") if target else {}), meta
    return None

  def close(self):
    self._manager.close()
