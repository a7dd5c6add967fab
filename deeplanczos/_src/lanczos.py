"""Thick-restart Lanczos for several eigenpairs of a dataset Hessian.

The recurrence, with ``q_0`` a unit vector and full reorthogonalization::

    w = H q_j
    alpha_j = <q_j, w>,   w <- w - Q_j Q_j^T w   (twice)
    beta_j = ||w||,       q_{j+1} = w / beta_j

gives ``H Q_m = Q_m T_m + beta_{m-1} q_m e_m^T`` with ``T_m`` tridiagonal. A
Ritz pair ``(theta_i, Q_m s_i)`` of ``T_m`` has residual
``||H y_i - theta_i y_i|| = |beta_{m-1} s_{m-1,i}|``. When the basis is full
(``ncv`` vectors), the thick restart of Wu and Simon (2000) keeps the ``l`` best
Ritz vectors, ``T`` becomes ``diag(theta)`` bordered by the couplings
``beta s_{m-1,i}`` to the next vector, and the recurrence goes on, so memory
stays at ``ncv + 1`` vectors however many steps run.

The basis is a parameter-shaped pytree with a leading Krylov axis, so every
leaf keeps its sharding; the tiny projected matrix ``T`` is solved in float64
on the host.
"""

import functools
import time
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from deeplanczos._src import api
from deeplanczos._src import basis as basis_lib
from deeplanczos._src import driver
from deeplanczos._src import operator as operator_lib
from deeplanczos._src import power
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math

WHICH = ("LA", "SA", "LM")


class ConvergenceWarning(UserWarning):
  """A method returned fewer pairs than asked, or pairs short of ``tol``."""


class LanczosResult(NamedTuple):
  """Eigenpairs from :func:`lanczos`.

  A result holds exactly the pairs it found: ``k`` of them, or fewer (with a
  :class:`ConvergenceWarning`) when ``max_hvps`` ran out before ``k`` Ritz
  values existed.

  Attributes:
    eigenvalues: ``(p,)`` float64, ``p <= k``, ordered as ``which`` asks:
      ``'LA'`` descending, ``'SA'`` ascending, ``'LM'`` by descending
      magnitude.
    eigenvectors: a pytree shaped like the parameters with a leading axis of
      ``p``; ``jax.tree.map(lambda x: x[i], eigenvectors)`` is the ``i``-th
      unit eigenvector, with the parameters' shardings.
    residuals: ``(p,)``, ``||H v_i - lambda_i v_i||`` of each returned pair,
      computed explicitly (``p`` more products) in the working precision;
      with ``check_residuals=False``, the recurrence's estimates.
    residual_estimates: ``(p,)``, the same from the recurrence
      (``|beta s_{m,i}|``), which the stopping rule uses; it can fall below
      what the working precision attains, so ``converged`` trusts
      ``residuals``.
    num_hvps: Hessian-vector products used, each one full pass over the
      data: ``krylov_hvps + residual_hvps``.
    converged: whether ``k`` pairs were found and every explicit residual
      (or estimate, with ``check_residuals=False``) meets ``tol``: ``residual_i <= max(tol |lambda_i|, 10 eps
      |lambda|_max)``, the second term the working precision's floor
      (``eps`` of the vectors' dtype). Otherwise a
      :class:`ConvergenceWarning` names the pairs that do not.
    ritz_history: ``(steps, k)`` the wanted Ritz values after every step
      (NaN before ``k`` exist), to see convergence.
    gap_ratio: ``lambda_1 / lambda_2``: near 1 means the top two are close
      and the eigenvectors are ill-determined.
    loss: the dataset loss at the parameters.
    krylov_hvps: the products that built the Krylov space (the steps).
    residual_hvps: the products that checked the residuals explicitly, one
      per returned pair (0 with ``check_residuals=False``).
  """
  eigenvalues: np.ndarray
  eigenvectors: Any
  residuals: np.ndarray
  residual_estimates: np.ndarray
  num_hvps: int
  converged: bool
  ritz_history: np.ndarray
  gap_ratio: float
  loss: float
  krylov_hvps: int = 0
  residual_hvps: int = 0


def order(theta: np.ndarray, which: str) -> np.ndarray:
  """Indices of ``theta`` from most to least wanted under ``which``."""
  if which == "LA":
    return np.argsort(-theta, kind="stable")
  if which == "SA":
    return np.argsort(theta, kind="stable")
  return np.argsort(-np.abs(theta), kind="stable")


class LanczosState(NamedTuple):
  """Thick-restart Lanczos after ``num_steps`` products.

  Attributes:
    basis: ``Q``, ``m + 1`` slots (device arrays); slots ``0..j`` are in use.
    w: the last product, orthogonalized against the basis: the next basis
      vector times ``beta`` (device arrays).
    t: ``(m, m)`` float64, the projected matrix ``Q^T H Q``.
    j: the slot whose product was computed last.
    kept: the Ritz vectors kept by the last restart.
    block: the first slot after the last near-breakdown.
    beta: ``||w||``.
    key: the PRNG key for vectors after a breakdown.
    ritz: ``(max_hvps, k)`` the wanted Ritz values after each step.
    num_steps: the products computed so far.
    converged: every wanted pair meets the tolerance.
    exhausted: the basis spans the whole space.
  """
  basis: Any
  w: Any
  t: np.ndarray
  j: int
  kept: int
  block: int
  beta: float
  key: Any
  ritz: np.ndarray
  num_steps: int
  converged: bool
  exhausted: bool


class _Options(NamedTuple):
  k: int
  which: str
  tol: float
  size: int      # m, the basis slots
  dimension: int  # n, the operator's
  tiny: float    # below tiny * ||T|| a vector is rounding noise
  check_residuals: bool = True  # one product per pair at the end


def ritz(t, j, beta, start=0):
  """Ritz values, vectors and residual estimates of ``T[start:j+1, start:j+1]``.

  ``theta, S = eigh(T)``; the pair ``(theta_i, Q S_i)`` has residual
  ``|beta * S_{last, i}|``.
  """
  theta, s = np.linalg.eigh(t[start:j + 1, start:j + 1])
  return theta, s, np.abs(beta * s[-1])


def _block_done(state, opts):
  """Whether the block since the last breakdown holds nothing more to find.

  Its extreme Ritz values (both ends for 'LM') converge first and from
  inside; once they have, the block's eigenvalues are no more wanted than
  them, and the caller compares them with the wanted ones through ``T``.
  """
  theta, _, res = ritz(state.t, state.j, state.beta, state.block)
  ends = [np.argmax(theta), np.argmin(theta)]
  which = opts.which
  ends = ends if which == "LM" else ends[:1] if which == "LA" else ends[1:]
  scale = np.maximum(np.abs(theta[ends]), opts.tiny * np.abs(theta).max())
  return bool(np.all(res[ends] <= opts.tol * scale))


def _near_breakdown(beta, theta, dtype_eps):
  """``beta`` at the products' rounding noise: span(Q) is nearly invariant."""
  return beta <= np.sqrt(dtype_eps) * max(np.abs(theta).max(), 1e-300)


def init(op, v0, *, size, max_hvps, k, key,
         basis_dtype=None) -> LanczosState:
  """The state before the first product: ``q_0 = v0`` (unit) in slot 0, or
  with ``v0`` None a random unit vector from ``key`` (as
  ``op.random_vector``; scaled in the program that places it)."""
  start = _start_program(op, size, basis_dtype, v0 is None)
  if v0 is None:
    v0 = op.random_vector(key, normalize=False)
  basis, w = start(v0)
  return LanczosState(
      basis=basis, w=w, t=np.zeros((size, size)), j=0,
      kept=0, block=0, beta=0.0, key=key, ritz=np.full((max_hvps, k), np.nan),
      num_steps=0, converged=False, exhausted=False)


def _start_program(op, size, basis_dtype, random):
  """:func:`init`'s program placing the start (scaling a random one), kept
  on the operator."""
  programs = op.remembered(("lanczos start", size, basis_dtype))
  name = "random start" if random else "start"
  if name not in programs:
    programs[name] = basis_lib.start_program(
        op.template, size + 1, op.shardings, basis_dtype, normalize=random)
  return programs[name]


def compile_first(op, opts: _Options, pace: driver.Pace, v0, key,
                  basis_dtype=None):
  """Compiles a first call's block program and, beside it, the random draw,
  the start's placement and the Ritz vectors' products
  (:func:`driver.compile_together`). Once per operator and options: a later
  call finds everything compiled."""
  done = op.remembered(("lanczos compiled", opts, basis_dtype, pace.loop,
                        v0 is None))
  if done:
    return
  start = _start_program(op, opts.size, basis_dtype, v0 is None)
  others = []
  if v0 is None:
    draw = op.random_program(normalize=False)
    others.append((draw, key))
    v0 = jax.eval_shape(draw, key)
  others.append((start, v0))
  basis, w = jax.eval_shape(start, v0)
  # The Ritz vectors (:func:`result`): checked, a rotation and its head.
  n, dtype = opts.size + 1, jax.tree.leaves(basis)[0].dtype
  if opts.check_residuals:
    others += [(basis_lib.rotate, basis, jax.ShapeDtypeStruct((n, n), dtype)),
               (basis_lib.combine, basis,
                jax.ShapeDtypeStruct((n, opts.k), np.float32))]
  else:
    others.append((basis_lib.combine, basis,
                   jax.ShapeDtypeStruct((n, opts.k), dtype)))
  driver.compile_together(
      (_steps, *_steps_arguments(op, opts, pace.loop, basis, w)), others)
  done["compiled"] = True


def _steps_arguments(op, opts: _Options, loop: bool, basis, w, *, place=0.0,
                     t=None, j=0, count=1, arrow=False, may_converge=True,
                     lam=None, check=False):
  """``_steps``'s arguments and static arguments, in the types every call
  passes (:func:`compile_first` compiles for the calls to come)."""
  pass_fn, data = op.pass_program()
  size = opts.size
  return (op.params, basis, w, float(place), data,
          np.zeros((size, size)) if t is None else np.asarray(t, np.float64),
          np.int32(j), np.int32(count), np.bool_(arrow),
          np.bool_(may_converge),
          np.zeros(size) if lam is None else np.asarray(lam, np.float64),
          np.bool_(check)), dict(pass_fn=pass_fn, opts=opts, loop=loop,
                                 packing=_packing(op, basis),
                                 shardings=tuple(jax.tree.leaves(
                                     op.shardings)))


def _packing(op, basis) -> basis_lib.Packing:
  """``basis_lib.packing`` of a Lanczos basis on ``op``, kept on the
  operator: a step or block asks for it, and it takes about 1 us a leaf."""
  leaves = jax.tree.leaves(basis)
  memo = op.remembered(("lanczos packing", leaves[0].shape[0],
                        tuple(l.dtype for l in leaves)))
  if "packing" not in memo:
    memo["packing"] = basis_lib.packing(op.template, op.shardings, basis)
  return memo["packing"]


def expand(op, state: LanczosState, opts: _Options) -> LanczosState:
  """One product and its place in ``T``.

  ``w = H q_j``; ``alpha_j = <q_j, w>`` and ``w <- w - Q Q^T w`` (twice,
  full reorthogonalization); ``beta = ||w||``; then :func:`record`.
  """
  j = state.j
  w = op.matvec(basis_lib.get(state.basis, j),
                where=f"at Lanczos step {state.num_steps}")
  w, c, beta = basis_lib.orthogonalize(
      state.basis, w, j + 1,
      packing=_packing(op, state.basis))
  c = sharding_lib.host_value(c).astype(np.float64)
  beta = float(sharding_lib.host_value(beta))
  return record(state._replace(w=w), c, beta, opts)


def record(state: LanczosState, c, beta, opts: _Options) -> LanczosState:
  """A product's coefficients ``c = Q^T H q_j`` and ``beta`` put into ``T``.

  After a restart, the first step also fills the arrow ``T[:j, j] = <q_i,
  w>``. Then it records the wanted Ritz values and decides convergence:
  every wanted pair has ``|beta s_{m,i}| <= tol |theta_i|``, ``beta`` is not
  at rounding noise (where eigenvalues outside span(Q) are unseen), and the
  block since the last breakdown has nothing more to find.
  """
  j = state.j
  t = state.t.copy()
  t[j, j] = c[j]
  if j == state.kept and j > 0:  # first step after a restart: the arrow
    t[:j, j] = t[j, :j] = c[:j]
  theta, _, res = ritz(t, j, beta)
  wanted = order(theta, opts.which)[:opts.k]
  history = state.ritz.copy()
  history[state.num_steps, :len(wanted)] = theta[wanted]
  scale = np.maximum(np.abs(theta[wanted]), opts.tiny * np.abs(theta).max())
  state = state._replace(t=t, beta=beta, ritz=history,
                         num_steps=state.num_steps + 1,
                         exhausted=j + 1 == opts.dimension)
  eps = opts.tiny / 100
  converged = (len(wanted) == opts.k and np.all(res[wanted] <= opts.tol * scale)
               and not _near_breakdown(beta, theta, eps)
               and (state.block == 0 or _block_done(state, opts)))
  return state._replace(converged=bool(converged))


def _test(t, a, beta, opts: _Options):
  """:func:`record`'s tests on the device, for ``T[:a, :a]`` (``t``
  square, ``a`` traced).

  The rows and columns from ``a`` on are replaced by a diagonal that
  ``which`` does not want (below or above every Ritz value, or zero), so one
  ``eigh`` of the fixed shape holds ``T[:a, :a]``'s pairs, their vectors zero
  past ``a``. In the working precision: the host decides again in float64
  at the end of a block.

  Returns:
    ``(converged, near, broken, wanted)``: the wanted pairs meet ``tol``
    (without :func:`_block_done`), ``beta`` is a near-breakdown, a
    breakdown, and the wanted Ritz values ``(k,)`` (NaN while fewer exist).
  """
  size = t.shape[0]
  index = jnp.arange(size)
  inside = index < a
  t = jnp.where(inside[:, None] & inside[None, :], t, 0)
  bound = 2 * jnp.sqrt(jnp.sum(t * t)) + 1  # above every |Ritz value|
  pad = {"LA": -bound, "SA": bound, "LM": jnp.zeros_like(bound)}[opts.which]
  theta, s = jnp.linalg.eigh(t + jnp.diag(jnp.where(inside, 0, pad)))
  if opts.which == "LA":  # ascending: the pairs of T[:a, :a] come last
    active, wanted = index >= size - a, size - 1 - jnp.arange(opts.k)
  elif opts.which == "SA":
    active, wanted = inside, jnp.arange(opts.k)
  else:
    active, wanted = index >= 0, jnp.argsort(-jnp.abs(theta))[:opts.k]
  top = jnp.max(jnp.where(active, jnp.abs(theta), 0))
  scale = jnp.maximum(jnp.abs(theta[wanted]), opts.tiny * top)
  near = beta <= np.sqrt(opts.tiny / 100) * top
  converged = ((a >= opts.k) & ~near
               & jnp.all(jnp.abs(beta * s[a - 1, wanted]) <= opts.tol * scale))
  values = jnp.where(jnp.arange(opts.k) < a, theta[wanted], jnp.nan)
  return converged, near, beta <= opts.tiny * top, values


@functools.partial(jax.jit,
                   static_argnames=("pass_fn", "opts", "loop", "packing",
                                    "shardings"),
                   donate_argnums=(1,))
def _steps(params, basis, w, place, data, t, j, count, arrow, may_converge,
           lam, check, *, pass_fn, opts, loop, packing, shardings):
  """Up to ``count`` Lanczos steps from slot ``j`` in one program.

  With ``place`` non-zero, slot ``j`` first takes ``place * w`` (the
  placement :func:`advance` leaves to the program).

  Step ``i`` computes ``w = H q_{j+i}`` (one full pass), orthogonalizes it
  against slots ``0..j+i``, places ``q_{j+i+1} = w / beta`` and fills ``T``
  as :func:`expand`, :func:`record` and :func:`advance` would without a
  breakdown or a restart (``arrow``: the first step after a restart also
  fills ``T[:j, j]``). It stops after a step whose wanted pairs
  :func:`_test` calls converged (while ``may_converge``: no near-breakdown
  since the last restart), a breakdown, or a non-finite product.

  With ``check`` (traced: the same program), the slots hold Ritz vectors
  instead and step ``i`` only keeps the residual
  ``||H q_{j+i} - lam_{j+i} q_{j+i}||`` (in ``beta``'s column), so the
  explicit checks reuse the pass compiled here. Every step computes both
  and keeps one (``where``, no ``lax.cond``: XLA:CPU runs a conditional's
  branch as a sequence of its own, 0.1 ms a step on the peers' MLP); the
  residual is the step's own orthogonalization against no slot, so the
  two modes share its kernels (0.08 s less to compile on that MLP).

  Returns:
    ``(basis, w, t, c, steps)``: the last ``w``, ``T`` after the last step
    (not yet coupled to ``w``), the last step's coefficients ``c``
    ``(m + 1,)``, and per step ``[count, loss, bad, beta, near, ritz_1..k]``
    ``(m, 5 + k)``: the pass's numbers, ``||w||``, whether it was a
    near-breakdown, and the wanted Ritz values; NaN after the last step.
    The steps work on the basis packed by ``packing``
    (:class:`basis.Packing`); ``w`` comes back on ``shardings`` (the
    vectors', a leaf each), as it came in: orthogonalized against a basis
    split over every device, XLA would otherwise leave it split so too, and
    the next block would compile again.
  """
  basis = packing.pack(basis, lead=1)
  first = jax.tree.map(
      lambda b, x: jnp.where(place != 0, (x * place).astype(b.dtype), b[j]),
      basis, packing.pack(w))
  basis = basis_lib.put(basis, j, first)
  size = opts.size
  dtype = tree_math.accumulation_dtype(jax.tree.leaves(basis)[0].dtype)
  index = jnp.arange(size)

  def step(i, basis, t, table, may, hv):
    slot = j + i
    w, c, beta = basis_lib.orthogonalize(basis, hv,
                                         jnp.where(check, 0, slot + 1))
    c, beta = c.astype(dtype), beta.astype(dtype)
    q = tree_math.tree_scale(w, 1.0 / jnp.where(beta > 0, beta, 1.0))
    coupling = jnp.where(i > 0, table[jnp.maximum(i - 1, 0), 3],
                         t[slot, slot - 1])
    row = jnp.where(index == slot - 1, coupling, t[slot])
    row = jnp.where((index < slot) & arrow & (i == 0), c[:size], row)
    row = row.at[slot].set(c[slot])
    t = t.at[slot].set(row).at[:, slot].set(row)
    converged, near, broken, values = _test(t, slot + 1, beta, opts)
    entries = jnp.concatenate([jnp.stack([beta, near.astype(dtype)]),
                               values.astype(dtype)])
    return q, w, t, c, entries, (converged & may) | broken, may & ~near

  def body(carry):
    i, basis, _, t, _, table, may, _, v = carry
    hv, stats = pass_fn(params, packing.unpack(v), data)
    hv = packing.pack(hv)
    # In check mode the step orthogonalizes H q - lam q against no slot:
    # its beta is the residual.
    hv = jax.tree.map(lambda x, r: jnp.where(check, r, x), hv,
                      tree_math.tree_axpy(-lam[j + i], v, hv))
    q, w, t_step, c, entries, stop, may_step = step(i, basis, t, table, may,
                                                     hv)
    checked = jnp.full((2 + opts.k,), jnp.nan, dtype).at[0].set(entries[0])
    t = jnp.where(check, t, t_step)
    entries = jnp.where(check, checked, entries)
    may = jnp.where(check, may, may_step)
    # The next slot takes q, or keeps its Ritz vector in check mode. The
    # next product's vector is carried, not read from the basis again: a
    # read of the basis that its update need not wait for (the residual's
    # read of v) makes XLA copy the whole basis every step.
    v = jax.tree.map(lambda b, x: jnp.where(check, b, x.astype(b.dtype)),
                     basis_lib.get(basis, j + i + 1), q)
    basis = basis_lib.put(basis, j + i + 1, v)
    table = table.at[i].set(jnp.concatenate([stats.astype(dtype), entries]))
    return (i + 1, basis, w, t, c, table, may,
            (stop & ~check) | (stats[2] >= 0), v)

  v = basis_lib.get(basis, j)
  carry = (0, basis, v, t.astype(dtype), jnp.zeros((size + 1,), dtype),
           jnp.full((size, 5 + opts.k), jnp.nan, dtype),
           jnp.asarray(may_converge), False, v)
  if loop:
    carry = jax.lax.while_loop(lambda c: (c[0] < count) & ~c[7], body, carry)
  else:  # one step: XLA:CPU runs loop bodies without its fast kernels
    carry = body(carry)
  _, basis, w, t, c, table, _, _, _ = carry
  w = packing.unpack(w)
  w = jax.lax.with_sharding_constraint(
      w, jax.tree.unflatten(jax.tree.structure(w), shardings))
  return packing.unpack(basis, lead=1), w, t, c, table


def block(op, state: LanczosState, opts: _Options,
          pace: driver.Pace) -> LanczosState:
  """Steps in one program and one host read (data on the devices).

  The program stops itself after the step whose pairs it finds converged
  (or at a breakdown) and hands back ``T``; the host takes its record of
  every step but the last (wanted Ritz values, near-breakdowns), and
  decides on the last in float64 as :func:`record` does step by step.
  """
  place = 0.0
  if state.num_steps:
    if _plain_advance(state, opts):  # the program places q_{j+1}
      place = 1.0 / state.beta
    state = advance(op, state, opts, place=not place)
  op.note_pass_program("lanczos")
  count = min(pace.count(), opts.size - state.j,
              len(state.ritz) - state.num_steps)
  tick = time.perf_counter()
  args, static = _steps_arguments(
      op, opts, pace.loop, state.basis, state.w, place=place, t=state.t,
      j=state.j, count=count, arrow=state.j == state.kept and state.j > 0,
      may_converge=state.block == 0)
  basis, w, t, c, table = _steps(*args, **static)
  t, c, table = (sharding_lib.host_value(a).astype(np.float64)
                 for a in (t, c, table))
  ran = int(np.sum(~np.isnan(table[:, 0])))
  pace.took(time.perf_counter() - tick, ran)
  for i in range(ran):
    op.account(table[i, :3], f"at Lanczos step {state.num_steps + i}")
  history, first = state.ritz.copy(), state.block
  history[state.num_steps:state.num_steps + ran - 1] = table[:ran - 1, 5:]
  for i in np.flatnonzero(table[:ran - 1, 4] > 0):
    first = state.j + i + 1
  # Only the block's rows come from the device: the rest (a restart's Ritz
  # values and couplings) stays in float64, as step by step.
  filled = slice(state.j, state.j + ran)
  t_new = state.t.copy()
  t_new[filled], t_new[:, filled] = t[filled], t[:, filled]
  state = state._replace(basis=basis, w=w, t=t_new, j=state.j + ran - 1,
                         block=first, ritz=history,
                         num_steps=state.num_steps + ran - 1)
  return record(state, c, float(table[ran - 1, 3]), opts)


def continue_after_breakdown(op, basis, count, key):
  """A unit vector orthogonal to ``basis[:count]``, from a fresh random one.

  When ``beta`` is below rounding noise, the direction of ``w`` means
  nothing: span(Q) is invariant and its Ritz pairs exact. Lanczos goes on,
  uncoupled (``T[j, j+1] = 0``), from a random vector orthogonal to it, so
  eigenvalues outside it (more copies of a repeated one) can still be found.

  Returns:
    ``(w, key)``: the unit vector and the key for the next breakdown.
  """
  key, sub = jax.random.split(key)
  w, _, norm = basis_lib.orthogonalize(basis, op.random_vector(sub), count)
  norm = float(sharding_lib.host_value(norm))
  return basis_lib.scale(w, 1.0 / norm), key


def thick_restart(basis, t, j, beta, w, coupling, opts: _Options):
  """Keeps the ``l`` most wanted Ritz vectors of a full basis.

  With ``T = S diag(theta) S^T``, the new basis is ``[Q S_keep, w]`` and
  ``T`` becomes ``diag(theta_keep)`` bordered by the couplings
  ``coupling * S_{last, keep}`` to ``w`` (Wu and Simon, 2000), so
  ``H Q = Q T + r e^T`` still holds and memory stays at ``m + 1`` vectors.

  Args:
    basis: the full basis (donated).
    t: ``T``, ``(m, m)``.
    j: the last slot, ``m - 1``.
    beta: ``||w||`` before normalization (for the Ritz residuals).
    w: the unit next vector, or None to leave slot ``l`` to the caller.
    coupling: ``T[j, j+1]``: ``beta``, or 0 after a breakdown.
    opts: the run's options.

  Returns:
    ``(basis, t, l)``: the restarted basis with ``w`` in slot ``l``.
  """
  theta, s, _ = ritz(t, j, beta)
  m = opts.size
  keep = order(theta, opts.which)[:max(opts.k, min(m - 1, opts.k + (m - opts.k) // 2))]
  y = np.zeros((m + 1, m + 1))
  y[:m, :len(keep)] = s[:, keep]
  dtype = jax.tree.leaves(basis)[0].dtype
  basis = basis_lib.rotate(basis, np.asarray(y, dtype))
  l = len(keep)
  if w is not None:
    basis = basis_lib.put(basis, l, w)
  t = np.zeros_like(t)
  t[np.arange(l), np.arange(l)] = theta[keep]
  t[:l, l] = t[l, :l] = coupling * s[-1, keep]
  return basis, t, l


def _plain_advance(state: LanczosState, opts: _Options) -> bool:
  """Whether :func:`advance`'s next vector is ``w / beta`` (no breakdown)."""
  theta, _, _ = ritz(state.t, state.j, state.beta)
  return state.beta > opts.tiny * max(np.abs(theta).max(), 1e-300)


def advance(op, state: LanczosState, opts: _Options,
            place: bool = True) -> LanczosState:
  """Puts the next basis vector in place: ``q_{j+1} = w / beta``.

  After a near-breakdown a new block starts; after a breakdown the next
  vector comes from :func:`continue_after_breakdown`; a full basis is
  restarted by :func:`thick_restart`. Without ``place`` (only for a
  :func:`_plain_advance`), the next vector is left out of its slot, the
  new ``j``, for a block program to place.
  """
  j, t = state.j, state.t.copy()
  theta, _, _ = ritz(t, j, state.beta)
  tnorm = max(np.abs(theta).max(), 1e-300)
  block, key = state.block, state.key
  if _near_breakdown(state.beta, theta, opts.tiny / 100):
    block = j + 1
  scale = 1.0  # the next vector is w * scale
  if state.beta <= opts.tiny * tnorm:
    w, key = continue_after_breakdown(op, state.basis, j + 1, key)
    coupling = 0.0
  elif place:
    w, coupling, scale = state.w, state.beta, 1.0 / state.beta
  else:
    w, coupling = None, state.beta
  if j + 1 < opts.size:
    t[j, j + 1] = t[j + 1, j] = coupling
    basis = (basis_lib.put(state.basis, j + 1, w, scale) if place
             else state.basis)
    return state._replace(basis=basis, t=t, j=j + 1, block=block, key=key)
  if scale != 1.0:
    w = basis_lib.scale(w, scale)
  basis, t, l = thick_restart(state.basis, t, j, state.beta, w, coupling,
                              opts)
  return state._replace(basis=basis, t=t, j=l, kept=l, block=0, key=key)


def step(op, state: LanczosState, opts: _Options,
         pace: driver.Pace | None = None) -> LanczosState:
  """Places the pending vector (after the first step), then one product
  (``pace`` None: the data streams), or a block of them in one program
  (:func:`block`)."""
  if pace is not None:
    return block(op, state, opts, pace)
  if state.num_steps:
    state = advance(op, state, opts)
  return expand(op, state, opts)


@functools.partial(jax.jit, static_argnames="packing")
def _residual(hv, v, lam, packing=None):
  """``||Hv - lambda v||``, on the vectors packed by ``packing`` if any."""
  if packing is not None:
    hv, v = packing.pack(hv), packing.pack(v)
  return tree_math.tree_norm(tree_math.tree_axpy(-lam, v, hv))


def residual_norms(op, vectors, lam) -> np.ndarray:
  """``||H v_i - lambda_i v_i||`` for stacked vectors, one product each."""
  packing = basis_lib.packing(op.template, op.shardings, vectors)
  return np.array([float(sharding_lib.host_value(_residual(
      op.matvec(basis_lib.get(vectors, i), where=f"for eigenpair {i}"),
      basis_lib.get(vectors, i), lam[i], packing)))
                   for i in range(len(lam))])


def _checked_in_blocks(op, state, y, lam, opts: _Options, pace: driver.Pace):
  """The Ritz vectors ``Q y`` and their explicit residuals, by the block
  program in its ``check`` mode (the pass compiled once for both).

  Returns:
    ``(vectors, residuals)``: the vectors stacked on a leading axis.
  """
  op.note_pass_program("lanczos")
  p = len(lam)
  square = np.zeros((opts.size + 1, opts.size + 1))
  square[:, :p] = y
  dtype = jax.tree.leaves(state.basis)[0].dtype
  ritz_basis = basis_lib.rotate(state.basis, np.asarray(square, dtype))
  padded = np.zeros(opts.size)
  padded[:p] = lam
  tables = []
  for start in range(0, p, p if pace.loop else 1):
    args, static = _steps_arguments(
        op, opts, pace.loop, ritz_basis, state.w, j=start,
        count=p - start if pace.loop else 1, may_converge=False, lam=padded,
        check=True)
    ritz_basis, _, _, _, table = _steps(*args, **static)
    tables.append(table)
  rows = np.concatenate([sharding_lib.host_value(t).astype(np.float64)[
      :p if pace.loop else 1] for t in tables])
  for i, row in enumerate(rows):
    op.account(row[:3], f"for eigenpair {i}")
  vectors = basis_lib.head(ritz_basis, p)
  return vectors, rows[:, 3]


def meets_tol(lam, residuals, tol, dtype):
  """Whether each explicit residual meets ``tol`` (see ``converged``)."""
  lam = np.asarray(lam, np.float64)
  floor = 10 * float(jnp.finfo(dtype).eps) * np.abs(lam).max(initial=0.0)
  return np.asarray(residuals) <= np.maximum(tol * np.abs(lam), floor)


def warn_unconverged(name, k, lam, residuals, ok, tol, why):
  """A :class:`ConvergenceWarning` naming what fell short, if anything did."""
  problems = []
  if len(lam) < k:
    problems.append(f"found {len(lam)} of the {k} pairs asked for")
  bad = np.flatnonzero(~ok)
  if len(bad):
    relative = np.asarray(residuals) / np.maximum(np.abs(lam), 1e-300)
    problems.append("pairs " + ", ".join(
        f"{i} (eigenvalue {lam[i]:.6g}, relative residual {relative[i]:.2g})"
        for i in bad) + f" do not meet tol={tol:g}")
  if problems:
    warnings.warn(f"{name}: " + "; ".join(problems) + f" ({why}).",
                  ConvergenceWarning, stacklevel=5)


def result(op, state: LanczosState, run: driver.Run,
           opts: _Options, pace: driver.Pace | None = None) -> LanczosResult:
  """Ritz pairs of the last ``T``, each checked with one more product.

  ``converged`` comes from those explicit residuals, not from the
  recurrence's estimates (unless ``opts.check_residuals`` is off).
  """
  theta, s, res = ritz(state.t, state.j, state.beta)
  wanted = order(theta, opts.which)[:opts.k]
  y = np.zeros((opts.size + 1, len(wanted)))
  y[:state.j + 1] = s[:, wanted]
  dtype = jax.tree.leaves(state.basis)[0].dtype
  lam = theta[wanted]
  if opts.check_residuals and pace is not None:
    vectors, residuals = _checked_in_blocks(op, state, y, lam, opts, pace)
  else:
    vectors = basis_lib.combine(state.basis, np.asarray(y, dtype))
  vectors = sharding_lib.put(vectors, sharding_lib.stacked(op.shardings))
  if opts.check_residuals and pace is None:
    residuals = residual_norms(op, vectors, lam)
  elif not opts.check_residuals:
    residuals = res[wanted]
  ok = meets_tol(lam, residuals, opts.tol, dtype)
  converged = len(lam) == opts.k and bool(np.all(ok))
  if not converged:
    warn_unconverged(
        f"lanczos {opts.which} k={opts.k}", opts.k, lam, residuals, ok,
        opts.tol, f"{run.num_hvps} products" + (
            ", max_hvps reached" if run.stopped_by == "max_hvps" else ""))
  return LanczosResult(
      eigenvalues=lam, eigenvectors=vectors, residuals=residuals,
      residual_estimates=res[wanted],
      num_hvps=run.num_hvps + len(lam) * opts.check_residuals,
      converged=converged, ritz_history=state.ritz[:state.num_steps],
      gap_ratio=float(lam[0] / lam[1]) if len(lam) > 1 and lam[1] else np.inf,
      loss=op.loss_value, krylov_hvps=run.num_hvps,
      residual_hvps=len(lam) * opts.check_residuals)


def default_ncv(k: int) -> int:
  """The basis size ``lanczos`` keeps for ``k`` pairs by default."""
  return max(2 * k + 1, 20)


@api.takes_operator
def lanczos(op: operator_lib.HessianOperator, k: int, *, which: str = "LA",
            key=None, ncv: int | None = None, tol: float = 1e-6,
            max_hvps: int = 1000, v0=None, show_pbar: bool = True,
            checkpointer=None, steps_per_call: int | str | None = "auto",
            basis_dtype=None, check_residuals: bool = True) -> LanczosResult:
  """``k`` eigenpairs of the Hessian of the dataset loss, by Lanczos.

  Also callable as ``lanczos(loss, params, batch_iterable, k, ...)`` with
  the keyword options of :class:`HessianOperator` (``batch_parser``,
  ``mesh``, ``shardings``, ``subset``, ``loss_rng``, ...).

  Args:
    op: the operator.
    k: how many eigenpairs.
    which: ``'LA'`` largest algebraic, ``'SA'`` smallest algebraic (most
      negative curvature), ``'LM'`` largest magnitude (scipy's names).
    key: PRNG key for the starting vector (default ``jax.random.key(0)``).
    ncv: the most basis vectors kept (memory: ``ncv + 1`` parameter-sized
      vectors); default ``max(2k + 1, 20)``.
    tol: a bound on the relative residual: stop when every pair's
      estimate of ``||H v - lambda v||`` is at most ``tol * |lambda|``, and
      call the result converged when the explicit residuals meet it too.
      ``tol=0`` asks for the working precision (as in scipy's ``eigsh``):
      ``eps`` of the vectors' dtype.
    max_hvps: stop after this many Hessian-vector products (the ``k``
      explicit residual checks come on top).
    v0: a starting vector shaped like the parameters.
    show_pbar: a tqdm bar over the products.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``: the basis and
      the recurrence's state are saved after steps and restored, if saved
      before, at the start.
    steps_per_call: with the data on the devices (in one program), steps
      (product, reorthogonalization, ``T``, the stopping test) run in
      compiled blocks, one program and one host read each, that stop
      themselves after the step whose Ritz pairs meet ``tol`` (the host
      re-checks in float64 and takes exactly the steps it would take one at
      a time); the explicit residual checks run in the same program.
      ``'auto'`` (the default) sizes the blocks to about a second each (so
      a SIGTERM and the progress bar wait no longer), and keeps to single
      steps on the operator's pass where compiled loops are slow
      (``HessianOperator.loops_run_fast``: XLA:CPU with convolutions) or
      where another compiled program holding the pass has run on the
      operator (``op.matvec``'s, another method's loop:
      ``driver.loops_pay``; the block program holds its own copy of the
      pass, which would cost the pass's compile again); a number fixes the
      block length; None runs a step at a time on the operator's own
      compiled pass (``op.matvec``), as streamed data always does.
    basis_dtype: the Krylov basis's dtype; by default the parameters' but
      at least float32 (products are taken in the parameters' dtypes; the
      scalars of ``T`` are float32 or wider). ``jnp.bfloat16`` halves the
      basis's memory for bfloat16 parameters and loses orthogonality.
    check_residuals: take one more product per pair to check its residual
      (the default, and what ``converged`` then rests on). False trusts the
      recurrence's estimates instead, as scipy's ``eigsh`` (ARPACK) does,
      saving ``k`` products; the estimates can fall below what the working
      precision attains.

  Returns:
    A :class:`LanczosResult`; its eigenvectors are in the basis's dtype.
  """
  n = tree_math.tree_size(op.template)
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"k must be an integer from 1 to the number of "
                     f"parameters ({n}); got {k!r}.")
  ncv = default_ncv(k) if ncv is None else ncv
  if not isinstance(ncv, (int, np.integer)) or ncv <= k and ncv < n:
    raise ValueError(f"ncv must be an integer larger than k={k}; got {ncv!r}.")
  if not tol >= 0:
    raise ValueError(f"tol must be a non-negative number, got {tol!r}.")
  if not max_hvps >= 1:
    raise ValueError(f"max_hvps must be at least 1, got {max_hvps!r}.")
  key = jax.random.key(0) if key is None else key
  # The recurrence's rounding is the basis's: breakdown thresholds scale with
  # its eps (a bfloat16 eps would call every step of a float32 basis a
  # breakdown).
  dtype = jnp.result_type(*jax.tree.leaves(op.template))
  eps = float(jnp.finfo(tree_math.accumulation_dtype(dtype) if basis_dtype
                        is None else basis_dtype).eps)
  opts = _Options(k=k, which=which, tol=max(tol, eps), size=min(ncv, n),
                  dimension=n, tiny=100 * eps,
                  check_residuals=bool(check_residuals))
  if not (steps_per_call is None or steps_per_call == "auto" or (
      isinstance(steps_per_call, (int, np.integer)) and steps_per_call >= 1)):
    raise ValueError("steps_per_call must be None, 'auto' or a positive "
                     f"integer; got {steps_per_call!r}.")
  pace = None
  if steps_per_call == "auto" and driver.loops_pay(op, "lanczos"):
    # The step time is remembered on the operator (and its with_params
    # copies) for each basis size: a later call starts with full blocks.
    pace = driver.Pace(None,
                       memory=op.remembered(("lanczos steps", opts.size)))
  elif steps_per_call not in (None, "auto") and op.pass_program() is not None:
    pace = driver.Pace(int(steps_per_call))
  v0 = None if v0 is None else power.unit_start(op, v0, key, "v0")
  if pace is not None:
    compile_first(op, opts, pace, v0, key, basis_dtype)
  state = init(op, v0, size=opts.size,
               max_hvps=max_hvps, k=k, key=key, basis_dtype=basis_dtype)
  method = driver.Method(
      name=f"lanczos {which} k={k}",
      step=lambda op, s: step(op, s, opts, pace),
      done=lambda s: s.converged or s.exhausted,
      planned_hvps=max_hvps,
      postfix=lambda s: {"ritz": f"{s.ritz[s.num_steps - 1, 0]:.6g}"})
  run = driver.run(op, method, state, max_hvps=max_hvps,
                   checkpointer=checkpointer, show_pbar=show_pbar)
  return result(op, run.state, run, opts, pace)


class Decomposition(NamedTuple):
  """``H Q = Q T + r e_m^T`` from :func:`tridiagonalize`.

  Attributes:
    basis: ``Q``, a parameter-shaped pytree with a leading axis of
      ``num_steps + 1`` slots, of which the first ``num_steps`` are used.
    tridiagonal: ``T``, ``(num_steps, num_steps)`` float64.
    residual: ``r = beta_m q_{m+1}``, a vector like the parameters.
    num_steps: the steps taken: fewer than asked if ``H`` left the span of
      ``Q`` invariant (breakdown), when ``T``'s eigenvalues are exact.
  """
  basis: Any
  tridiagonal: np.ndarray
  residual: Any
  num_steps: int


def tridiagonalize(op: operator_lib.HessianOperator, v0,
                   num_steps: int) -> Decomposition:
  """``num_steps`` Lanczos steps from ``v0``, no restart, full reorthogonalization.

  The building block of stochastic Lanczos quadrature: the eigenvalues of
  ``T`` are Gauss quadrature nodes of the spectral measure seen from ``v0``,
  and the squared first components of its eigenvectors the weights.
  """
  num_steps = min(num_steps, tree_math.tree_size(op.template))
  basis = basis_lib.zeros(op.template, num_steps + 1, op.shardings)
  norm = float(sharding_lib.host_value(tree_math.tree_norm(v0)))
  basis = basis_lib.put(basis, 0, v0, 1.0 / norm)
  tiny = 100 * float(jnp.finfo(jax.tree.leaves(basis)[0].dtype).eps)
  t = np.zeros((num_steps, num_steps))
  for j in range(num_steps):
    w = op.matvec(basis_lib.get(basis, j), where=f"at Lanczos step {j}")
    w, c, beta = basis_lib.orthogonalize(basis, w, j + 1)
    t[j, j] = float(sharding_lib.host_value(c)[j])
    beta = float(sharding_lib.host_value(beta))
    if j + 1 == num_steps:
      break
    if beta <= tiny * max(np.abs(np.diag(t)[:j + 1]).max(), 1e-300):
      return Decomposition(basis, t[:j + 1, :j + 1], w, j + 1)
    basis = basis_lib.put(basis, j + 1, w, 1.0 / beta)
    t[j, j + 1] = t[j + 1, j] = beta
  return Decomposition(basis, t, w, num_steps)


@functools.partial(jax.jit, donate_argnums=0)
def _step_many(bases, w, count, keep):
  """Reorthogonalizes each probe's product; the next slots, and ``T``'s
  entries. Probes past a breakdown (``keep`` False) get a zero vector."""
  w, c, beta = jax.vmap(basis_lib.orthogonalize,
                        in_axes=(0, 0, None))(bases, w, count)
  scale = jnp.where(keep & (beta > 0), 1.0 / jnp.where(beta > 0, beta, 1.0),
                    0.0)
  bases = jax.vmap(lambda b, v, a: basis_lib.put(
      b, count, tree_math.tree_scale(v, a)))(bases, w, scale)
  return bases, jnp.stack([c[:, count - 1], beta], axis=1)


@functools.partial(jax.jit,
                   static_argnames=("pass_fn", "num_steps", "packing"))
def _tridiagonalize_loop(params, bases, data, tiny, *, pass_fn, num_steps,
                         packing):
  """:func:`tridiagonalize_many`'s steps as one compiled loop, on the bases
  packed by ``packing`` (:class:`basis.Packing`).

  Returns:
    ``(table, stats)``: per step and probe ``[alpha, beta, kept]``
    ``(num_steps, P, 3)`` (``kept``: the probe had not broken down before
    this step) and the passes' ``[count, loss, bad]`` ``(num_steps, P, 3)``,
    NaN after the last step run (when every probe had broken down, or
    after a non-finite product).
  """
  count = jax.tree.leaves(bases)[0].shape[0]
  dtype = tree_math.accumulation_dtype(jax.tree.leaves(bases)[0].dtype)
  bases = packing.pack(bases, lead=2)

  def body(carry):
    j, bases, keep, top, table, rows, _ = carry
    w, stats = jax.vmap(pass_fn, in_axes=(None, 0, None))(
        params, packing.unpack(jax.tree.map(lambda b: b[:, j], bases),
                               lead=1), data)
    bases, entries = _step_many(bases, packing.pack(w, lead=1), j + 1, keep)
    entries = entries.astype(dtype)
    top = jnp.maximum(top, jnp.abs(entries[:, 0]))
    broken = keep & (entries[:, 1] <= tiny * top) & (j + 1 < num_steps)
    table = table.at[j].set(jnp.concatenate(
        [entries, keep.astype(dtype)[:, None]], axis=1))
    return (j + 1, bases, keep & ~broken, top, table,
            rows.at[j].set(stats.astype(dtype)), jnp.any(stats[:, 2] >= 0))

  carry = (0, bases, jnp.ones(count, bool), jnp.zeros(count, dtype),
           jnp.full((num_steps, count, 3), jnp.nan, dtype),
           jnp.full((num_steps, count, 3), jnp.nan, dtype), False)
  carry = jax.lax.while_loop(
      lambda c: (c[0] < num_steps) & jnp.any(c[2]) & ~c[6], body, carry)
  return carry[4], carry[5]


def tridiagonalize_many(op: operator_lib.HessianOperator, keys,
                        num_steps: int) -> list[np.ndarray]:
  """:func:`tridiagonalize` for Rademacher probes, products in one pass each.

  Probe ``i`` is ``op.random_vector(keys[i], kind='rademacher')``, drawn,
  scaled and placed in its basis in one program (kept on the operator).

  Every step is one batched pass over the data for all probes
  (``op.matvecs``: the data is read once, the products share it); where
  compiled loops run fast (``op.loops_run_fast()``) all the steps are one
  program and one host read, otherwise a program and a read a step. Memory
  is a basis per probe.

  Args:
    op: the operator.
    keys: ``P`` PRNG keys, one per probe.
    num_steps: Lanczos steps per probe.

  Returns:
    ``P`` tridiagonal matrices, each truncated at its probe's breakdown.
  """
  count = len(keys)
  num_steps = min(num_steps, tree_math.tree_size(op.template))
  size = num_steps + 1
  programs = op.remembered(("slq start", count, size))
  first = "start" not in programs
  if first:
    programs["start"] = basis_lib.stack_start_program(
        op.template, count, size, op.shardings, operator_lib.random_draw(
            op.template, op.shardings, "rademacher"))
  start = programs["start"]
  abstract = jax.eval_shape(start, keys)
  tiny = 100 * float(jnp.finfo(jax.tree.leaves(abstract)[0].dtype).eps)
  t = np.zeros((count, num_steps, num_steps))
  steps = np.full(count, num_steps)
  if op.loops_run_fast():
    pass_fn, data = op.pass_program()
    op.note_pass_program("slq")
    static = dict(pass_fn=pass_fn, num_steps=num_steps,
                  packing=basis_lib.packing(op.template, op.shardings,
                                            abstract))
    if first:  # the start compiles beside the loop
      driver.compile_together((_tridiagonalize_loop,
                               (op.params, abstract, data, tiny), static),
                              [(start, keys)])
    table, stats = (sharding_lib.host_value(a).astype(np.float64)
                    for a in _tridiagonalize_loop(
                        op.params, start(keys), data, tiny, **static))
    for j in range(num_steps):
      if np.isnan(stats[j, 0, 0]):
        break
      for p in range(count):
        op.account(stats[j, p], f"at Lanczos step {j}, vector {p}")
      for p in np.flatnonzero(table[j, :, 2] > 0):
        t[p, j, j] = table[j, p, 0]
        if j + 1 == num_steps:
          continue
        if table[j + 1, p, 2] > 0:  # NaN (the loop had ended) is a breakdown
          t[p, j, j + 1] = t[p, j + 1, j] = table[j, p, 1]
        else:
          steps[p] = j + 1
    return [t[p, :steps[p], :steps[p]] for p in range(count)]
  bases = start(keys)
  keep = np.ones(count, bool)
  for j in range(num_steps):
    w = op.matvecs(jax.tree.map(lambda b: b[:, j], bases),
                   where=f"at Lanczos step {j}")
    bases, entries = _step_many(bases, w, j + 1, jnp.asarray(keep))
    entries = np.asarray(sharding_lib.host_value(entries), np.float64)
    for p in np.flatnonzero(keep):
      t[p, j, j] = entries[p, 0]
      if j + 1 == num_steps:
        continue
      beta = entries[p, 1]
      if beta <= tiny * max(np.abs(np.diag(t[p])[:j + 1]).max(), 1e-300):
        keep[p], steps[p] = False, j + 1
      else:
        t[p, j, j + 1] = t[p, j + 1, j] = beta
    if not keep.any():
      break
  return [t[p, :steps[p], :steps[p]] for p in range(count)]
