"""Runs one config end to end; what ``launch/main.py`` calls.

config -> mesh -> task (loss, trained parameters, data) -> grain pipeline ->
one operator -> the chosen method -> ``result.json`` and a PNG plot in the
workdir, written by process 0 only.
"""

import dataclasses
import functools
import math
import os
import time

from absl import logging
import flax
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

import deeplanczos
from deeplanczos import checkpoint as checkpoint_lib
from deeplanczos import data as data_lib
from deeplanczos._src import driver
from deeplanczos._src import files
from deeplanczos._src import lanczos as lanczos_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math
from deeplanczos.experiment import methods as methods_lib
from deeplanczos.experiment import tasks as tasks_lib
from deeplanczos.experiment import workdir as workdir_lib
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


def _check_finite_loss(task, config, when):
  n = min(config.batch_size, len(task.y))
  rng = (jax.random.key(0),) if task.takes_rng else ()
  value = float(task.loss(sharding_lib.unbox(task.params), task.x[:n],
                          task.y[:n], *rng))
  if not np.isfinite(value):
    raise ConfigError(f"The loss {when} is {value} on the first batch; the "
                      "Hessian of a non-finite loss means nothing. Check the "
                      "model, the data and config.train.")


MATRICES = {"hessian": "Hessian", "ggn": "Gauss-Newton matrix",
            "fisher": "empirical Fisher"}


def _shardings(config, params, mesh):
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


def _prepare(config):
  """Everything that can fail on bad input and costs little: no training.

  Returns:
    ``(mesh, task, shardings, dataset)``, the task untrained.
  """
  methods_lib.check(config)
  if config.curvature not in MATRICES:
    raise ConfigError("config.curvature must be 'hessian', 'ggn' or "
                      f"'fisher'; got {config.curvature!r}.")
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
  shardings = _shardings(config, task.params, mesh)
  if config.curvature == "ggn" and task.model_fn is None:
    raise ConfigError(f"config.curvature='ggn' needs a task with model_fn and "
                      f"output_loss; {config.task!r} has none.")
  _check_finite_loss(task, config, "at initialization")
  return mesh, task, shardings, dataset


def run(config: ml_collections.ConfigDict, workdir: str,
        handle_sigterm: bool = False) -> dict:
  """Runs ``config`` and, on process 0, writes its results into ``workdir``.

  The method's state is checkpointed into ``workdir/checkpoints/METHOD``
  every ``config.checkpoint_every`` steps and at its end, and the run
  resumes from the newest intact checkpoint there. A workdir belongs to one
  config, model and mesh: checkpoints of another are refused, and so is a
  second run on the workdir while one holds its lock; both are checked
  before the task is trained.

  Args:
    config: the run's config (see :func:`base_config`).
    workdir: where results and checkpoints go.
    handle_sigterm: catch SIGTERM for the whole run: inside the method it
      saves a checkpoint, and at any other point the run stops at the next
      phase (after training, after the method, after saving eigenvectors),
      releasing the workdir; both raise ``checkpoint.Preempted`` and a rerun
      resumes (the launcher sets it).

  Returns:
    The result dict that ``result.json`` holds.
  """
  if config.get("dry_run"):
    return dry_run(config, workdir)
  start = time.perf_counter()
  lead = jax.process_index() == 0
  with driver.SigtermGuard(handle_sigterm) as sigterm:
    mesh, task, shardings, dataset = _prepare(config)
    workdir_lib.make(workdir, lead)
    with workdir_lib.Lock(workdir, lead):
      checkpointer = checkpoint_lib.Checkpointer(
          os.path.join(workdir, "checkpoints", config.method),
          every=config.checkpoint_every, handle_sigterm=handle_sigterm,
          fingerprint=workdir_lib.fingerprint(config, task.params, mesh))
      try:
        checkpointer.check_fingerprint()
        _stop_if(sigterm, "before training")
        t_train = time.perf_counter()
        task = _trained(task, config, shardings)
        _check_finite_loss(task, config, "after training")
        timings = {"setup_s": t_train - start,
                   "train_s": time.perf_counter() - t_train}
        _stop_if(sigterm, "after training, before the method")
        return _run(config, workdir, lead, mesh, task, shardings, dataset,
                    checkpointer, sigterm, timings)
      except checkpoint_lib.Mismatch as e:
        raise ConfigError(str(e)) from e
      finally:
        checkpointer.close()


def _plan_options(config) -> dict:
  """The vectors ``config.method`` keeps, as ``deeplanczos.plan`` options."""
  if config.method == "lanczos":
    ncv = config.lanczos.ncv or lanczos_lib.default_ncv(config.lanczos.k)
    return {"method": "lanczos", "ncv": ncv}
  if config.method == "density":
    return {"method": "density", "ncv": config.density.num_steps,
            "num_probes": config.density.get("probes_per_call", 1)}
  if config.method == "trace":
    return {"method": "trace"}
  return {"method": "power"}


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The run's per-device plan, compiled for ``config.dry_run``'s devices.

  Nothing is trained or allocated on the devices: the task's parameters and
  one global batch enter as shapes, on a mesh of ``config.mesh_shape`` over
  this machine's devices (``"local"``) or over a TPU slice's (``"v5e:8x8"``),
  and ``deeplanczos.plan`` compiles the Hessian-vector product. Logs the
  table and, on process 0, writes ``workdir/dry_run.json``.
  """
  methods_lib.check(config)
  axes = list(zip(config.mesh_axes, (int(s) for s in config.mesh_shape)))
  try:
    if config.dry_run == "local":
      mesh = build_mesh(config)
    else:
      mesh = deeplanczos.topology_mesh(config.dry_run, axes)
  except ValueError as e:
    raise ConfigError(f"config.dry_run={config.dry_run!r}: {e}") from e
  task = tasks_lib.build_task(config)
  shapes = jax.eval_shape(lambda: task.params)
  shardings = _shardings(config, shapes, mesh)
  n = min(config.batch_size, len(task.y))
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      (n, *np.shape(a)[1:]), np.asarray(a).dtype), (task.x, task.y))
  planned = deeplanczos.plan(
      task.loss, sharding_lib.unbox(shapes), batch, mesh=mesh,
      shardings=shardings, num_batches=math.ceil(len(task.y) / n),
      data_axis=config.data_axis, subset=config.subset or None,
      curvature=config.curvature, model_fn=task.model_fn,
      output_loss=task.output_loss, uses_rng=task.takes_rng,
      **_plan_options(config))
  logging.info("%s", planned.table())
  result = _jsonable({**planned._asdict(), "table": planned.table(),
                      "programs": [p._asdict() for p in planned.programs],
                      "fits": planned.fits(), "config": config.to_dict()})
  if jax.process_index() == 0:
    workdir_lib.make(workdir, True)
    files.write_json(os.path.join(workdir, "dry_run.json"), result, indent=2)
  return result


def _trained(task, config, shardings):
  """The task at its trained parameters: from ``config.params``' checkpoint
  (restored onto ``shardings``, each process reading its shards), or from
  :func:`tasks.train`."""
  c = config.get("params")
  if not c or not c.directory:
    return tasks_lib.train(task, config)
  shapes = jax.eval_shape(lambda: sharding_lib.unbox(task.params))
  like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=s),
                      shapes, shardings)
  try:
    params = deeplanczos.restore_params(
        c.directory, like, step=None if c.step < 0 else c.step,
        path=c.path, item=c.item or None)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.params: {e}") from e
  logging.info("Parameters restored from %s (config.params).", c.directory)
  return dataclasses.replace(task, params=params)


def _stop_if(sigterm, where):
  if sigterm.anywhere():
    raise checkpoint_lib.Preempted(None, where)


def _run(config, workdir, lead, mesh, task, shardings, dataset, checkpointer,
         sigterm, timings):
  """The method on one operator, and the result files."""
  t_method = time.perf_counter()
  op = deeplanczos.HessianOperator(
      task.loss, task.params, dataset, batch_parser=data_lib.parse_batch,
      mesh=mesh, shardings=shardings, data_axis=config.data_axis,
      subset=config.subset or None,
      loss_rng=jax.random.key(config.seed + 1) if task.takes_rng else None,
      curvature=config.curvature, model_fn=task.model_fn,
      output_loss=task.output_loss)
  check = None
  if config.get("check_operator", False):
    check = deeplanczos.check_operator(
        op, key=jax.random.key(config.seed))._asdict()
    logging.info("Operator check: %s", check)
  method = methods_lib.METHODS[config.method]
  result = method.run(op, config, task,
                      show_pbar=lead and config.get("show_pbar", True),
                      checkpointer=checkpointer)
  _stop_if(sigterm, "after the method (its final state is saved)")
  if check is not None:
    result["operator_check"] = check
  if "eigenpairs" in result:  # every process writes its shards
    deeplanczos.save_eigenvectors(os.path.join(workdir, "eigenvectors"),
                                  *result.pop("eigenpairs"))
    _stop_if(sigterm, "after saving the eigenvectors")
  end = time.perf_counter()
  matrix = MATRICES[config.curvature]
  headline = f"{matrix} {result.pop('headline')}"
  result.update({
      "method": config.method,
      "task": config.task,
      "matrix": matrix,
      "num_params": tree_math.tree_size(op.params),
      "num_examples": int(len(task.y)),
      "mesh": dict(mesh.shape),
      "num_processes": jax.process_count(),
      "num_devices": jax.device_count(),
      "platform": jax.devices()[0].platform,
      "data_on_device": op.data_on_device,
      "accumulate": op.kernel.accumulate,
      "timings": {**timings, "method_s": end - t_method,
                  "seconds_per_hvp": (end - t_method) / result["num_hvps"]},
      "versions": {"deeplanczos": deeplanczos.__version__,
                   "jax": jax.__version__, "flax": flax.__version__},
      "config": config.to_dict(),
  })
  result = _jsonable(result)
  if lead:
    method.plot(result, os.path.join(workdir, f"{config.method}.png"))
    files.write_json(os.path.join(workdir, "result.json"), result, indent=2)
    logging.info("%s on %s: %s; results in %s", config.method, config.task,
                 headline, workdir)
  return result
