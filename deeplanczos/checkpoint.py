"""Checkpoints for long runs: orbax steps of a method's state, and resume.

Every method takes ``checkpointer=``. The driver that runs the methods hands
it the whole state after every ``every``-th step, already split: arrays
(vectors, a Krylov basis), saved by orbax with their shardings by every
process, and small host values (scalars, the projected matrix, histories,
PRNG key data) as JSON, which round-trips floats exactly. A run resumed from a
checkpoint continues the same sequence of operations, so it ends bit for bit
where an uninterrupted run would (same mesh, same process count).

Orbax writes a step into a temporary directory and renames it once complete,
so a step half-written when the process died is never listed. Every step also
carries checksums of its host values and of each array (computed on the
devices, the same on any mesh), verified when it is restored: a step that
fails to load, or loads with other contents than were saved (a flipped digit,
overwritten bytes, an emptied file), is skipped with a warning for the one
before it.
"""

import hashlib
import json
import os
import shutil

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from deeplanczos._src import sharding as sharding_lib


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """Raised where a run stops for a SIGTERM, with nothing lost.

  Attributes:
    step: the checkpoint step saved for it, or None when the SIGTERM came
      outside a method's steps (start-up, training, the wrap-up), where the
      run stops at the next phase and keeps what it had saved.
    where: that phase, for messages.
  """

  def __init__(self, step, where=""):
    super().__init__(f"stopped by SIGTERM after saving step {step}"
                     if step is not None else f"stopped by SIGTERM {where}")
    self.step = step
    self.where = where


class Mismatch(ValueError):
  """A checkpoint written by another run: another config, model or mesh."""


class WriteError(RuntimeError):
  """A checkpoint could not be written (a full disk, a lost file system)."""


def _words(x):
  """``x``'s bits as uint32 words: the array's own shape, plus a trailing
  axis of 2 for 64-bit types."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def array_checksum(x):
  """Two position-weighted sums of ``x``'s bits, modulo ``2**32``.

  Each word is weighted by an odd number depending on its position, so a
  change of any single word always changes both sums, and swapped words
  change them too. Integer sums do not depend on the order of reduction: the
  checksum is the same on any mesh and sharding, and no array is gathered.
  """
  words = _words(x)
  position = jnp.zeros(words.shape, jnp.uint32)
  for d in range(words.ndim):
    position = position * jnp.uint32(words.shape[d]) + lax.broadcasted_iota(
        jnp.uint32, words.shape, d)
  weights = (position * jnp.uint32(2654435761) | jnp.uint32(1),
             (position ^ jnp.uint32(0x9E3779B9)) * jnp.uint32(40503)
             | jnp.uint32(1))
  return jnp.stack([jnp.sum(words * w, dtype=jnp.uint32) for w in weights])


@jax.jit
def _all_checksums(arrays: list):
  return jnp.stack([array_checksum(a) for a in arrays])


def _checksums(arrays: dict) -> dict:
  """Every array's checksum: one program and one host read per set of
  devices the arrays live on (a state may mix a mesh's arrays with arrays
  on one device)."""
  groups = {}
  for name in sorted(arrays):
    groups.setdefault(frozenset(arrays[name].sharding.device_set),
                      []).append(name)
  out = {}
  for names in groups.values():
    sums = sharding_lib.host_value(_all_checksums([arrays[n] for n in names]))
    out.update({name: row.tolist() for name, row in zip(names, sums)})
  return out


def _meta_digest(meta: dict) -> str:
  text = json.dumps(meta, sort_keys=True, allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


def differences(saved, current, prefix=""):
  """``['key: saved -> current', ...]`` over two nested dicts."""
  out = []
  for key in sorted(set(saved) | set(current), key=str):
    name = f"{prefix}{key}"
    a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, name + ".")
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
    self._last_saved = None
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(2, max_to_keep), create=True,
            enable_async_checkpointing=False))

  def save(self, step: int, arrays: dict, meta: dict):
    """Writes ``step``: ``arrays`` (device arrays) and ``meta`` (JSON).

    Raises:
      WriteError: the step could not be written (the message names the
        directory, the free space left and the last good step).
    """
    meta = json.loads(json.dumps({**meta, "fingerprint": self.fingerprint}))
    meta["checksum"] = {"meta": _meta_digest(meta),
                        "arrays": _checksums(arrays)}
    items = {"meta": ocp.args.JsonSave(meta)}
    if arrays:
      items["arrays"] = ocp.args.StandardSave(arrays)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise WriteError(self._write_failure(step, e)) from e
    self._last_saved = step

  def _write_failure(self, step, error) -> str:
    directory = str(self._manager.directory)
    try:
      free = shutil.disk_usage(directory).free
    except OSError:
      free = None
    reason = str(error).strip().splitlines()[0][:300] if str(error) else ""
    full = "no space left" in str(error).lower() or free is not None and (
        free < 1 << 20)
    last = self._last_saved
    if last is None:
      last = self._manager.latest_step()
    return (f"Cannot write checkpoint step {step} in {directory}"
            + (f": the disk is full ({free} bytes free)" if full else "")
            + f" ({type(error).__name__}: {reason}). "
            + ("No earlier step was saved." if last is None else
               f"The last good step is {last}; free some space and run the "
               "same command again to resume from it."))

  def _verified_meta(self, step):
    """Step ``step``'s JSON, or None (with a warning) if it is damaged."""
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint step %d cannot be read (%s: %s); trying "
                      "an older one.", step, type(e).__name__, e)
      return None
    meta = dict(meta) if isinstance(meta, dict) else {}
    checksum = meta.pop("checksum", None)
    if not (isinstance(checksum, dict) and
            checksum.get("meta") == _meta_digest(meta)):
      logging.warning(
          "Checkpoint step %d in %s is damaged: its saved values do not "
          "match their checksum%s; trying an older one.", step,
          self._manager.directory,
          "" if checksum else " (it has none: empty, or not written by "
          "deeplanczos 0.3 or later)")
      return None
    meta["checksum"] = checksum
    return meta

  def check_fingerprint(self):
    """Raises :class:`Mismatch` if the newest intact step is another run's.

    Reads the steps' JSON only, so a run can refuse a workdir before any
    expensive work (training, compiling).
    """
    self._manager.reload()
    for step in sorted(self._manager.all_steps(), reverse=True):
      meta = self._verified_meta(step)
      if meta is not None:
        self._refuse_other_run(meta)
        return

  def _refuse_other_run(self, meta):
    changed = differences(meta.get("fingerprint", {}), self.fingerprint)
    if changed:
      raise Mismatch(
          f"The checkpoints in {self._manager.directory} were written by "
          "another run; resuming them would mix two computations. What "
          "changed: " + "; ".join(changed) + ". Use another workdir, or "
          "delete the checkpoints to start afresh.")

  def restore(self, like: dict):
    """The newest intact ``(arrays, meta)``, or None to start afresh.

    A step that cannot be read, or whose host values or arrays do not match
    the checksums saved with them, is skipped (with a warning) for the one
    before it.

    Args:
      like: arrays shaped and sharded like the saved ones (the fresh state);
        empty when the state is host values alone.

    Raises:
      Mismatch: the newest intact step was saved with another fingerprint.
    """
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        like)
    items = {"meta": ocp.args.JsonRestore()}
    if target:
      items["arrays"] = ocp.args.StandardRestore(target)
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      meta = self._verified_meta(step)
      if meta is None:
        damaged.append(step)
        continue
      self._refuse_other_run(meta)
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint step %d cannot be loaded (%s: %s); "
                        "trying an older one.", step, type(e).__name__, e)
        damaged.append(step)
        continue
      arrays = out.get("arrays") if target else {}
      saved = meta["checksum"]["arrays"]
      found = _checksums(arrays)
      if found != saved:
        names = sorted(k for k in set(found) | set(saved)
                       if found.get(k) != saved.get(k))
        logging.warning(
            "Checkpoint step %d in %s is damaged: %d of its arrays do not "
            "match their checksums; trying an older one.", step,
            self._manager.directory, len(names))
        damaged.append(step)
        continue
      self._remove(damaged)
      logging.info("Resuming from checkpoint step %d.", step)
      for key in ("fingerprint", "checksum"):
        meta.pop(key)
      self._last_saved = step
      return arrays, meta
    if steps:
      logging.warning("No checkpoint in %s could be used (%d damaged); "
                      "starting afresh.", self._manager.directory, len(steps))
      self._remove(damaged)
    return None

  def _remove(self, damaged):
    """Deletes damaged steps, whose numbers the resumed run will write."""
    for step in damaged:
      logging.warning("Removing damaged checkpoint step %d.", step)
      self._manager.delete(step)

  def close(self):
    self._manager.close()
