"""The power method for the dominant eigenpair of a dataset Hessian.

``v_{k+1} = H v_k / ||H v_k||``: the iterate turns towards the eigenvector of
the eigenvalue of largest magnitude, with error shrinking like
``(lambda_2 / lambda_1)^k``; the Rayleigh quotient ``<v_k, H v_k>`` estimates
that eigenvalue, signed.
"""

from collections.abc import Callable
import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deeplanczos._src import api
from deeplanczos._src import driver
from deeplanczos._src import operator as operator_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math


class PowerResult(NamedTuple):
  """The output of :func:`power_iteration`.

  Attributes:
    eigenvalue: the last Rayleigh quotient ``<v, H v>``: the signed estimate
      of the eigenvalue of largest magnitude.
    eigenvector: the unit estimate of its eigenvector, a pytree shaped and
      sharded like the parameters.
    eigenvalues: ``(iterations,)`` the Rayleigh quotient at each iteration.
    alpha: ``(iterations,)`` ``||H v_k||^2``.
    q: ``(iterations,)`` ``|<v_k, v_{k+1}>|``, tending to 1.
    seconds: ``(iterations,)`` wall time of each iteration (the first
      includes compilation).
    converged: whether ``tol`` stopped the run.
    loss: the dataset loss at the parameters.
    num_hvps: Hessian-vector products, one per iteration.
  """
  eigenvalue: float
  eigenvector: Any
  eigenvalues: np.ndarray
  alpha: np.ndarray
  q: np.ndarray
  seconds: np.ndarray
  converged: bool
  loss: float
  num_hvps: int


class PowerState(NamedTuple):
  """The power method's state after ``count`` iterations.

  ``v`` is the current unit vector (device arrays); the histories are
  preallocated to the iteration budget and NaN beyond ``count``.
  """
  v: Any
  eigenvalues: np.ndarray
  alpha: np.ndarray
  q: np.ndarray
  count: int
  loss: float
  converged: bool


@jax.jit
def _update(v, hv):
  """``lambda = <v, Hv>``, ``||Hv||``, ``v' = Hv / ||Hv||``, ``q = |<v, v'>|``.

  The host squares the norm into ``alpha`` in float64: ``||Hv||^2``
  overflows float32 for eigenvalues beyond about ``1e19``, ``||Hv||`` not.
  """
  eigenvalue = tree_math.tree_vdot(v, hv)
  norm = tree_math.tree_norm(hv)
  new_v = tree_math.tree_scale(hv, 1.0 / jnp.where(norm > 0, norm, 1.0))
  q = jnp.abs(tree_math.tree_vdot(v, new_v))
  return new_v, jnp.stack([eigenvalue, norm, q])


def _null_space(k):
  return ValueError(
      f"H v = 0 at iteration {k}: the vector lies in the Hessian's null "
      "space. Start from another V0 or key.")


@jax.jit
def _normalize(v):
  norm = tree_math.tree_norm(v)
  return tree_math.tree_scale(v, 1.0 / norm), norm


def unit_start(op, v0, key, name="V0"):
  """``v0`` checked, placed and normalized, or a random unit vector."""
  if v0 is None:
    return op.random_vector(jax.random.key(0) if key is None else key)
  v, norm = _normalize(op.check_vector(v0, name))
  norm = float(sharding_lib.host_value(norm))
  if not norm > 0:
    raise ValueError(f"{name} must be a non-zero, finite vector; its norm is "
                     f"{norm}.")
  return v


def init(op, v0, num_iterations: int) -> PowerState:
  """The state before the first iteration, from the unit vector ``v0``."""
  del op
  nan = np.full(num_iterations, np.nan)
  return PowerState(v0, nan, nan.copy(), nan.copy(), 0, float("nan"), False)


def step(op, state: PowerState, *, tol: float | None) -> PowerState:
  """One iteration: ``H v`` over the data, then ``v <- H v / ||H v||``.

  Records ``lambda_k = <v_k, H v_k>``, ``alpha_k = ||H v_k||^2`` and
  ``q_k = |<v_k, v_{k+1}>|``, and is converged once
  ``|lambda_k - lambda_{k-1}| <= tol |lambda_k|``.
  """
  k = state.count
  hv = op.matvec(state.v, where=f"at iteration {k}")
  new_v, stats = _update(state.v, hv)
  eigenvalue, norm, q = sharding_lib.host_value(stats).astype(float)
  if norm == 0:
    raise _null_space(k)
  alpha = norm ** 2
  eigenvalues, alphas, qs = (a.copy() for a in (state.eigenvalues,
                                                 state.alpha, state.q))
  eigenvalues[k], alphas[k], qs[k] = eigenvalue, alpha, q
  converged = bool(tol is not None and k > 0 and abs(
      eigenvalue - eigenvalues[k - 1]) <= tol * abs(eigenvalue))
  return PowerState(new_v, eigenvalues, alphas, qs, k + 1,
                    float(op.loss_value), converged)


@functools.partial(jax.jit, static_argnames=("pass_fn", "n"))
def _iterations(params, v, data, previous, tol, count, *, pass_fn, n):
  """Up to ``count`` (traced, at most ``n``) iterations in one program,
  stopping where :func:`step` would: a shorter last block compiles nothing
  new.

  Returns the last vector and an ``(n, 6)`` buffer of rows
  ``[lambda, ||Hv||, q, count, loss, bad]``, NaN after the last iteration
  run.
  """
  def cond(carry):
    k, _, _, _, stop = carry
    return (k < count) & ~stop

  def body(carry):
    k, v, previous, rows, _ = carry
    hv, stats = pass_fn(params, v, data)
    new_v, s = _update(v, hv)
    row = jnp.concatenate([s, stats.astype(s.dtype)])
    converged = (tol >= 0) & (k + previous_count > 0) & (
        jnp.abs(s[0] - previous) <= tol * jnp.abs(s[0]))
    stop = converged | (stats[2] >= 0) | (s[1] == 0)
    return k + 1, new_v, s[0], rows.at[k].set(row), stop

  dtype = tree_math.accumulation_dtype(
      jnp.result_type(*jax.tree.leaves(v)))
  previous_count = jnp.where(jnp.isnan(previous), 0, 1)
  rows = jnp.full((n, 6), jnp.nan, dtype)
  carry = (0, v, previous.astype(dtype), rows, False)
  if n == 1:  # no loop: XLA:CPU runs loop bodies without its fast kernels
    _, v, _, rows, _ = body(carry)
  else:
    _, v, _, rows, _ = jax.lax.while_loop(cond, body, carry)
  return v, rows


def steps(op, state: PowerState, *, tol: float | None, n: int,
          up_to: int | None = None) -> PowerState:
  """Up to ``up_to`` (default ``n``) iterations of :func:`step` in one
  compiled loop of at most ``n``.

  Needs the data on the devices in one program (``op.pass_program()``);
  the host reads the iterations' numbers once.
  """
  op.note_pass_program("power")
  k = state.count
  previous = state.eigenvalues[k - 1] if k else np.nan
  args, static = _iterations_arguments(op, state.v, previous, tol,
                                       n if up_to is None else up_to, n)
  v, rows = _iterations(*args, **static)
  eigenvalues, alphas, qs = (a.copy() for a in (state.eigenvalues,
                                                 state.alpha, state.q))
  converged, count = False, k
  for i, row in enumerate(sharding_lib.host_value(rows).astype(float)):
    if np.isnan(row[3]):  # no pass counted: the loop had stopped
      break
    count = k + i + 1
    op.account(row[3:], f"at iteration {k + i}")
    if row[1] == 0:
      raise _null_space(k + i)
    eigenvalues[k + i], alphas[k + i], qs[k + i] = row[0], row[1] ** 2, row[2]
    converged = bool(tol is not None and k + i > 0 and abs(
        row[0] - eigenvalues[k + i - 1]) <= tol * abs(row[0]))
  return PowerState(v, eigenvalues, alphas, qs, count, float(op.loss_value),
                    converged)


def _iterations_arguments(op, v, previous, tol, count, n):
  """``_iterations``' arguments and static arguments, in the types every
  call passes (:func:`power_iteration` compiles for the calls to come)."""
  pass_fn, data = op.pass_program()
  return (op.params, v, data, np.float64(previous),
          -1.0 if tol is None else float(tol), np.int32(count)), dict(
              pass_fn=pass_fn, n=n)


def result(state: PowerState, run: driver.Run) -> PowerResult:
  """The :class:`PowerResult` of the last state."""
  n = state.count
  return PowerResult(
      eigenvalue=float(state.eigenvalues[n - 1]), eigenvector=state.v,
      eigenvalues=state.eigenvalues[:n], alpha=state.alpha[:n],
      q=state.q[:n], seconds=run.seconds, converged=state.converged,
      loss=state.loss, num_hvps=run.num_hvps)


def _check_count(name, value):
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
      or value < 1):
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@api.takes_operator
def power_iteration(op: operator_lib.HessianOperator, *,
                    num_iterations: int = 100, v0=None, key=None,
                    tol: float | None = None, show_pbar: bool = True,
                    checkpointer=None,
                    iterations_per_call: int = 1) -> PowerResult:
  """The dominant eigenpair of the dataset Hessian by power iteration.

  Also callable as ``power_iteration(loss, params, batch_iterable, ...)``
  with the keyword options of :class:`HessianOperator`.

  Args:
    op: the operator.
    num_iterations: the most iterations (products) to run.
    v0: the starting vector, shaped like the parameters (normalized here);
      by default a random unit vector from ``key``.
    key: PRNG key for the default ``v0`` (default ``jax.random.key(0)``).
    tol: stop once ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|``.
    show_pbar: a tqdm bar over iterations, with the current eigenvalue.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``: the state is
      saved after iterations and restored, if saved before, at the start.
    iterations_per_call: with the data on the devices (in one program), an
      iteration is one compiled program, the pass and the update, with one
      host read; this runs up to that many iterations in one compiled loop
      and one host read for all of them (XLA:CPU runs loop bodies without
      its fast kernels: it pays there for dense layers, not convolutions).
      The numbers are the same to rounding; checkpoints and the progress
      bar then advance by that many. At 1, an iteration runs on
      ``op.matvec``'s program instead where another compiled program
      holding the pass has run on the operator (``op.pass_programs()``:
      each holds its own copy of the pass, whose compile a large model
      pays in minutes).

  Returns:
    A :class:`PowerResult`.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda p, x, y: jnp.mean(y * (x @ p) ** 2) / 2
    >>> data = [(jnp.eye(3), jnp.array([6.0, 3.0, 1.5]))]
    >>> r = power_iteration(loss, jnp.ones(3), data, num_iterations=60,
    ...                     show_pbar=False)
    >>> round(r.eigenvalue, 4)
    2.0
  """
  _check_count("num_iterations", num_iterations)
  if tol is not None and not tol >= 0:
    raise ValueError(f"tol must be a non-negative number, got {tol!r}.")
  _check_count("iterations_per_call", iterations_per_call)
  one = lambda op, s: step(op, s, tol=tol)
  programs = op.pass_programs()
  if op.pass_program() is not None and (
      iterations_per_call > 1 or "power" in programs or not programs):
    # One program and one host read a call: the pass and the update.
    # The loop's length is fixed for the call, so a shorter last block
    # runs in the same program.
    n = min(iterations_per_call, num_iterations)
    one = lambda op, s: steps(op, s, tol=tol, n=n,
                              up_to=min(n, num_iterations - s.count))
    compiled = op.remembered(("power compiled", n))
    if v0 is None and not compiled:  # the random start compiles beside
      key = jax.random.key(0) if key is None else key
      draw = op.random_program()
      driver.compile_together((_iterations, *_iterations_arguments(
          op, jax.eval_shape(draw, key), np.nan, tol, n, n)), [(draw, key)])
      compiled["compiled"] = True
  method = driver.Method(
      name="power method",
      step=one,
      done=lambda s: s.converged or s.count >= num_iterations,
      planned_hvps=num_iterations,
      postfix=lambda s: {"eigenvalue": f"{s.eigenvalues[s.count - 1]:.6g}",
                         "q": f"{s.q[s.count - 1]:.6f}"})
  state = init(op, unit_start(op, v0, key), num_iterations)
  run = driver.run(op, method, state, checkpointer=checkpointer,
                   show_pbar=show_pbar)
  return result(run.state, run)


def InitPowerMethodVector(rng, P, *, shardings=None, mesh=None):  # pylint: disable=invalid-name
  """A random unit vector shaped like the parameters ``P``.

  The vector has ``P``'s tree structure, shapes and dtypes, unit Euclidean
  norm over the whole tree, and ``P``'s shardings: it is generated under
  ``jit`` with ``out_shardings``, so no full copy exists on any one host.

  Args:
    rng: a JAX PRNG key; the same key gives the same vector.
    P: the parameter pytree (arrays, possibly sharded).
    shardings: optional pytree of ``NamedSharding`` shaped like ``P``.
    mesh: optional mesh for the default sharding rule when ``P`` is not
      sharded yet.

  Returns:
    A pytree like ``P``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> v = InitPowerMethodVector(jax.random.key(0), {"w": jnp.ones((3, 2))})
    >>> round(float(jnp.linalg.norm(v["w"])), 5)
    1.0
  """
  mesh, params, shardings = sharding_lib.resolve_shardings(
      P, mesh=mesh, shardings=shardings)
  return operator_lib.random_vector_fn(params, shardings)(rng)


def PowerMethodIterate(loss: Callable, P, batch_iterable, num_iteration: int,  # pylint: disable=invalid-name
                       V0=None, batch_parser: Callable | None = None,
                       show_pbar: bool = True, *, tol: float | None = None,
                       key=None, checkpointer=None, **operator_options):
  """Power iteration on the Hessian of the loss averaged over a dataset.

  The seed API, a thin wrapper of :func:`power_iteration`. Each iteration
  is one full pass over ``batch_iterable``: ``H v`` is the sum over batches
  of ``n_b H_b v`` divided by the number of examples, where ``H_b`` is the
  Hessian of ``loss`` on batch ``b`` (so a short last batch counts for its
  examples only), and ``v <- H v / ||H v||``.

  Args:
    loss: ``loss(params, x, y) -> scalar``, the mean loss of a batch.
    P: the parameter pytree at which the Hessian is taken.
    batch_iterable: a re-iterable of batches (list, grain ``MapDataset`` or
      ``DataLoader``, ...) or a zero-argument callable returning an iterator.
    num_iteration: the most iterations to run.
    V0: the starting vector, shaped like ``P`` (normalized here); by default
      ``InitPowerMethodVector(key, P)``.
    batch_parser: ``batch -> (x, y)`` (or ``(x, y, mask)`` with a 0/1 mask of
      real examples); by default a batch is ``(x, y)`` itself.
    show_pbar: tqdm bars over iterations (with the current eigenvalue) and,
      when the data streams, over batches; ``False`` prints nothing.
    tol: stop once ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|``.
    key: PRNG key for the default ``V0`` (default ``jax.random.key(0)``).
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``: the state is
      saved after iterations and restored, if saved before, at the start.
    **operator_options: ``mesh``, ``shardings``, ``data_axis``, ``subset``,
      ``loss_rng``, ``data_on_device``...: see :class:`HessianOperator`.

  Returns:
    ``(V, History)``: ``V`` the unit eigenvector estimate (shaped like ``P``,
    on its shardings) and ``History`` a dict of numpy arrays, one entry per
    iteration run:

    - ``'alpha'``: ``||H v_k||^2``, the squared estimate of the dominant
      eigenvalue's magnitude.
    - ``'eigenvalue'``: the Rayleigh quotient ``<v_k, H v_k>``, the signed
      estimate of the dominant eigenvalue.
    - ``'q'``: the overlap ``|<v_k, v_{k+1}>|`` of consecutive estimates,
      which tends to 1 as the vector converges.
    - ``'iteration'``: the iteration indices ``0, 1, ...``.
    - ``'loss'``: the dataset loss at ``P`` (the same every iteration).
    - ``'seconds'``: wall time of each iteration (the first includes
      compilation).
  """
  _check_count("num_iteration", num_iteration)
  op = api.build_operator(loss, P, batch_iterable, batch_parser=batch_parser,
                          show_pbar=show_pbar, **operator_options)
  r = power_iteration(op, num_iterations=num_iteration, v0=V0, key=key,
                      tol=tol, show_pbar=show_pbar, checkpointer=checkpointer)
  n = len(r.eigenvalues)
  history = {
      "alpha": r.alpha,
      "eigenvalue": r.eigenvalues,
      "q": r.q,
      "iteration": np.arange(n),
      "loss": np.full(n, r.loss),
      "seconds": r.seconds,
  }
  return r.eigenvector, history


@api.takes_operator
def top_eigenvalue(op: operator_lib.HessianOperator, *, params=None,
                   v0=None, num_iterations: int = 20, key=None,
                   tol: float | None = None) -> PowerResult:
  """The top eigenvalue and its vector, warm-started: sharpness tracking.

  Made to be called every few optimizer steps: pass the operator you keep,
  the new parameters and the previous eigenvector, and nothing is compiled
  again (see :meth:`HessianOperator.with_params`).

  Args:
    op: the operator (or ``loss, params, batch_iterable`` and options).
    params: parameters to evaluate the Hessian at instead of the operator's.
    v0: the starting vector, typically the previous call's eigenvector.
    num_iterations: power iterations (one product each).
    key: PRNG key for a random start when ``v0`` is None.
    tol: stop early at this relative change of the eigenvalue.

  Returns:
    A :class:`PowerResult`, as :func:`power_iteration` gives: its
    ``eigenvalue`` (the Rayleigh quotient) and ``eigenvector`` (the unit
    vector, shaped and sharded like the parameters, to warm-start the next
    call).

  Example:
    >>> op = deeplanczos.HessianOperator(loss, params, data)  # doctest: +SKIP
    >>> v = None                                              # doctest: +SKIP
    >>> for step in range(num_steps):                         # doctest: +SKIP
    ...   params, opt_state = train_step(params, opt_state)
    ...   if step % 10 == 0:
    ...     r = deeplanczos.top_eigenvalue(op, params=params, v0=v)
    ...     v = r.eigenvector
  """
  if params is not None:
    op = op.with_params(params)
  return power_iteration(op, num_iterations=num_iterations, v0=v0, key=key,
                         tol=tol, show_pbar=False)
