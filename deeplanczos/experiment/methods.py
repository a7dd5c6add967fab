"""The launcher's methods: config section -> library call -> result dict.

Each entry of :data:`METHODS` runs one library method on the run's operator
and returns the dict that ``result.json`` holds, with a one-line
``'headline'`` for the log, and names its plot in ``plots.py``.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

import deeplanczos
from deeplanczos.experiment import plots
from deeplanczos.experiment.config import ConfigError


def power(op, config, **run):
  r = deeplanczos.power_iteration(
      op, num_iterations=config.num_iterations,
      tol=config.get("tol") or None, key=jax.random.key(config.seed), **run)
  n = len(r.eigenvalues)
  history = {"alpha": r.alpha, "eigenvalue": r.eigenvalues, "q": r.q,
             "iteration": np.arange(n), "loss": np.full(n, r.loss),
             "seconds": r.seconds}
  return {"eigenvalue": r.eigenvalue, "history": history,
          "num_hvps": r.num_hvps, "headline": f"eigenvalue {r.eigenvalue:.6g}"}


def lanczos(op, config, **run):
  c = config.lanczos
  r = deeplanczos.lanczos(
      op, c.k, which=c.which, key=jax.random.key(config.seed),
      ncv=c.ncv or None, tol=c.tol, max_hvps=c.max_hvps, **run)
  return {"eigenvalues": r.eigenvalues, "residuals": r.residuals,
          "relative_residuals": r.residuals / np.abs(r.eigenvalues),
          "residual_estimates": r.residual_estimates,
          "converged": r.converged, "gap_ratio": r.gap_ratio,
          "ritz_history": r.ritz_history, "num_hvps": r.num_hvps,
          "loss": r.loss,
          "headline": f"{c.which} eigenvalues {np.round(r.eigenvalues, 6)}"}


def density(op, config, **run):
  c = config.density
  r = deeplanczos.spectral_density(
      op, num_probes=c.num_probes, num_steps=c.num_steps,
      key=jax.random.key(config.seed), grid_size=c.grid_size,
      sigma=c.sigma or None, **run)
  return {"grid": r.grid, "density": r.density, "nodes": r.nodes,
          "weights": r.weights, "sigma": r.sigma, "num_hvps": r.num_hvps,
          "headline": (f"eigenvalues in [{np.nanmin(r.nodes):.4g}, "
                       f"{np.nanmax(r.nodes):.4g}]")}


ESTIMATORS = {"hutch++": (deeplanczos.hutchpp, "num_hvps"),
              "hutchinson": (deeplanczos.hutchinson, "num_probes")}


def trace(op, config, **run):
  c = config.trace
  estimator, budget = ESTIMATORS[c.estimator]
  r = estimator(op, key=jax.random.key(config.seed), **{budget: c.num_hvps},
                **run)
  return {"trace": r.estimate, "stderr": r.stderr, "samples": r.samples,
          "estimator": r.method, "num_hvps": r.num_hvps,
          "headline": f"trace {r.estimate:.6g} +- {r.stderr:.2g}"}


class Method(NamedTuple):
  """``run(op, config, show_pbar=..., checkpointer=...) -> dict`` and its plot."""
  run: Callable
  plot: Callable


METHODS = {"power": Method(power, plots.power),
           "lanczos": Method(lanczos, plots.lanczos),
           "density": Method(density, plots.density),
           "trace": Method(trace, plots.trace)}


def check(config):
  """Raises ConfigError for a method or estimator that does not exist."""
  if config.method not in METHODS:
    raise ConfigError(f"config.method must be one of {sorted(METHODS)}; got "
                      f"{config.method!r}.")
  if config.method == "trace" and config.trace.estimator not in ESTIMATORS:
    raise ConfigError(f"config.trace.estimator must be one of "
                      f"{sorted(ESTIMATORS)}; got {config.trace.estimator!r}.")
