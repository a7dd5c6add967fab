"""The one loop that runs every method: progress, budget, timing, checkpoints.

A method is a state (a ``NamedTuple`` pytree of device arrays and small host
values) and a ``step(op, state) -> state``; its own module builds the first
state and reads the result off the last. :func:`run` alone owns what every
long run needs:

- a tqdm bar over Hessian-vector products (off with ``show_pbar=False``);
- the budget: it stops once the method is done or ``max_hvps`` products
  have been spent;
- the wall time of every step;
- checkpoints: it restores the newest intact one before the first step
  (saying how far it had got), saves after every ``checkpointer.every``-th
  step and always after the last one, splitting the state itself (device
  arrays to orbax with their shardings, host values to JSON, NaN and
  infinities included, PRNG keys as their data);
- SIGTERM, when the checkpointer asks for it: the run saves at the end of the
  current step and raises ``Preempted``; the previous handler is restored
  when the run ends, and told of a SIGTERM the run caught, so that a caller
  guarding a longer job sees it too.

A method that runs many products in one compiled loop asks
:func:`loops_pay` whether to, and :class:`Pace` how many to a block, and on
its first call compiles the loop and its smaller programs together
(:func:`compile_together`).
"""

from collections.abc import Callable
import concurrent.futures
import math
import signal
import threading
import time
from typing import Any, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm.auto as tqdm

from deeplanczos import checkpoint as checkpoint_lib


class Method(NamedTuple):
  """What the driver needs to know of a method.

  Attributes:
    name: shown on the progress bar.
    step: ``step(op, state) -> state``: one step, one or more products.
    done: ``done(state) -> bool``: nothing is left to do.
    planned_hvps: the products a full run takes (the bar's total).
    postfix: ``postfix(state) -> dict`` shown on the bar, or None.
  """
  name: str
  step: Callable[[Any, Any], Any]
  done: Callable[[Any], bool]
  planned_hvps: int
  postfix: Callable[[Any], dict] | None = None


class Run(NamedTuple):
  """What :func:`run` returns.

  Attributes:
    state: the last state.
    seconds: ``(steps,)`` wall time of every step (restored ones included;
      the first includes compilation).
    num_hvps: products spent on the steps, restored ones included.
    stopped_by: ``'done'`` or ``'max_hvps'``.
  """
  state: Any
  seconds: np.ndarray
  num_hvps: int
  stopped_by: str


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _number(v):
  return v if not isinstance(v, float) or math.isfinite(v) else repr(v)


def encode(x):
  """A host value as JSON: exact floats, NaN and infinities as strings."""
  if _is_key(x):
    return {"key_data": np.asarray(jax.random.key_data(x)).tolist()}
  if isinstance(x, (np.ndarray, np.generic)):
    a = np.asarray(x)
    return {"dtype": a.dtype.str, "shape": list(a.shape),
            "data": [_number(v) for v in a.ravel().tolist()]}
  if isinstance(x, (bool, int, float)):
    return _number(x)
  raise TypeError(f"A method state holds a {type(x).__name__}; host values "
                  "must be numbers or numpy arrays.")


def decode(x):
  """The inverse of :func:`encode`."""
  if isinstance(x, dict) and "key_data" in x:
    return jax.random.wrap_key_data(np.array(x["key_data"], np.uint32))
  if isinstance(x, dict):
    data = [float(v) if isinstance(v, str) else v for v in x["data"]]
    return np.array(data, np.dtype(x["dtype"])).reshape(x["shape"])[()]
  return float(x) if isinstance(x, str) else x


def split(state):
  """``state -> (arrays, host)``: device arrays by leaf index, JSON values."""
  leaves = jax.tree.leaves(state)
  arrays = {str(i): l for i, l in enumerate(leaves)
            if isinstance(l, jax.Array) and not _is_key(l)}
  host = {str(i): encode(l) for i, l in enumerate(leaves)
          if str(i) not in arrays}
  return arrays, host


def join(like, arrays, host):
  """The state shaped like ``like`` from :func:`split`'s two halves."""
  leaves, treedef = jax.tree.flatten(like)
  if set(arrays) | set(host) != {str(i) for i in range(len(leaves))}:
    raise ValueError("The checkpoint does not hold this method's state: it "
                     f"has {len(arrays) + len(host)} values where "
                     f"{len(leaves)} are expected.")
  return treedef.unflatten([arrays[str(i)] if str(i) in arrays
                            else decode(host[str(i)])
                            for i in range(len(leaves))])


class SigtermGuard:
  """Catches SIGTERM while entered, then restores the old handler.

  A SIGTERM only sets a flag, which :meth:`anywhere` reads at points where
  stopping is safe. Guards nest: an inner one (the driver's, for a method)
  tells the handler it replaced (an outer guard's, for a whole launcher
  run) of a SIGTERM it caught when it exits. Disabled (and a no-op) when
  ``enabled`` is false or off the main thread.
  """

  def __init__(self, enabled: bool):
    self.received = False
    self._enabled = (enabled and
                     threading.current_thread() is threading.main_thread())
    self._previous = None

  def __enter__(self):
    if self._enabled:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def anywhere(self) -> bool:
    """Whether any process has received SIGTERM (all processes agree)."""
    if not self._enabled:
      return False
    flag = self.received
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag

  def __exit__(self, *exc):
    if self._enabled:
      signal.signal(signal.SIGTERM, self._previous)
      if self.received and callable(self._previous):
        self._previous(signal.SIGTERM, None)  # a guard around the run


def run(op, method: Method, state, *, max_hvps: int | None = None,
        checkpointer: checkpoint_lib.Checkpointer | None = None,
        show_pbar: bool = False) -> Run:
  """Steps ``method`` from ``state`` until it is done or the budget is spent.

  Args:
    op: the operator, handed to every step.
    method: the method's step, stopping rule and name.
    state: the first state; with a checkpoint, only its structure, shapes
      and shardings matter (the saved state replaces it).
    max_hvps: stop once this many products are spent (None: no limit).
    checkpointer: saves and restores the state; see
      :class:`deeplanczos.checkpoint.Checkpointer`.
    show_pbar: a tqdm bar over products.

  Returns:
    A :class:`Run`.
  """
  seconds, hvps = [], 0
  if checkpointer is not None:
    arrays, _ = split(state)
    saved = checkpointer.restore(arrays)
    if saved is not None:
      arrays, meta = saved
      state = join(state, arrays, meta["host"])
      seconds, hvps = list(meta["seconds"]), meta["hvps"]
      logging.info(
          "%s: %s", method.name,
          f"already complete at step {len(seconds)} ({hvps} products); "
          "reporting the saved state" if method.done(state) else
          f"resumed from step {len(seconds)} ({hvps} of at most "
          f"{method.planned_hvps} products done)")
  total = max(method.planned_hvps, hvps)
  if max_hvps is not None:
    total = min(total, max_hvps)
  bar = tqdm.tqdm(total=total, initial=hvps, desc=method.name,
                  disable=not show_pbar)
  stopped_by, saved_step = "done", len(seconds)
  with SigtermGuard(checkpointer is not None and
                checkpointer.handle_sigterm) as sigterm:
    while not method.done(state):
      if max_hvps is not None and hvps >= max_hvps:
        stopped_by = "max_hvps"
        break
      tick, before = time.perf_counter(), op.num_matvecs
      state = method.step(op, state)
      seconds.append(time.perf_counter() - tick)
      hvps += op.num_matvecs - before
      bar.update(op.num_matvecs - before)
      if method.postfix is not None:
        bar.set_postfix(method.postfix(state))
      if checkpointer is not None:
        preempted = sigterm.anywhere()
        step = len(seconds)
        if preempted or (checkpointer.every and step % checkpointer.every == 0):
          _save(checkpointer, step, state, seconds, hvps)
          saved_step = step
        if preempted:
          bar.close()
          raise checkpoint_lib.Preempted(step)
    if checkpointer is not None and saved_step != len(seconds):
      _save(checkpointer, len(seconds), state, seconds, hvps)  # the last one
  bar.total = bar.n  # a run that ends early ends its bar there
  bar.refresh()
  bar.close()
  return Run(state, np.array(seconds), hvps, stopped_by)


def _save(checkpointer, step, state, seconds, hvps):
  arrays, host = split(state)
  checkpointer.save(step, arrays, {"host": host, "seconds": seconds,
                                   "hvps": hvps})


def loops_pay(op, name: str) -> bool:
  """Whether method ``name`` runs its products in its own compiled loop
  rather than a product at a time on ``op.matvec``'s program.

  Where compiled loops run fast (``op.loops_run_fast()``), and either the
  method's loop has run before or no compiled program holding the pass has
  (``op.pass_programs()``): each such program holds its own copy of the
  pass, so after another one the method shares ``op.matvec``'s (several
  methods on one operator compile the pass at most twice; on a pod, where
  a product takes seconds, a loop saves nothing and a compile minutes).
  """
  programs = op.pass_programs()
  return op.loops_run_fast() and (name in programs or not programs)


def compile_together(loop, others):
  """Compiles a method's loop here and its other programs beside it.

  ``loop`` is ``(jitted, args, kwargs)``, ``others`` ``(jitted, *args)``
  each; arguments may be abstract (``jax.ShapeDtypeStruct`` with shardings)
  as long as the calls to come pass the same types, shapes and shardings:
  the calls then find the programs compiled. XLA:CPU compiles a program's
  kernels on every core but runs its HLO passes and emits its kernels on
  one: on the peers' digits MLP a loop holding the pass spends about 0.8 s
  there, long enough to compile a method's start (a random draw, its
  placement: 0.5 s) in a second thread. The loop compiles in the calling
  thread, under its JAX contexts; another program compiled otherwise there
  (a thread-local context that changes its lowering) only compiles again
  when called.
  """
  def beside():
    for program, *args in others:
      program.lower(*args).compile()

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    compiled = pool.submit(beside)
    program, args, kwargs = loop
    program.lower(*args, **kwargs).compile()
    compiled.result()


class Pace:
  """How many steps each compiled block of a method runs (Lanczos's
  ``steps_per_call``).

  Fixed (``steps``), or automatic (``steps=None``): as many as took about
  ``seconds`` in the last block (the first block one step, unless
  ``memory`` holds the time a step took in an earlier run), so a block
  ends within about that long of a SIGTERM and the progress bar moves as
  often; every process runs process 0's count. ``loop`` is whether the
  blocks are compiled as a loop (one program for every count) or as a
  single step.
  """

  def __init__(self, steps: int | None, seconds: float = 1.0,
               memory: dict | None = None):
    self.loop = steps is None or steps > 1
    self._steps, self._seconds = steps, seconds
    self._memory = {} if memory is None else memory
    self._per_step = self._memory.get("per_step")

  def count(self) -> int:
    if self._steps is not None:
      return self._steps
    n = 1 if self._per_step is None else max(
        1, int(self._seconds / max(self._per_step, 1e-9)))
    if jax.process_count() > 1:
      n = int(multihost_utils.broadcast_one_to_all(np.int64(min(n, 2**40))))
    return n

  def took(self, seconds: float, steps: int):
    if steps:
      self._per_step = self._memory["per_step"] = seconds / steps
