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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm

from deeplanczos._src import basis as basis_lib
from deeplanczos._src import operator as operator_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math

WHICH = ("LA", "SA", "LM")


class LanczosResult(NamedTuple):
  """Eigenpairs from :func:`lanczos`.

  Attributes:
    eigenvalues: ``(k,)`` float64, ordered as ``which`` asks: ``'LA'``
      descending, ``'SA'`` ascending, ``'LM'`` by descending magnitude.
    eigenvectors: a pytree shaped like the parameters with a leading axis of
      ``k``; ``jax.tree.map(lambda x: x[i], eigenvectors)`` is the ``i``-th
      unit eigenvector, with the parameters' shardings.
    residuals: ``(k,)``, ``||H v_i - lambda_i v_i||`` of each returned pair,
      computed explicitly (``k`` more products) in the working precision.
    residual_estimates: ``(k,)``, the same from the recurrence
      (``|beta s_{m,i}|``), which the stopping rule uses; it can fall below
      what the working precision attains, so trust ``residuals``.
    num_hvps: Hessian-vector products used, each one full pass over the data
      (the ``k`` of the explicit residuals included).
    converged: whether every pair met ``residual <= tol * |lambda|``.
    ritz_history: ``(steps, k)`` the wanted Ritz values after every step
      (NaN before ``k`` exist), to see convergence.
    gap_ratio: ``lambda_1 / lambda_2``: near 1 means the top two are close
      and the eigenvectors are ill-determined.
    loss: the dataset loss at the parameters.
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


def order(theta: np.ndarray, which: str) -> np.ndarray:
  """Indices of ``theta`` from most to least wanted under ``which``."""
  if which == "LA":
    return np.argsort(-theta, kind="stable")
  if which == "SA":
    return np.argsort(theta, kind="stable")
  return np.argsort(-np.abs(theta), kind="stable")


class _State:
  """The host side of the recurrence: ``T``, the coupling, the slot count."""

  def __init__(self, size):
    self.t = np.zeros((size, size))
    self.j = 0          # the slot whose H q_j comes next
    self.kept = 0       # Ritz vectors kept by the last restart
    self.block = 0      # the first slot after the last breakdown
    self.beta = 0.0     # ||w|| after the last step

  def ritz(self, start=0):
    """Ritz values, vectors and residuals of ``T[start:j+1, start:j+1]``."""
    theta, s = np.linalg.eigh(self.t[start:self.j + 1, start:self.j + 1])
    return theta, s, np.abs(self.beta * s[-1])


def _block_done(state, which, tol, tiny):
  """Whether the block since the last breakdown holds nothing more to find.

  Its extreme Ritz values (both ends for 'LM') converge first and from
  inside; once they have, the block's eigenvalues are no more wanted than
  them, and the caller compares them with the wanted ones through ``T``.
  """
  theta, _, res = state.ritz(state.block)
  ends = [np.argmax(theta), np.argmin(theta)]
  ends = ends if which == "LM" else ends[:1] if which == "LA" else ends[1:]
  scale = np.maximum(np.abs(theta[ends]), tiny * np.abs(theta).max())
  return bool(np.all(res[ends] <= tol * scale))


@jax.jit
def _residual(hv, v, lam):
  """``||Hv - lambda v||``."""
  return tree_math.tree_norm(tree_math.tree_axpy(-lam, v, hv))


def nan_to_none(rows):
  """Rows of floats for JSON, which has no NaN: NaN becomes None."""
  return [[None if np.isnan(x) else float(x) for x in r] for r in rows]


def _lanczos(op, k, *, which, ncv, tol, max_hvps, key, v0, show_pbar,
             checkpointer=None):
  n = tree_math.tree_size(op.template)
  m = min(ncv, n)
  basis = basis_lib.zeros(op.template, m + 1, op.shardings)
  v = op.random_vector(key) if v0 is None else v0
  basis = basis_lib.put(basis, 0, v)
  dtype = jnp.result_type(*jax.tree.leaves(op.template))
  tiny = 100 * float(jnp.finfo(dtype).eps)
  state = _State(m)
  history = []
  restart_key = key
  earlier = 0  # products before a restore from a checkpoint
  if checkpointer is not None and (
      saved := checkpointer.restore({"basis": basis})):
    basis, meta = saved[0]["basis"], saved[1]
    state.t = np.array(meta["t"], np.float64)
    state.j, state.kept, state.block = meta["j"], meta["kept"], meta["block"]
    state.beta = meta["beta"]
    history = [np.array(r, np.float64) for r in meta["history"]]
    restart_key = jax.random.wrap_key_data(np.array(meta["key"], np.uint32))
    earlier = meta["hvps"]
  first = op.num_matvecs - earlier  # the operator may have run before
  bar = tqdm.tqdm(total=max_hvps, initial=earlier,
                  desc=f"lanczos {which} k={k}", disable=not show_pbar)
  while True:
    if checkpointer is not None and op.num_matvecs - first > earlier:
      checkpointer.save(op.num_matvecs - first, {"basis": basis}, {
          "t": state.t.tolist(), "j": state.j, "kept": state.kept,
          "block": state.block, "beta": state.beta,
          "history": nan_to_none(history),
          "key": np.asarray(jax.random.key_data(restart_key)).tolist(),
          "hvps": op.num_matvecs - first})
    j = state.j
    w = op.matvec(basis_lib.get(basis, j), where=f"at Lanczos step {len(history)}")
    w, c, beta = basis_lib.orthogonalize(basis, w, j + 1)
    c = sharding_lib.host_value(c).astype(np.float64)
    beta = float(sharding_lib.host_value(beta))
    state.t[j, j] = c[j]
    if j == state.kept and j > 0:  # first step after a restart: the arrow
      state.t[:j, j] = state.t[j, :j] = c[:j]
    state.beta = beta
    theta, s, res = state.ritz()
    wanted = order(theta, which)[:k]
    row = np.full(k, np.nan)
    row[:len(wanted)] = theta[wanted]
    history.append(row)
    bar.update(1)
    bar.set_postfix(ritz=f"{theta[wanted[0]]:.6g}")
    scale = np.maximum(np.abs(theta[wanted]), tiny * np.abs(theta).max())
    # When beta falls to the HVP's rounding noise, span(Q) is (nearly)
    # invariant: its Ritz pairs are exact, but eigenvalues outside it (more
    # copies of a repeated one) are unseen, so that is never the end while
    # dimensions remain. The next vector starts a new block, explored until
    # its own extreme Ritz values converge. Below ``tiny`` the direction of w
    # is meaningless: the coupling is dropped and a random vector is taken.
    tnorm = max(np.abs(theta).max(), 1e-300)
    near_breakdown = beta <= np.sqrt(float(jnp.finfo(dtype).eps)) * tnorm
    done = (len(wanted) == k and np.all(res[wanted] <= tol * scale)
            and not near_breakdown
            and (state.block == 0 or _block_done(state, which, tol, tiny)))
    if done or op.num_matvecs - first >= max_hvps or j + 1 == n:
      break
    if near_breakdown:
      state.block = j + 1
    if beta <= tiny * tnorm:
      # Continue from a random vector orthogonal to span(Q), uncoupled.
      restart_key, sub = jax.random.split(restart_key)
      w, _, norm = basis_lib.orthogonalize(basis, op.random_vector(sub), j + 1)
      norm = float(sharding_lib.host_value(norm))
      coupling = 0.0
    else:
      norm, coupling = beta, beta
    w = basis_lib.scale(w, 1.0 / norm)
    if j + 1 < m:
      basis = basis_lib.put(basis, j + 1, w)
      state.t[j, j + 1] = state.t[j + 1, j] = coupling
      state.j = j + 1
      continue
    # Thick restart: keep the l most wanted Ritz vectors of T.
    keep = order(theta, which)[:max(k, min(m - 1, k + (m - k) // 2))]
    y = np.zeros((m + 1, m + 1))
    y[:m, :len(keep)] = s[:, keep]
    basis = basis_lib.rotate(basis, jnp.asarray(y, dtype))
    l = len(keep)
    basis = basis_lib.put(basis, l, w)
    state.t[:] = 0
    state.t[np.arange(l), np.arange(l)] = theta[keep]
    state.t[:l, l] = state.t[l, :l] = coupling * s[-1, keep]
    state.j = state.kept = l
    state.block = 0
  bar.close()
  y = np.zeros((m + 1, k))
  y[:j + 1, :len(wanted)] = s[:, wanted]
  vectors = basis_lib.combine(basis, jnp.asarray(y, dtype))
  lam = theta[wanted]
  residuals = np.array([
      float(sharding_lib.host_value(_residual(
          op.matvec(basis_lib.get(vectors, i), where=f"for eigenpair {i}"),
          basis_lib.get(vectors, i), lam[i])))
      for i in range(len(lam))])
  return LanczosResult(
      eigenvalues=lam, eigenvectors=vectors, residuals=residuals,
      residual_estimates=res[wanted],
      num_hvps=op.num_matvecs - first, converged=bool(done),
      ritz_history=np.array(history),
      gap_ratio=float(lam[0] / lam[1]) if len(lam) > 1 and lam[1] else np.inf,
      loss=op.loss_value)


def lanczos(loss: Callable, params, batch_iterable, k: int, *,
            which: str = "LA", batch_parser: Callable | None = None,
            key=None, ncv: int | None = None, tol: float = 1e-6,
            max_hvps: int = 1000, v0=None, mesh=None, shardings=None,
            data_axis: str = "data", subset=None, show_pbar: bool = True,
            checkpointer=None, loss_rng=None) -> LanczosResult:
  """``k`` eigenpairs of the Hessian of the dataset loss, by Lanczos.

  Args:
    loss: ``loss(params, x, y) -> scalar``, the mean loss of a batch.
    params: the parameters at which the Hessian is taken.
    batch_iterable: a re-iterable of batches or a zero-argument callable, as
      for ``PowerMethodIterate``.
    k: how many eigenpairs.
    which: ``'LA'`` largest algebraic, ``'SA'`` smallest algebraic (most
      negative curvature), ``'LM'`` largest magnitude (scipy's names).
    batch_parser: ``batch -> (x, y)`` or ``(x, y, mask)``.
    key: PRNG key for the starting vector (default ``jax.random.key(0)``).
    ncv: the most basis vectors kept (memory: ``ncv + 1`` parameter-sized
      vectors); default ``max(2k + 1, 20)``.
    tol: stop when every pair has ``||H v - lambda v|| <= tol * |lambda|``.
    max_hvps: stop after this many Hessian-vector products.
    v0: a starting vector shaped like the parameters.
    mesh, shardings, data_axis: as for ``PowerMethodIterate``.
    subset: restrict to some parameters (a regular expression on parameter
      paths, or a predicate); vectors then hold only those leaves.
    show_pbar: a tqdm bar over the products.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``: the basis and
      the recurrence's state are saved after steps and restored, if saved
      before, at the start.
    loss_rng: a PRNG key for losses that take one (dropout): the loss is
      then ``loss(params, x, y, rng)``, ``rng`` fixed per batch and device
      (see ``HessianOperator``), so every pass applies the same ``H``.

  Returns:
    A :class:`LanczosResult`.
  """
  op = operator_lib.HessianOperator(
      loss, params, batch_iterable, batch_parser=batch_parser, mesh=mesh,
      shardings=shardings, data_axis=data_axis, subset=subset,
      show_pbar=show_pbar, loss_rng=loss_rng)
  return lanczos_operator(op, k, which=which, key=key, ncv=ncv, tol=tol,
                          max_hvps=max_hvps, v0=v0, show_pbar=show_pbar,
                          checkpointer=checkpointer)


def lanczos_operator(op: operator_lib.HessianOperator, k: int, *,
                     which: str = "LA", key=None, ncv: int | None = None,
                     tol: float = 1e-6, max_hvps: int = 1000, v0=None,
                     show_pbar: bool = False,
                     checkpointer=None) -> LanczosResult:
  """:func:`lanczos` on an existing :class:`HessianOperator`."""
  n = tree_math.tree_size(op.template)
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"k must be an integer from 1 to the number of "
                     f"parameters ({n}); got {k!r}.")
  ncv = max(2 * k + 1, 20) if ncv is None else ncv
  if not isinstance(ncv, (int, np.integer)) or ncv <= k and ncv < n:
    raise ValueError(f"ncv must be an integer larger than k={k}; got {ncv!r}.")
  if not tol > 0:
    raise ValueError(f"tol must be positive, got {tol!r}.")
  if not max_hvps >= 1:
    raise ValueError(f"max_hvps must be at least 1, got {max_hvps!r}.")
  if v0 is not None:
    v0 = op.check_vector(v0)
    norm = float(sharding_lib.host_value(tree_math.tree_norm(v0)))
    if not norm > 0:
      raise ValueError(f"v0 must be a non-zero, finite vector; its norm is {norm}.")
    v0 = basis_lib.scale(v0, 1.0 / norm)
  key = jax.random.key(0) if key is None else key
  return _lanczos(op, k, which=which, ncv=ncv, tol=tol, max_hvps=max_hvps,
                  key=key, v0=v0, show_pbar=show_pbar,
                  checkpointer=checkpointer)


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
  basis = basis_lib.put(basis, 0, basis_lib.scale(v0, 1.0 / norm))
  dtype = jnp.result_type(*jax.tree.leaves(op.template))
  tiny = 100 * float(jnp.finfo(dtype).eps)
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
    basis = basis_lib.put(basis, j + 1, basis_lib.scale(w, 1.0 / beta))
    t[j, j + 1] = t[j + 1, j] = beta
  return Decomposition(basis, t, w, num_steps)
