"""Runs one config end to end; what ``launch/main.py`` calls.

config -> mesh -> task (loss, trained parameters, data) -> grain pipeline ->
one operator -> the chosen method -> ``result.json`` and a PNG plot in the
workdir, written by process 0 only. With ``config.dry_run`` it compiles and
reports instead (:func:`dry_run`); with ``config.follow`` it follows a
training run's checkpoints instead (``follow.follow``).
"""

import math
import os
import time

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

import deeplanczos
from deeplanczos import checkpoint as checkpoint_lib
from deeplanczos._src import driver
from deeplanczos._src import files
from deeplanczos._src import lanczos as lanczos_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math
from deeplanczos.experiment import build
from deeplanczos.experiment import follow as follow_lib
from deeplanczos.experiment import methods as methods_lib
from deeplanczos.experiment import tasks as tasks_lib
from deeplanczos.experiment import workdir as workdir_lib
from deeplanczos.experiment.config import ConfigError


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
  if config.get("follow"):
    return follow_lib.follow(config, workdir, handle_sigterm)
  start = time.perf_counter()
  lead = jax.process_index() == 0
  with driver.SigtermGuard(handle_sigterm) as sigterm:
    mesh, task, shardings, dataset = build.prepare(config)
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
        task = build.trained(task, config, shardings)
        build.check_finite_loss(task, config, "after training")
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
            "num_probes": config.density.probes_per_call or 1}
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
      mesh = build.build_mesh(config)
    else:
      mesh = deeplanczos.topology_mesh(config.dry_run, axes)
  except ValueError as e:
    raise ConfigError(f"config.dry_run={config.dry_run!r}: {e}") from e
  task = tasks_lib.build_task(config)
  shapes = jax.eval_shape(lambda: task.params)
  shardings = build.param_shardings(config, shapes, mesh)
  n = min(config.batch_size, len(task.y))
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      (n, *np.shape(a)[1:]), np.asarray(a).dtype), (task.x, task.y))
  planned = deeplanczos.plan(
      task.loss, sharding_lib.unbox(shapes), batch, mesh=mesh,
      shardings=shardings, num_batches=math.ceil(len(task.y) / n),
      data_axis=config.data_axis, subset=config.subset or None,
      curvature=config.curvature, model_fn=task.model_fn,
      output_loss=task.output_loss, uses_rng=task.takes_rng,
      precision=config.precision or None, **_plan_options(config))
  logging.info("%s", planned.table())
  result = build.jsonable({**planned._asdict(), "table": planned.table(),
                      "programs": [p._asdict() for p in planned.programs],
                      "fits": planned.fits(), "config": config.to_dict()})
  if jax.process_index() == 0:
    workdir_lib.make(workdir, True)
    files.write_json(os.path.join(workdir, "dry_run.json"), result, indent=2)
  return result


def _stop_if(sigterm, where):
  if sigterm.anywhere():
    raise checkpoint_lib.Preempted(None, where)


def _run(config, workdir, lead, mesh, task, shardings, dataset, checkpointer,
         sigterm, timings):
  """The method on one operator, and the result files."""
  t_method = time.perf_counter()
  op = build.operator(config, task, mesh, shardings, dataset)
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
  matrix = build.MATRICES[config.curvature]
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
  result = build.jsonable(result)
  if lead:
    method.plot(result, os.path.join(workdir, f"{config.method}.png"))
    files.write_json(os.path.join(workdir, "result.json"), result, indent=2)
    logging.info("%s on %s: %s; results in %s", config.method, config.task,
                 headline, workdir)
  return result
