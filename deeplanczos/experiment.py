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
from deeplanczos import data as data_lib
from deeplanczos import models
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math


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
  c.mesh_axes = ("data", "model")
  c.mesh_shape = (-1, 1)  # -1: all devices the other axes leave
  c.mesh_shrink = False  # shrink fixed axes to fit the devices present
  c.data_axis = "data"
  c.model_axis = "model"
  c.show_pbar = True
  return c


@dataclasses.dataclass
class Task:
  """What a method needs: ``loss(params, x, y)``, parameters and the data."""
  loss: Callable
  params: Any
  x: np.ndarray
  y: np.ndarray
  partition_specs: Any = None  # pytree of PartitionSpec, or None for the rule


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


TASKS = {"mlp_digits": mlp_digits, "cnn_digits": cnn_digits,
         "transformer_tokens": transformer_tokens}


def build_task(config) -> Task:
  """A built-in task by name, or a user's ``'module:function'``.

  A user's function takes the config and returns ``(loss, params, (x, y))``
  with ``x``, ``y`` arrays whose leading dimension is the examples.
  """
  name = config.task
  if name in TASKS:
    return TASKS[name](config)
  if ":" not in name:
    raise ValueError(f"config.task must be one of {sorted(TASKS)} or "
                     f"'module:function'; got {name!r}.")
  module_name, fn_name = name.split(":", 1)
  try:
    fn = getattr(importlib.import_module(module_name), fn_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"config.task {name!r}: cannot import {fn_name!r} from "
                     f"module {module_name!r} ({e}).") from e
  loss, params, (x, y) = fn(config)
  return Task(loss, params, np.asarray(x), np.asarray(y))


def train(task: Task, config) -> Any:
  """A few deterministic epochs of Adam, so the Hessian is a trained net's."""
  steps = config.train.steps
  if not steps:
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


def _power(loss, params, dataset, shardings, mesh, config, show_pbar):
  v, history = deeplanczos.PowerMethodIterate(
      loss, params, dataset, config.num_iterations,
      batch_parser=data_lib.parse_batch, show_pbar=show_pbar,
      tol=config.get("tol") or None, key=jax.random.key(config.seed),
      mesh=mesh, shardings=shardings, data_axis=config.data_axis)
  del v
  return {"eigenvalue": float(history["eigenvalue"][-1]),
          "history": history}


def _plot_power(result, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  h = result["history"]
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  a.plot(h["iteration"], h["eigenvalue"], marker=".")
  a.set(xlabel="iteration", ylabel="eigenvalue estimate <v, Hv>",
        title=f"dominant eigenvalue: {result['eigenvalue']:.6g}")
  b.semilogy(h["iteration"], np.maximum(1 - np.asarray(h["q"]), 1e-16),
             marker=".")
  b.set(xlabel="iteration", ylabel="1 - q = 1 - |<v_k, v_k+1>|",
        title="eigenvector convergence")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


METHODS = {"power": (_power, _plot_power)}


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
    return str(x)
  return x


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs ``config`` and, on process 0, writes its results into ``workdir``.

  Returns:
    The result dict that ``result.json`` holds.
  """
  start = time.perf_counter()
  if config.method not in METHODS:
    raise ValueError(f"config.method must be one of {sorted(METHODS)}; got "
                     f"{config.method!r}.")
  lead = jax.process_index() == 0
  if lead:
    os.makedirs(workdir, exist_ok=True)
  mesh = build_mesh(config)
  logging.info("Mesh %s over %d processes.", dict(mesh.shape),
               jax.process_count())
  task = build_task(config)
  t_train = time.perf_counter()
  params = train(task, config)
  t_method = time.perf_counter()
  shardings = _shardings(task, mesh, config)
  dataset = data_lib.batch_dataset(task.x, task.y, config.batch_size)
  method, plot = METHODS[config.method]
  result = method(task.loss, params, dataset, shardings, mesh, config,
                  show_pbar=lead and config.get("show_pbar", True))
  end = time.perf_counter()
  iterations = len(result["history"]["iteration"])
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
                  "train_s": t_method - t_train,
                  "method_s": end - t_method,
                  "seconds_per_iteration": (end - t_method) / iterations},
      "versions": {"deeplanczos": deeplanczos.__version__,
                   "jax": jax.__version__, "flax": flax.__version__},
      "config": config.to_dict(),
  })
  result = _jsonable(result)
  if lead:
    plot(result, os.path.join(workdir, f"{config.method}.png"))
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f, indent=2)
    logging.info("%s on %s: eigenvalue %.6g; results in %s", config.method,
                 config.task, result.get("eigenvalue", float("nan")), workdir)
  return result
