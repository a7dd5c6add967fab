"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``m`` Lanczos steps give ``T``; its eigenvalues
``theta_i`` and the squared first components ``tau_i = s_{0i}^2`` of its
eigenvectors are the nodes and weights of an ``m``-point Gauss quadrature of
the spectral measure ``sum_j <v, u_j>^2 delta(t - lambda_j)``, whose
expectation over random probes is the eigenvalue density
``(1/n) sum_j delta(t - lambda_j)``. Averaging over probes and broadening each
node by a Gaussian gives a smooth density (Ghorbani et al., 2019).
"""

from typing import NamedTuple

import jax
import numpy as np

from deeplanczos._src import api
from deeplanczos._src import driver
from deeplanczos._src import lanczos as lanczos_lib
from deeplanczos._src import plan as plan_lib


class DensityResult(NamedTuple):
  """The output of :func:`spectral_density`.

  Attributes:
    grid: ``(grid_size,)`` eigenvalue axis.
    density: ``(grid_size,)``, integrating to 1 over ``grid``.
    nodes: ``(num_probes, num_steps)`` quadrature nodes (NaN-padded after a
      breakdown).
    weights: ``(num_probes, num_steps)`` quadrature weights, each row summing
      to 1 (zero-padded).
    sigma: the Gaussian broadening used.
    num_hvps: Hessian-vector products used.
  """
  grid: np.ndarray
  density: np.ndarray
  nodes: np.ndarray
  weights: np.ndarray
  sigma: float
  num_hvps: int


def gaussian_density(nodes, weights, grid, sigma):
  """``mean_p sum_i w_pi N(grid; node_pi, sigma^2)``, NaN nodes ignored."""
  nodes = np.nan_to_num(np.asarray(nodes, np.float64))
  weights = np.asarray(weights, np.float64)
  z = (grid[None, None, :] - nodes[..., None]) / sigma
  kernel = np.exp(-0.5 * z * z) / (sigma * np.sqrt(2 * np.pi))
  return np.einsum("pi,pig->g", weights, kernel) / nodes.shape[0]


class DensityState(NamedTuple):
  """SLQ after ``done`` probes: their quadrature nodes and weights."""
  nodes: np.ndarray
  weights: np.ndarray
  done: int


def init(num_probes: int, num_steps: int) -> DensityState:
  return DensityState(np.full((num_probes, num_steps), np.nan),
                      np.zeros((num_probes, num_steps)), 0)


def step(op, state: DensityState, keys, num_steps,
         probes_per_call: int = 1) -> DensityState:
  """The next probes: ``T`` from ``num_steps`` Lanczos steps on Rademacher
  vectors; its eigenvalues are the nodes, the squared first components the
  weights. One probe, or up to ``probes_per_call`` in batched passes; a
  single probe's steps run as one compiled loop where that pays
  (:func:`driver.loops_pay`), else a step at a time on the operator's
  pass."""
  p = state.done
  count = min(probes_per_call, len(keys) - p)
  if count == 1 and not driver.loops_pay(op, "slq"):
    probe = op.random_vector(keys[p], kind="rademacher")
    ts = [lanczos_lib.tridiagonalize(op, probe, num_steps).tridiagonal]
  else:
    ts = lanczos_lib.tridiagonalize_many(op, keys[p:p + count], num_steps)
  nodes, weights = state.nodes.copy(), state.weights.copy()
  for i, t in enumerate(ts):
    theta, s = np.linalg.eigh(t)
    nodes[p + i, :theta.size] = theta
    weights[p + i, :theta.size] = s[0] ** 2
  return DensityState(nodes, weights, p + count)


def result(state: DensityState, run, grid_size, sigma) -> DensityResult:
  """The nodes broadened by a Gaussian of width ``sigma`` on a grid."""
  nodes, weights = state.nodes, state.weights
  lo, hi = np.nanmin(nodes), np.nanmax(nodes)
  width = hi - lo if hi > lo else max(abs(hi), 1.0)
  sigma = 0.01 * width if sigma is None else sigma
  pad = 0.05 * width + 5 * sigma
  grid = np.linspace(lo - pad, hi + pad, grid_size)
  return DensityResult(grid, gaussian_density(nodes, weights, grid, sigma),
                       nodes, weights, float(sigma), run.num_hvps)


@api.takes_operator
def spectral_density(op, *, num_probes: int = 8, num_steps: int = 64,
                     key=None, grid_size: int = 1000,
                     sigma: float | None = None, show_pbar: bool = True,
                     checkpointer=None,
                     probes_per_call: int | str = 1) -> DensityResult:
  """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

  Also callable as ``spectral_density(loss, params, batch_iterable, ...)``
  with the keyword options of :class:`HessianOperator`.

  Args:
    op: the operator.
    num_probes: random Rademacher probes (``num_probes * num_steps`` HVPs).
    num_steps: Lanczos steps per probe (memory: that many vectors).
    key: PRNG key for the probes (default ``jax.random.key(0)``).
    grid_size: points of the returned density.
    sigma: Gaussian broadening; default 1% of the nodes' range.
    show_pbar: a tqdm bar over the products.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``; finished probes
      are saved and, after a restart, not run again.
    probes_per_call: run this many probes together: each Lanczos step is
      one batched pass for all of them (``vmap`` over the probes: the data
      is read once and the products share it), with a basis per probe in
      memory. The nodes and weights are the same to rounding. ``'auto'``
      takes as many as half the free device memory holds, from the
      compiled pass's bytes and the bases' (``deeplanczos.probes_per_call``).
      One probe at a time (the default) runs its steps as one compiled loop
      where ``driver.loops_pay`` (compiled loops run fast, and no other
      compiled program holding the pass has run on the operator), else a
      step at a time on ``op.matvec``'s program.

  Returns:
    A :class:`DensityResult`.
  """
  for name, value in (("num_probes", num_probes), ("num_steps", num_steps),
                      ("grid_size", grid_size)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  if sigma is not None and not sigma > 0:
    raise ValueError(f"sigma must be positive, got {sigma!r}.")
  probes_per_call = plan_lib.resolve_probes_per_call(
      op, probes_per_call, num_probes, basis_vectors=num_steps + 1)
  keys = jax.random.split(jax.random.key(0) if key is None else key,
                          num_probes)
  method = driver.Method(
      name="SLQ",
      step=lambda op, s: step(op, s, keys, num_steps, probes_per_call),
      done=lambda s: s.done == num_probes,
      planned_hvps=num_probes * num_steps)
  run = driver.run(op, method, init(num_probes, num_steps),
                   checkpointer=checkpointer, show_pbar=show_pbar)
  return result(run.state, run, grid_size, sigma)
