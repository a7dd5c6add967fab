"""Runs one config end to end; what ``launch/main.py`` calls.

config -> mesh -> task (loss, trained parameters, data) -> grain pipeline ->
the chosen method -> ``result.json`` and a PNG plot in the workdir, written by
process 0 only.
"""

from collections.abc import Callable
import dataclasses
import importlib
import json
import math
import os
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import deeplanczos
from deeplanczos import checkpoint as checkpoint_lib
from deeplanczos import data as data_lib
from deeplanczos import models
from deeplanczos._src import checks as checks_lib
from deeplanczos._src import density as density_lib
from deeplanczos._src import lanczos as lanczos_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import trace as trace_lib
from deeplanczos._src import tree_math


class ConfigError(ValueError):
  """A config, workdir or task that cannot run; nothing has been written."""


def base_config() -> ml_collections.ConfigDict:
  """The keys every config has, with their defaults; configs override them."""
  c = ml_collections.ConfigDict()
  c.task = "mlp_digits"  # a name in TASKS, or a user's 'module:function'
  c.method = "power"
  c.seed = 0
  c.model = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  # Deterministic training at start-up, so the Hessian is a trained net's.
  c.train = ml_collections.ConfigDict(
      {"steps": 500, "batch_size": 128, "learning_rate": 1e-3})
  c.batch_size = 256  # global batch of a Hessian pass
  c.num_iterations = 30
  c.tol = 0.0  # stop early at this relative change; 0 runs every iteration
  c.subset = ""  # a regular expression on parameter paths; "" for all
  c.lanczos = ml_collections.ConfigDict(
      {"k": 5, "which": "LA", "ncv": 0, "tol": 1e-6, "max_hvps": 300})
  c.density = ml_collections.ConfigDict(
      {"num_probes": 4, "num_steps": 40, "grid_size": 1000, "sigma": 0.0})
  c.trace = ml_collections.ConfigDict({"estimator": "hutch++", "num_hvps": 60})
  c.mesh_axes = ("data", "model")
  c.mesh_shape = (-1, 1)  # -1: all devices the other axes leave
  c.mesh_shrink = False  # shrink fixed axes to fit the devices present
  c.data_axis = "data"
  c.model_axis = "model"
  c.show_pbar = True
  # Save the method's state after every this many steps (0: only on SIGTERM);
  # a run started again on the same workdir resumes from the newest one.
  c.checkpoint_every = 5
  return c


@dataclasses.dataclass
class Task:
  """What a method needs: ``loss(params, x, y)``, parameters and the data."""
  loss: Callable
  params: Any
  x: np.ndarray
  y: np.ndarray
  partition_specs: Any = None  # pytree of PartitionSpec, or None for the rule
  timings: tuple[float, float] = (0.0, 0.0)  # training start and end
  takes_rng: bool = False  # the loss is loss(params, x, y, rng) (dropout)
  trained: bool = False  # the task trained its parameters itself


def build_mesh(config) -> Mesh:
  """The mesh of ``config.mesh_shape`` over ``config.mesh_axes``.

  A size of -1 takes the devices left over. With ``config.mesh_shrink`` the
  other axes shrink to the largest divisor of the device count (so a default
  mesh adapts to the devices present); without it a mesh that does not fit
  the devices is an error.
  """
  names = tuple(config.mesh_axes)
  shape = [int(s) for s in config.mesh_shape]
  if len(names) != len(shape):
    raise ValueError(f"config.mesh_axes {names} and config.mesh_shape "
                     f"{tuple(shape)} must have the same length.")
  n = jax.device_count()
  if config.get("mesh_shrink", False):
    shape = [s if s == -1 else math.gcd(s, n) for s in shape]
  return sharding_lib.make_mesh(list(zip(names, shape)))


def _cross_entropy(apply_fn):
  def loss(params, x, y):
    logits = apply_fn(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y).mean()
  return loss


def _classifier(model, x, y, config):
  init = model.init(jax.random.key(config.seed), x[:1])
  specs = nn.get_partition_spec(init)
  params = flax.core.meta.unbox(init)
  loss = _cross_entropy(model.apply)
  return Task(loss, params, x, y, specs)


def mlp_digits(config) -> Task:
  x, y = data_lib.load_digits()
  return _classifier(models.MLP(tuple(config.model.features)), x, y, config)


def cnn_digits(config) -> Task:
  x, y = data_lib.load_digits()
  return _classifier(models.CNN(tuple(config.model.channels),
                                config.model.hidden), x, y, config)


def transformer_tokens(config) -> Task:
  m = config.model
  x, y = data_lib.synthetic_tokens(config.data.num_sequences, m.max_len,
                                   m.vocab_size, seed=config.seed)
  model = models.Transformer(m.vocab_size, m.max_len, m.d_model, m.num_heads,
                             m.num_layers, m.mlp_dim)
  return _classifier(model, x, y, config)


def bn_dropout_digits(config) -> Task:
  """An MLP with BatchNorm and dropout on digits: a model with state.

  Training updates BatchNorm's running statistics. The Hessian's loss never
  does: with ``config.hessian.batch_norm='running'`` (the default) it uses
  the running statistics, with ``'batch'`` each device's batch statistics,
  whose update is discarded. With ``config.hessian.dropout`` dropout stays on
  in the Hessian, its masks fixed per batch by the operator's ``loss_rng``.
  """
  x, y = data_lib.load_digits()
  h = config.hessian
  if h.batch_norm not in ("running", "batch"):
    raise ConfigError("config.hessian.batch_norm must be 'running' or "
                      f"'batch'; got {h.batch_norm!r}.")
  if h.batch_norm == "batch" and len(y) % config.batch_size:
    raise ConfigError(
        "config.hessian.batch_norm='batch' needs full batches (a masked batch "
        f"is differentiated example by example): config.batch_size="
        f"{config.batch_size} must divide the {len(y)} examples.")
  model = models.BNDropoutMLP(tuple(config.model.features),
                              dropout_rate=config.model.dropout_rate)
  key = jax.random.key(config.seed)
  variables = model.init(key, x[:2], use_running_average=False, dropout=False)
  params, stats = variables["params"], variables["batch_stats"]

  def apply(p, s, xb, rng, running, dropout):
    return model.apply({"params": p, "batch_stats": s}, xb,
                       use_running_average=running, dropout=dropout,
                       rngs={"dropout": rng}, mutable=["batch_stats"])

  tx = optax.adam(config.train.learning_rate)

  @jax.jit
  def step(p, s, opt_state, xb, yb, rng):
    def objective(p):
      logits, new = apply(p, s, xb, rng, running=False, dropout=True)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, yb).mean(), new["batch_stats"]
    (_, s), grads = jax.value_and_grad(objective, has_aux=True)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), s, opt_state

  opt_state = tx.init(params)
  order = np.random.default_rng(config.seed).permutation(
      np.resize(np.arange(len(y)), config.train.steps * config.train.batch_size))
  for i, idx in enumerate(order.reshape(config.train.steps, -1)):
    params, stats, opt_state = step(params, stats, opt_state, x[idx], y[idx],
                                    jax.random.fold_in(key, i))
  params, stats = jax.device_get((params, stats))
  running = h.batch_norm == "running"

  def loss(p, xb, yb, rng):
    logits, _ = apply(p, stats, xb, rng, running=running, dropout=h.dropout)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  return Task(loss, params, x, y, takes_rng=True, trained=True)


TASKS = {"mlp_digits": mlp_digits, "cnn_digits": cnn_digits,
         "transformer_tokens": transformer_tokens,
         "bn_dropout_digits": bn_dropout_digits}


def build_task(config) -> Task:
  """A built-in task by name, or a user's ``'module:function'``.

  A user's function takes the config and returns ``(loss, params, (x, y))``
  with ``x``, ``y`` arrays whose leading dimension is the examples.
  """
  name = config.task
  if name in TASKS:
    return TASKS[name](config)
  if ":" not in name:
    raise ConfigError(f"config.task must be one of {sorted(TASKS)} or "
                      f"'module:function'; got {name!r}.")
  module_name, fn_name = name.split(":", 1)
  try:
    fn = getattr(importlib.import_module(module_name), fn_name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"config.task {name!r}: cannot import {fn_name!r} from "
                      f"module {module_name!r} ({e}).") from e
  loss, params, (x, y) = fn(config)
  return Task(loss, params, np.asarray(x), np.asarray(y))


def train(task: Task, config) -> Any:
  """A few deterministic epochs of Adam, so the Hessian is a trained net's."""
  steps = config.train.steps
  if not steps or task.trained:
    return task.params
  tx = optax.adam(config.train.learning_rate)

  @jax.jit
  def step(params, opt_state, x, y):
    value, grads = jax.value_and_grad(task.loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  params = jax.device_put(task.params, jax.local_devices()[0])
  opt_state = tx.init(params)
  rng = np.random.default_rng(config.seed)
  n, bs = len(task.y), config.train.batch_size
  order = np.zeros(0, int)
  for i in range(steps):
    if len(order) < bs:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:bs], order[bs:]
    params, opt_state, value = step(params, opt_state, task.x[idx],
                                    task.y[idx])
  logging.info("Trained %d steps; last batch loss %.4f.", steps, float(value))
  return jax.device_get(params)


def _shardings(task: Task, mesh: Mesh, config):
  specs = task.partition_specs
  has_specs = specs is not None and any(
      s != P() for s in jax.tree.leaves(specs,
                                        is_leaf=lambda s: isinstance(s, P)))
  if has_specs and config.model_axis in mesh.axis_names:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, P))
  return sharding_lib.infer_sharding(task.params, mesh,
                                     model_axis=config.model_axis)


def _operator(loss, params, dataset, shardings, mesh, config, loss_rng):
  return deeplanczos.HessianOperator(
      loss, params, dataset, batch_parser=data_lib.parse_batch, mesh=mesh,
      shardings=shardings, data_axis=config.data_axis,
      subset=config.subset or None, loss_rng=loss_rng)


def _power(loss, params, dataset, shardings, mesh, config, show_pbar,
           checkpointer, loss_rng):
  _, history = deeplanczos.PowerMethodIterate(
      loss, params, dataset, config.num_iterations,
      batch_parser=data_lib.parse_batch, show_pbar=show_pbar,
      tol=config.get("tol") or None, key=jax.random.key(config.seed),
      mesh=mesh, shardings=shardings, data_axis=config.data_axis,
      subset=config.subset or None, checkpointer=checkpointer,
      loss_rng=loss_rng)
  return {"eigenvalue": float(history["eigenvalue"][-1]), "history": history,
          "num_hvps": len(history["iteration"]),
          "headline": f"eigenvalue {history['eigenvalue'][-1]:.6g}"}


def _lanczos(loss, params, dataset, shardings, mesh, config, show_pbar,
             checkpointer, loss_rng):
  c = config.lanczos
  op = _operator(loss, params, dataset, shardings, mesh, config, loss_rng)
  r = lanczos_lib.lanczos_operator(
      op, c.k, which=c.which, key=jax.random.key(config.seed),
      ncv=c.ncv or None, tol=c.tol, max_hvps=c.max_hvps, show_pbar=show_pbar,
      checkpointer=checkpointer)
  return {"eigenvalues": r.eigenvalues, "residuals": r.residuals,
          "relative_residuals": r.residuals / np.abs(r.eigenvalues),
          "residual_estimates": r.residual_estimates,
          "converged": r.converged, "gap_ratio": r.gap_ratio,
          "ritz_history": r.ritz_history, "num_hvps": r.num_hvps,
          "loss": r.loss,
          "headline": f"{c.which} eigenvalues {np.round(r.eigenvalues, 6)}"}


def _density(loss, params, dataset, shardings, mesh, config, show_pbar,
             checkpointer, loss_rng):
  c = config.density
  op = _operator(loss, params, dataset, shardings, mesh, config, loss_rng)
  r = density_lib.density_operator(
      op, num_probes=c.num_probes, num_steps=c.num_steps,
      key=jax.random.key(config.seed), grid_size=c.grid_size,
      sigma=c.sigma or None, show_pbar=show_pbar, checkpointer=checkpointer)
  return {"grid": r.grid, "density": r.density, "nodes": r.nodes,
          "weights": r.weights, "sigma": r.sigma, "num_hvps": r.num_hvps,
          "headline": (f"eigenvalues in [{np.nanmin(r.nodes):.4g}, "
                       f"{np.nanmax(r.nodes):.4g}]")}


def _trace(loss, params, dataset, shardings, mesh, config, show_pbar,
           checkpointer, loss_rng):
  c = config.trace
  op = _operator(loss, params, dataset, shardings, mesh, config, loss_rng)
  estimators = {"hutch++": trace_lib.hutchpp_operator,
                "hutchinson": trace_lib.hutchinson_operator}
  if c.estimator not in estimators:
    raise ValueError(f"config.trace.estimator must be one of "
                     f"{sorted(estimators)}; got {c.estimator!r}.")
  budget = ({"num_hvps": c.num_hvps} if c.estimator == "hutch++"
            else {"num_probes": c.num_hvps})
  r = estimators[c.estimator](op, key=jax.random.key(config.seed),
                              show_pbar=show_pbar, checkpointer=checkpointer,
                              **budget)
  return {"trace": r.estimate, "stderr": r.stderr, "samples": r.samples,
          "estimator": r.method, "num_hvps": r.num_hvps,
          "headline": f"trace {r.estimate:.6g} +- {r.stderr:.2g}"}


def _figure(ncols=1):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4), squeeze=False)
  return plt, fig, axes[0]


def _save(plt, fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_power(result, path):
  plt, fig, (a, b) = _figure(2)
  h = result["history"]
  a.plot(h["iteration"], h["eigenvalue"], marker=".")
  a.set(xlabel="iteration", ylabel="eigenvalue estimate <v, Hv>",
        title=f"dominant eigenvalue: {result['eigenvalue']:.6g}")
  b.semilogy(h["iteration"], np.maximum(1 - np.asarray(h["q"]), 1e-16),
             marker=".")
  b.set(xlabel="iteration", ylabel="1 - q = 1 - |<v_k, v_k+1>|",
        title="eigenvector convergence")
  _save(plt, fig, path)


def _plot_lanczos(result, path):
  plt, fig, (a, b) = _figure(2)
  ritz = np.array(result["ritz_history"], dtype=float)
  steps = np.arange(1, len(ritz) + 1)
  for i in range(ritz.shape[1]):
    a.plot(steps, ritz[:, i], label=f"{i + 1}")
  a.set(xlabel="Hessian-vector products", ylabel="Ritz value",
        title="Ritz values of the wanted eigenvalues")
  a.legend(fontsize="small")
  lam = np.abs(np.array(result["eigenvalues"], dtype=float))
  pairs = np.arange(1, len(lam) + 1)
  b.semilogy(pairs, result["relative_residuals"], "o", label="explicit")
  b.semilogy(pairs, np.maximum(np.array(result["residual_estimates"],
                                        dtype=float) / lam, 1e-20), "x",
             label="recurrence estimate")
  b.set(xlabel="eigenpair", ylabel="||Hv - lambda v|| / |lambda|",
        title="relative residuals", xticks=pairs)
  b.legend(fontsize="small")
  _save(plt, fig, path)


def _plot_density(result, path):
  plt, fig, (a,) = _figure()
  density = np.asarray(result["density"], dtype=float)
  a.semilogy(result["grid"], np.maximum(density, 1e-12))
  a.set(xlabel="eigenvalue", ylabel="density (log scale)",
        ylim=(max(density.max() * 1e-8, 1e-12), density.max() * 2),
        title=f"Hessian spectral density (SLQ, sigma={result['sigma']:.2g})")
  _save(plt, fig, path)


def _plot_trace(result, path):
  plt, fig, (a,) = _figure()
  samples = np.asarray(result["samples"], dtype=float)
  offset = result["trace"] - samples.mean()
  n = np.arange(1, len(samples) + 1)
  running = offset + np.cumsum(samples) / n
  spread = np.array([samples[:i].std(ddof=1) / np.sqrt(i) if i > 1 else 0
                     for i in n])
  a.plot(n, running, label="estimate")
  a.fill_between(n, running - 2 * spread, running + 2 * spread, alpha=0.3,
                 label="+- 2 standard errors")
  a.set(xlabel="random probes", ylabel="trace estimate",
        title=f"{result['estimator']}: {result['trace']:.6g} "
              f"+- {result['stderr']:.2g}")
  a.legend()
  _save(plt, fig, path)


METHODS = {"power": (_power, _plot_power),
           "lanczos": (_lanczos, _plot_lanczos),
           "density": (_density, _plot_density),
           "trace": (_trace, _plot_trace)}


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None  # JSON has no NaN or infinity
  return x


def _check_finite_loss(task, params, config, when):
  n = min(config.batch_size, len(task.y))
  rng = (jax.random.key(0),) if task.takes_rng else ()
  value = float(task.loss(params, task.x[:n], task.y[:n], *rng))
  if not np.isfinite(value):
    raise ConfigError(f"The loss {when} is {value} on the first batch; the "
                      "Hessian of a non-finite loss means nothing. Check the "
                      "model, the data and config.train.")


def _prepare(config):
  """Everything that can fail on bad input, before the workdir is touched."""
  if config.method not in METHODS:
    raise ConfigError(f"config.method must be one of {sorted(METHODS)}; got "
                      f"{config.method!r}.")
  try:
    mesh = build_mesh(config)
  except ValueError as e:
    raise ConfigError(f"The mesh does not fit the devices: {e}") from e
  logging.info("Mesh %s over %d processes.", dict(mesh.shape),
               jax.process_count())
  task = build_task(config)
  if len(task.y) < config.batch_size:
    raise ConfigError(
        f"The dataset has {len(task.y)} examples, fewer than one global batch "
        f"(config.batch_size={config.batch_size}); lower the batch size.")
  try:
    dataset = data_lib.batch_dataset(task.x, task.y, config.batch_size)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  _check_finite_loss(task, task.params, config, "at initialization")
  start = time.perf_counter()
  params = train(task, config)
  _check_finite_loss(task, params, config, "after training")
  task.timings = (start, time.perf_counter())
  return mesh, task, params, dataset


def _make_workdir(workdir, lead):
  """Creates the workdir (process 0), or says why it cannot be written."""
  if not lead:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".deeplanczos_write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"Cannot write to --workdir={workdir}: {e}") from e


def run(config: ml_collections.ConfigDict, workdir: str,
        handle_sigterm: bool = False) -> dict:
  """Runs ``config`` and, on process 0, writes its results into ``workdir``.

  The method's state is checkpointed into ``workdir/checkpoints/METHOD``
  every ``config.checkpoint_every`` steps, and the run resumes from the
  newest complete checkpoint there. A workdir belongs to one config.

  Args:
    config: the run's config (see :func:`base_config`).
    workdir: where results and checkpoints go.
    handle_sigterm: make SIGTERM save a checkpoint and raise
      ``checkpoint.Preempted`` (the launcher sets it).

  Returns:
    The result dict that ``result.json`` holds.
  """
  start = time.perf_counter()
  lead = jax.process_index() == 0
  mesh, task, params, dataset = _prepare(config)
  t_train, t_trained = task.timings
  _make_workdir(workdir, lead)
  shardings = _shardings(task, mesh, config)
  t_method = time.perf_counter()
  method, plot = METHODS[config.method]
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints", config.method),
      every=config.checkpoint_every)
  if handle_sigterm:
    checkpointer.listen_for_sigterm()
  loss_rng = jax.random.key(config.seed + 1) if task.takes_rng else None
  check = None
  if config.get("check_operator", False):
    check = checks_lib.check_hessian_operator(
        _operator(task.loss, params, dataset, shardings, mesh, config,
                  loss_rng), key=jax.random.key(config.seed))._asdict()
    logging.info("Operator check: %s", check)
  try:
    result = method(task.loss, params, dataset, shardings, mesh, config,
                    show_pbar=lead and config.get("show_pbar", True),
                    checkpointer=checkpointer, loss_rng=loss_rng)
  finally:
    checkpointer.close()
  if check is not None:
    result["operator_check"] = check
  end = time.perf_counter()
  headline = result.pop("headline")
  result.update({
      "method": config.method,
      "task": config.task,
      "num_params": tree_math.tree_size(params),
      "num_examples": int(len(task.y)),
      "mesh": dict(mesh.shape),
      "num_processes": jax.process_count(),
      "num_devices": jax.device_count(),
      "platform": jax.devices()[0].platform,
      "timings": {"setup_s": t_train - start,
                  "train_s": t_trained - t_train,
                  "method_s": end - t_method,
                  "seconds_per_hvp": (end - t_method) / result["num_hvps"]},
      "versions": {"deeplanczos": deeplanczos.__version__,
                   "jax": jax.__version__, "flax": flax.__version__},
      "config": config.to_dict(),
  })
  result = _jsonable(result)
  if lead:
    plot(result, os.path.join(workdir, f"{config.method}.png"))
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f, indent=2)
    logging.info("%s on %s: %s; results in %s", config.method, config.task,
                 headline, workdir)
  return result
