"""What every job builds from a config: mesh, task, layout, data, operator.

Shared by the one-shot run (``runner``) and the follower (``follow``); each
piece checks its part of the config where it enters and raises
:class:`ConfigError` for what cannot run.
"""

import dataclasses
import functools
import math

from absl import logging
import jax
from jax.sharding import Mesh
import numpy as np

import deeplanczos
from deeplanczos import data as data_lib
from deeplanczos._src import hvp as hvp_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos.experiment import methods as methods_lib
from deeplanczos.experiment import tasks as tasks_lib
from deeplanczos.experiment.config import ConfigError


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



def jsonable(x):
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None  # JSON has no NaN or infinity
  return x



def check_finite_loss(task, config, when):
  n = min(config.batch_size, len(task.y))
  rng = (jax.random.key(0),) if task.takes_rng else ()
  # Compiled: op by op, a Transformer's loss costs a compile per primitive.
  value = float(jax.jit(task.loss)(sharding_lib.unbox(task.params),
                                   task.x[:n], task.y[:n], *rng))
  if not np.isfinite(value):
    raise ConfigError(f"The loss {when} is {value} on the first batch; the "
                      "Hessian of a non-finite loss means nothing. Check the "
                      "model, the data and config.train.")


MATRICES = {"hessian": "Hessian", "ggn": "Gauss-Newton matrix",
            "fisher": "empirical Fisher"}



def param_shardings(config, params, mesh):
  """The parameters' layout: flax metadata or the default rule, FSDP if asked.

  Flax partitioning metadata, if the task's parameters carry it, names the
  layout; otherwise the default rule splits leaves over the model axis. With
  ``config.fsdp`` every leaf is also split over the axes it leaves unused.
  """
  shardings = sharding_lib.from_metadata(
      params, mesh, shardings_rule=functools.partial(
          sharding_lib.infer_sharding, model_axis=config.model_axis))
  if config.get("fsdp", False):
    shardings = sharding_lib.split_over_all_devices(
        sharding_lib.unbox(params), shardings)
  return shardings


def prepare(config):
  """Everything that can fail on bad input and costs little: no training.

  Returns:
    ``(mesh, task, shardings, dataset)``, the task untrained.
  """
  methods_lib.check(config)
  if config.curvature not in MATRICES:
    raise ConfigError("config.curvature must be 'hessian', 'ggn' or "
                      f"'fisher'; got {config.curvature!r}.")
  try:
    hvp_lib.check_precision(config.precision or None)
  except ValueError as e:
    raise ConfigError(
        "config.precision must be '' (JAX's default) or a value "
        "jax.default_matmul_precision takes, such as 'highest'; got "
        f"{config.precision!r}.") from e
  try:
    mesh = build_mesh(config)
  except ValueError as e:
    raise ConfigError(f"The mesh does not fit the devices: {e}") from e
  logging.info("Mesh %s over %d processes.", dict(mesh.shape),
               jax.process_count())
  task = tasks_lib.build_task(config)
  if len(task.y) < config.batch_size:
    raise ConfigError(
        f"The dataset has {len(task.y)} examples, fewer than one global batch "
        f"(config.batch_size={config.batch_size}); lower the batch size.")
  try:
    dataset = data_lib.batch_dataset(task.x, task.y, config.batch_size)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  shardings = param_shardings(config, task.params, mesh)
  if config.params.directory and task.state is not None:
    raise ConfigError(
        f"config.params restores parameters only, and {config.task!r} has "
        "model state besides (BatchNorm statistics) that its Hessian depends "
        "on; follow or restore a task without state.")
  if config.curvature == "ggn" and task.model_fn is None:
    raise ConfigError(f"config.curvature='ggn' needs a task with model_fn and "
                      f"output_loss; {config.task!r} has none.")
  check_finite_loss(task, config, "at initialization")
  return mesh, task, shardings, dataset


def restore_target(task, shardings):
  """The parameters as ``jax.ShapeDtypeStruct`` on ``shardings``: what
  ``deeplanczos.restore_params`` restores onto."""
  shapes = jax.eval_shape(lambda: sharding_lib.unbox(task.params))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=s),
                      shapes, shardings)


def trained(task, config, shardings):
  """The task at its trained parameters: from ``config.params``' checkpoint
  (restored onto ``shardings``, each process reading its shards), or from
  :func:`tasks.train`."""
  c = config.params
  if not c.directory:
    return tasks_lib.train(task, config)
  try:
    params = deeplanczos.restore_params(
        c.directory, restore_target(task, shardings),
        step=None if c.step < 0 else c.step, path=c.path, item=c.item or None)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.params: {e}") from e
  logging.info("Parameters restored from %s (config.params).", c.directory)
  return dataclasses.replace(task, params=params)


def operator(config, task, mesh, shardings, dataset):
  """The operator of ``config.curvature`` at ``task.params`` on the mesh."""
  return deeplanczos.HessianOperator(
      task.loss, task.params, dataset, batch_parser=data_lib.parse_batch,
      mesh=mesh, shardings=shardings, data_axis=config.data_axis,
      subset=config.subset or None,
      loss_rng=jax.random.key(config.seed + 1) if task.takes_rng else None,
      curvature=config.curvature, model_fn=task.model_fn,
      output_loss=task.output_loss, precision=config.precision or None,
      linearize=config.linearize)
