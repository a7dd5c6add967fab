"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``m`` Lanczos steps give ``T``; its eigenvalues
``theta_i`` and the squared first components ``tau_i = s_{0i}^2`` of its
eigenvectors are the nodes and weights of an ``m``-point Gauss quadrature of
the spectral measure ``sum_j <v, u_j>^2 delta(t - lambda_j)``, whose
expectation over random probes is the eigenvalue density
``(1/n) sum_j delta(t - lambda_j)``. Averaging over probes and broadening each
node by a Gaussian gives a smooth density (Ghorbani et al., 2019).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import tqdm.auto as tqdm

from deeplanczos._src import lanczos as lanczos_lib
from deeplanczos._src import operator as operator_lib


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


def spectral_density(loss: Callable, params, batch_iterable, *,
                     num_probes: int = 8, num_steps: int = 64, key=None,
                     grid_size: int = 1000, sigma: float | None = None,
                     batch_parser: Callable | None = None, mesh=None,
                     shardings=None, data_axis: str = "data", subset=None,
                     show_pbar: bool = True, checkpointer=None,
                     loss_rng=None) -> DensityResult:
  """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

  Args:
    loss, params, batch_iterable, batch_parser, mesh, shardings, data_axis,
      subset: as for :func:`deeplanczos.lanczos`.
    num_probes: random Rademacher probes (``num_probes * num_steps`` HVPs).
    num_steps: Lanczos steps per probe (memory: that many vectors).
    key: PRNG key for the probes (default ``jax.random.key(0)``).
    grid_size: points of the returned density.
    sigma: Gaussian broadening; default 1% of the nodes' range.
    show_pbar: a tqdm bar over probes.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``; finished probes
      are saved and, after a restart, not run again.
    loss_rng: a PRNG key for losses that take one (dropout): the loss is
      then ``loss(params, x, y, rng)``, ``rng`` fixed per batch and device
      (see ``HessianOperator``), so every pass applies the same ``H``.

  Returns:
    A :class:`DensityResult`.
  """
  op = operator_lib.HessianOperator(
      loss, params, batch_iterable, batch_parser=batch_parser, mesh=mesh,
      shardings=shardings, data_axis=data_axis, subset=subset,
      loss_rng=loss_rng)
  return density_operator(op, num_probes=num_probes, num_steps=num_steps,
                          key=key, grid_size=grid_size, sigma=sigma,
                          show_pbar=show_pbar, checkpointer=checkpointer)


def density_operator(op, *, num_probes=8, num_steps=64, key=None,
                     grid_size=1000, sigma=None, show_pbar=False,
                     checkpointer=None):
  """:func:`spectral_density` on an existing :class:`HessianOperator`."""
  for name, value in (("num_probes", num_probes), ("num_steps", num_steps),
                      ("grid_size", grid_size)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  if sigma is not None and not sigma > 0:
    raise ValueError(f"sigma must be positive, got {sigma!r}.")
  keys = jax.random.split(jax.random.key(0) if key is None else key,
                          num_probes)
  nodes = np.full((num_probes, num_steps), np.nan)
  weights = np.zeros((num_probes, num_steps))
  done, earlier = 0, 0
  if checkpointer is not None and (saved := checkpointer.restore({})):
    done, earlier = saved[1]["probes"], saved[1]["hvps"]
    nodes[:done] = np.array(saved[1]["nodes"], np.float64)
    weights[:done] = saved[1]["weights"]
  first = op.num_matvecs - earlier
  for p in tqdm.trange(done, num_probes, desc="SLQ probes", initial=done,
                       total=num_probes, disable=not show_pbar):
    probe = op.random_vector(keys[p], kind="rademacher")
    decomposition = lanczos_lib.tridiagonalize(op, probe, num_steps)
    theta, s = np.linalg.eigh(decomposition.tridiagonal)
    nodes[p, :theta.size] = theta
    weights[p, :theta.size] = s[0] ** 2
    if checkpointer is not None and p + 1 < num_probes:
      checkpointer.save(p + 1, {}, {
          "probes": p + 1, "hvps": op.num_matvecs - first,
          "nodes": lanczos_lib.nan_to_none(nodes[:p + 1]),
          "weights": weights[:p + 1].tolist()})
  lo, hi = np.nanmin(nodes), np.nanmax(nodes)
  width = hi - lo if hi > lo else max(abs(hi), 1.0)
  sigma = 0.01 * width if sigma is None else sigma
  pad = 0.05 * width + 5 * sigma
  grid = np.linspace(lo - pad, hi + pad, grid_size)
  return DensityResult(grid, gaussian_density(nodes, weights, grid, sigma),
                       nodes, weights, float(sigma), op.num_matvecs - first)
