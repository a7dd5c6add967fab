"""The launcher's methods: config section -> library call -> result dict.

Each entry of :data:`METHODS` runs one library method on the run's operator
(``run(op, config, task, show_pbar=..., checkpointer=...)``) and returns the
dict that ``result.json`` holds, with a one-line ``'headline'`` for the log
and, for methods that find eigenvectors, ``'eigenpairs'`` to save; it names
its plot in ``plots.py``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np
import optax

import deeplanczos
from deeplanczos._src import driver
from deeplanczos.experiment import plots
from deeplanczos.experiment.config import ConfigError


def power(op, config, task, *, v0=None, **run):
  del task
  r = deeplanczos.power_iteration(
      op, num_iterations=config.num_iterations,
      tol=config.get("tol") or None, key=jax.random.key(config.seed), v0=v0,
      **run)
  n = len(r.eigenvalues)
  history = {"alpha": r.alpha, "eigenvalue": r.eigenvalues, "q": r.q,
             "iteration": np.arange(n), "loss": np.full(n, r.loss),
             "seconds": r.seconds}
  vectors = jax.tree.map(lambda a: a[None], r.eigenvector)
  return {"eigenvalue": r.eigenvalue, "history": history,
          "num_hvps": r.num_hvps, "headline": f"eigenvalue {r.eigenvalue:.6g}",
          "eigenpairs": (np.array([r.eigenvalue]), vectors)}


# config.lanczos.steps_per_call's special values.
STEPS_PER_CALL = {0: "auto", -1: None}


def lanczos(op, config, task, *, v0=None, **run):
  del task
  c = config.lanczos
  r = deeplanczos.lanczos(
      op, c.k, which=c.which, key=jax.random.key(config.seed),
      ncv=c.ncv or None, tol=c.tol, max_hvps=c.max_hvps, v0=v0,
      steps_per_call=STEPS_PER_CALL.get(c.steps_per_call, c.steps_per_call),
      check_residuals=c.check_residuals, **run)
  return {"eigenvalues": r.eigenvalues, "residuals": r.residuals,
          "relative_residuals": r.residuals / np.abs(r.eigenvalues),
          "residual_estimates": r.residual_estimates,
          "converged": r.converged, "gap_ratio": r.gap_ratio,
          "ritz_history": r.ritz_history, "num_hvps": r.num_hvps,
          "krylov_hvps": r.krylov_hvps, "residual_hvps": r.residual_hvps,
          "loss": r.loss,
          "headline": f"{c.which} eigenvalues {np.round(r.eigenvalues, 6)}",
          "eigenpairs": (r.eigenvalues, r.eigenvectors)}


def density(op, config, task, **run):
  del task
  c = config.density
  r = deeplanczos.spectral_density(
      op, num_probes=c.num_probes, num_steps=c.num_steps,
      key=jax.random.key(config.seed), grid_size=c.grid_size,
      sigma=c.sigma or None, probes_per_call=c.probes_per_call or "auto",
      **run)
  return {"grid": r.grid, "density": r.density, "nodes": r.nodes,
          "weights": r.weights, "sigma": r.sigma, "num_hvps": r.num_hvps,
          "headline": (f"eigenvalues in [{np.nanmin(r.nodes):.4g}, "
                       f"{np.nanmax(r.nodes):.4g}]")}


ESTIMATORS = {"hutch++": (deeplanczos.hutchpp, "num_hvps"),
              "hutchinson": (deeplanczos.hutchinson, "num_probes")}


def trace(op, config, task, **run):
  del task
  c = config.trace
  estimator, budget = ESTIMATORS[c.estimator]
  r = estimator(op, key=jax.random.key(config.seed), **{budget: c.num_hvps},
                **run)
  # TraceResult's names; its ``method`` is ``estimator`` here, since
  # result.json's ``method`` is the launcher's.
  return {"estimate": r.estimate, "stderr": r.stderr, "samples": r.samples,
          "estimator": r.method, "num_hvps": r.num_hvps,
          "headline": f"trace {r.estimate:.6g} +- {r.stderr:.2g}"}


class SharpnessState(NamedTuple):
  """Gradient descent and the top eigenvalues recorded so far.

  Attributes:
    params, opt_state: the training state after ``step`` steps.
    v: the last top eigenvector (zeros before the first).
    step: gradient descent steps taken.
    steps, sharpness, loss: the steps recorded, their top eigenvalues and
      dataset losses.
  """
  params: Any
  opt_state: Any
  v: Any
  step: int
  steps: np.ndarray
  sharpness: np.ndarray
  loss: np.ndarray


def sharpness(op, config, task, *, show_pbar, checkpointer):
  """Trains by full-batch gradient descent and tracks the top eigenvalue.

  Every ``config.sharpness.every`` steps (and after the last), the top
  eigenvalue of ``top_eigenvalue``, warm-started from the previous
  eigenvector on the operator moved to the new parameters (nothing is
  compiled again), as edge-of-stability studies do: with step size ``eta``,
  gradient descent is stable along directions of curvature below
  ``2 / eta``. Each record is a step of the driver, so the run is
  checkpointed (training state, eigenvector, history) and resumes where it
  stopped.
  """
  c = config.sharpness
  tx = optax.sgd(c.learning_rate)
  records = list(range(0, c.steps + 1, c.every))
  if records[-1] != c.steps:
    records.append(c.steps)

  @jax.jit
  def train_step(params, opt_state):
    grads = jax.grad(task.loss)(params, task.x, task.y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def record(op, s: SharpnessState) -> SharpnessState:
    params, opt_state = s.params, s.opt_state
    target = records[len(s.steps)]
    for _ in range(s.step, target):
      params, opt_state = train_step(params, opt_state)
    moved = op.with_params(params)
    r = deeplanczos.top_eigenvalue(
        moved, v0=s.v if len(s.steps) else None,
        num_iterations=c.num_iterations, key=jax.random.key(config.seed))
    op.num_matvecs += moved.num_matvecs  # the driver counts the op's products
    if show_pbar:
      logging.info("step %d: loss %.4f, top eigenvalue %.4f (2/lr = %.4f)",
                   target, moved.loss_value, r.eigenvalue,
                   2 / c.learning_rate)
    return SharpnessState(
        params, opt_state, r.eigenvector, target,
        np.append(s.steps, target), np.append(s.sharpness, r.eigenvalue),
        np.append(s.loss, moved.loss_value))

  # Training runs on one device, as the dataset-sized gradient fits there.
  params = jax.device_put(jax.device_get(op.params), jax.local_devices()[0])
  state = SharpnessState(params, tx.init(params),
                         op.check_vector(jax.tree.map(
                             lambda t: np.zeros(t.shape, t.dtype),
                             op.template)), 0,
                         np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
  method = driver.Method(
      name="sharpness", step=record,
      done=lambda s: len(s.steps) == len(records),
      planned_hvps=len(records) * c.num_iterations)
  run = driver.run(op, method, state, checkpointer=checkpointer,
                   show_pbar=show_pbar)
  s = run.state
  return {"steps": s.steps, "sharpness": s.sharpness, "loss": s.loss,
          "threshold": 2 / c.learning_rate, "num_hvps": run.num_hvps,
          "learning_rate": c.learning_rate,
          "headline": (f"top eigenvalue {s.sharpness[0]:.4g} -> "
                       f"{s.sharpness[-1]:.4g} over {c.steps} steps (2/lr = "
                       f"{2 / c.learning_rate:.4g})")}


class Method(NamedTuple):
  """``run(op, config, task, show_pbar=..., checkpointer=...) -> dict``, plot.

  ``power`` and ``lanczos`` also take ``v0=``, a starting vector shaped like
  the parameters (a follower warm-starts them from the last step's vectors).
  """
  run: Callable
  plot: Callable


METHODS = {"power": Method(power, plots.power),
           "lanczos": Method(lanczos, plots.lanczos),
           "density": Method(density, plots.density),
           "trace": Method(trace, plots.trace),
           "sharpness": Method(sharpness, plots.sharpness)}


def check(config):
  """Raises ConfigError for a method or estimator that does not exist."""
  if config.method not in METHODS:
    raise ConfigError(f"config.method must be one of {sorted(METHODS)}; got "
                      f"{config.method!r}.")
  steps = config.lanczos.steps_per_call
  if not isinstance(steps, int) or steps < -1:
    raise ConfigError("config.lanczos.steps_per_call must be 0 ('auto'), -1 "
                      "(a step at a time) or a positive number of steps; got "
                      f"{steps!r}.")
  if config.method == "trace" and config.trace.estimator not in ESTIMATORS:
    raise ConfigError(f"config.trace.estimator must be one of "
                      f"{sorted(ESTIMATORS)}; got {config.trace.estimator!r}.")
