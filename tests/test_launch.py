"""The launcher: in-process on a shrunk config, and as real processes."""

import json
import os
import signal
import socket
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

import deeplanczos
from deeplanczos import checkpoint
from deeplanczos import experiment
from deeplanczos.experiment import tasks as tasks_lib
from tests import helpers

ROOT = helpers.ROOT
small_config = helpers.small_config


def check_result(workdir, method="power"):
  result = json.loads((workdir / "result.json").read_text())
  png = (workdir / f"{method}.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  return result


def test_run_in_process(tmp_path):
  config = small_config()
  result = experiment.run(config, str(tmp_path))
  on_disk = check_result(tmp_path)
  assert on_disk["eigenvalue"] == result["eigenvalue"]
  hist = on_disk["history"]
  assert set(hist) >= {"alpha", "q", "iteration", "eigenvalue", "loss"}
  assert len(hist["iteration"]) == config.num_iterations
  assert on_disk["eigenvalue"] == hist["eigenvalue"][-1] > 0
  assert on_disk["mesh"] == {"data": 8, "model": 1}
  assert on_disk["num_processes"] == 1 and on_disk["num_examples"] == 1797
  assert on_disk["config"]["task"] == "mlp_digits"
  assert {"setup_s", "train_s", "method_s"} <= set(on_disk["timings"])


def test_transformer_default_mesh_shards_over_model_axis(tmp_path):
  config = small_config("transformer_tokens")
  config.train.steps = 0  # the layout is the point, not a trained net
  result = experiment.run(config, str(tmp_path))
  assert check_result(tmp_path)["mesh"] == {"data": 4, "model": 2}
  assert np.isfinite(result["eigenvalue"])


def test_users_own_task(tmp_path):
  config = small_config()
  config.task = "tests.helpers:user_task"
  config.batch_size = 16  # 60 examples: 3 full batches and one of 12
  result = experiment.run(config, str(tmp_path))
  assert result["num_examples"] == 60


def test_unknown_task(tmp_path):
  config = small_config()
  config.task = "tests.helpers:no_such_function"
  with pytest.raises(ValueError, match="cannot import 'no_such_function'"):
    experiment.run(config, str(tmp_path))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, devices, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "launch.main",
         "--config=configs/mlp_digits.py:small", f"--workdir={workdir}",
         "--config.show_pbar=False", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out
  return out


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  finish(launch(tmp_path / "one", 1))
  one = check_result(tmp_path / "one")
  # Replicated parameters, one psum a pass. (FSDP over two processes, the
  # split layout, runs in test_follow's two-process follower.)
  port = free_port()
  workdir = tmp_path / "two"
  # One workdir for the job, as on a pod's shared storage: all processes
  # write their shards of checkpoints there, only process 0 the results.
  procs = [launch(workdir, 2, f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}") for i in range(2)]
  logs = [finish(p) for p in procs]
  two = check_result(workdir)
  assert "results in" in logs[0] and "results in" not in logs[1]
  assert two["num_processes"] == 2 and two["mesh"] == {"data": 4, "model": 1}
  assert two["accumulate"] == "replicated"
  np.testing.assert_allclose(two["history"]["eigenvalue"],
                             one["history"]["eigenvalue"], rtol=1e-5)


@pytest.mark.slow
def test_unreachable_coordinator_fails_quickly(tmp_path):
  proc = launch(tmp_path, 2, f"--coordinator_address=127.0.0.1:{free_port()}",
                "--num_processes=2", "--process_id=1",
                "--initialization_timeout=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "Could not reach the coordinator" in out


def test_distributed_flags_go_together(tmp_path):
  proc = launch(tmp_path, 1, "--num_processes=2")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "go together" in out


@pytest.mark.parametrize("name,method", [
    ("cnn_digits_lanczos", "lanczos"), ("mlp_digits_density", "density"),
    ("mlp_digits_trace", "trace")])
def test_methods_write_results(tmp_path, name, method):
  config = small_config(name)
  result = experiment.run(config, str(tmp_path))
  on_disk = check_result(tmp_path, method)
  assert on_disk["method"] == method and result["num_hvps"] > 0
  if method == "lanczos":
    lam = np.array(on_disk["eigenvalues"])
    assert len(lam) == config.lanczos.k and np.all(np.diff(lam) <= 0)
    assert len(on_disk["residuals"]) == config.lanczos.k
  elif method == "density":
    dx = on_disk["grid"][1] - on_disk["grid"][0]
    np.testing.assert_allclose(np.sum(on_disk["density"]) * dx, 1.0,
                               rtol=1e-6)
  else:
    assert on_disk["stderr"] > 0 and np.isfinite(on_disk["estimate"])


def test_lanczos_steps_per_call_and_residual_checks(tmp_path):
  # Blocks of 3 steps take exactly the steps of a run a step at a time; no
  # residual checks saves the k products and reports the estimates.
  config = small_config("cnn_digits_lanczos")
  config.train.steps = 0
  runs = {}
  for steps, check in ((-1, True), (3, False)):
    config.lanczos.steps_per_call, config.lanczos.check_residuals = steps, check
    runs[steps] = experiment.run(config, str(tmp_path / str(steps)))
  one, blocks = runs[-1], runs[3]
  assert blocks["krylov_hvps"] == one["krylov_hvps"]
  assert one["residual_hvps"] == config.lanczos.k == one["num_hvps"] - one[
      "krylov_hvps"]
  assert blocks["residual_hvps"] == 0
  assert blocks["num_hvps"] == blocks["krylov_hvps"]
  # float32: the block program rounds differently from the operator's pass.
  np.testing.assert_allclose(blocks["eigenvalues"], one["eigenvalues"],
                             rtol=1e-6)
  np.testing.assert_array_equal(blocks["residuals"],
                                blocks["residual_estimates"])
  # Products by the linearized pass: the same run.
  config.lanczos.steps_per_call, config.lanczos.check_residuals = -1, True
  config.linearize = True
  linear = experiment.run(config, str(tmp_path / "linearized"))
  assert linear["num_hvps"] == one["num_hvps"]
  np.testing.assert_allclose(linear["eigenvalues"], one["eigenvalues"],
                             rtol=1e-6)
  config.linearize = False
  config.lanczos.steps_per_call = -2
  with pytest.raises(experiment.ConfigError, match="steps_per_call"):
    experiment.run(config, str(tmp_path / "bad"))


def test_power_on_one_layer(tmp_path):
  config = small_config()
  config.subset = "Dense_1"
  result = experiment.run(config, str(tmp_path))
  assert np.isfinite(result["eigenvalue"])


@pytest.mark.parametrize("change,message", [
    ({"task": "tests.helpers:nan_task", "train.steps": 0, "batch_size": 20},
     "loss at initialization is nan"),
    ({"batch_size": 4096}, "fewer than one global batch"),
    ({"mesh_shape": (3, 1)}, "mesh does not fit the devices"),
    ({"task": "no_such_module:build"}, "cannot import 'build'"),
    ({"method": "eigen"}, "config.method must be one of"),
    ({"precision": "float31"}, "config.precision must be ''"),
])
def test_bad_config_writes_nothing(tmp_path, change, message):
  config = small_config()
  for key, value in change.items():
    section, _, name = key.rpartition(".")
    setattr(config[section] if section else config, name, value)
  workdir = tmp_path / "run"
  with pytest.raises(experiment.ConfigError, match=message):
    experiment.run(config, str(workdir))
  assert not workdir.exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(experiment.ConfigError, match="Cannot write to"):
    experiment.run(small_config(), str(blocker / "run"))


@pytest.mark.parametrize("args,message", [
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.mesh_shape=(3,1)"], "deeplanczos: The mesh does not fit"),
])
def test_launcher_exits_with_message(tmp_path, args, message):
  proc = launch(tmp_path / "run", 2, *args)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and message in out
  assert not (tmp_path / "run").exists()


def test_launcher_requires_workdir():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.main",
       "--config=configs/mlp_digits.py:small"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert "--workdir" in proc.stderr and "must have a value" in proc.stderr


def test_sharpness_tracking(tmp_path, monkeypatch):
  config = small_config("cnn_digits_sharpness")
  result = experiment.run(config, str(tmp_path))
  on_disk = check_result(tmp_path, "sharpness")
  c = config.sharpness
  assert on_disk["steps"] == list(range(0, c.steps + 1, c.every))
  assert on_disk["threshold"] == 2 / c.learning_rate
  assert result["num_hvps"] == len(on_disk["steps"]) * c.num_iterations
  # At the initialization, a Rayleigh quotient of the top eigenvalue that
  # Lanczos finds independently: never above it, and close to it.
  task = experiment.train(experiment.build_task(config), config)
  top = deeplanczos.lanczos(task.loss, task.params, [(task.x, task.y)], 1,
                            tol=1e-5, show_pbar=False).eigenvalues[0]
  assert 0.8 * top < on_disk["sharpness"][0] <= top * (1 + 1e-5)
  assert np.all(np.isfinite(on_disk["sharpness"]))
  # Stopped by SIGTERM at its third record, then run again: it resumes from
  # the training state and eigenvector saved at the stop, ending where the
  # uninterrupted run did.
  calls, top_eigenvalue = [], deeplanczos.top_eigenvalue

  def sigterm_on_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return top_eigenvalue(*args, **kwargs)

  with monkeypatch.context() as mp:
    mp.setattr(deeplanczos, "top_eigenvalue", sigterm_on_third)
    with pytest.raises(checkpoint.Preempted) as stop:
      experiment.run(config, str(tmp_path / "stopped"), handle_sigterm=True)
  assert stop.value.step == 3
  calls.clear()
  with monkeypatch.context() as mp:
    mp.setattr(deeplanczos, "top_eigenvalue",
               lambda *a, **k: calls.append(1) or top_eigenvalue(*a, **k))
    resumed = experiment.run(config, str(tmp_path / "stopped"))
  assert len(calls) == len(result["steps"]) - 3  # the saved ones not again
  assert resumed["steps"] == result["steps"]
  assert resumed["sharpness"] == result["sharpness"]
  assert resumed["num_hvps"] == result["num_hvps"]


def test_saved_eigenvectors_load_onto_another_mesh(tmp_path):
  config = small_config("cnn_digits_lanczos")
  config.lanczos.tol = 1e-4
  config.lanczos.max_hvps = 60
  result = experiment.run(config, str(tmp_path))  # on a (8, 1) mesh
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  lam, vectors = deeplanczos.load_eigenvectors(str(tmp_path), mesh=mesh)
  np.testing.assert_array_equal(lam, result["eigenvalues"])
  leaf = max(jax.tree.leaves(vectors), key=lambda a: a.size)
  assert leaf.sharding.mesh == mesh and leaf.shape[0] == config.lanczos.k
  assert leaf.addressable_shards[0].data.size == leaf.size // 8
  task = experiment.train(experiment.build_task(config), config)
  op = deeplanczos.HessianOperator(task.loss, task.params,
                                   [(task.x, task.y)], mesh=mesh)
  for i, value in enumerate(lam):
    v = op.check_vector(jax.tree.map(lambda a, i=i: a[i], vectors))
    hv = op.matvec(v)
    residual = np.sqrt(sum(float(np.sum((np.asarray(h) - value * np.asarray(u))
                                        ** 2))
                           for h, u in zip(jax.tree.leaves(hv),
                                           jax.tree.leaves(v))))
    assert residual <= 2e-4 * abs(value), (i, residual)


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_launcher_curvature(tmp_path, curvature):
  config = small_config("mlp_digits_trace")
  config.curvature = curvature
  result = experiment.run(config, str(tmp_path))
  assert result["estimate"] > 0  # both are positive semi-definite
  assert result["matrix"] == {"ggn": "Gauss-Newton matrix",
                              "fisher": "empirical Fisher"}[curvature]


def test_loaded_eigenvectors_take_the_templates_pytree_type(tmp_path):
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
  loss, params, x, y = helpers.mlp_problem()
  r = deeplanczos.lanczos(loss, params, [(x, y)], 2, show_pbar=False)
  deeplanczos.save_eigenvectors(str(tmp_path), r.eigenvalues, r.eigenvectors)
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  template = frozen_dict.freeze(params)
  placed = jax.tree.map(
      lambda a, s: jax.device_put(a, s), template,
      deeplanczos.infer_sharding(template, mesh, min_size=1))
  lam, vectors = deeplanczos.load_eigenvectors(str(tmp_path), like=placed)
  assert isinstance(vectors, frozen_dict.FrozenDict)
  assert jax.tree.structure(vectors) == jax.tree.structure(template)
  np.testing.assert_array_equal(lam, r.eigenvalues)
  for got, want, p in zip(jax.tree.leaves(vectors),
                          jax.tree.leaves(r.eigenvectors),
                          jax.tree.leaves(placed)):
    np.testing.assert_array_equal(got, want)
    assert got.sharding.spec == jax.sharding.PartitionSpec(None, *p.sharding.spec)
  with pytest.raises(ValueError, match="no leaf at"):
    deeplanczos.load_eigenvectors(str(tmp_path), like={"params": {"x": 1.0}})


def test_dry_run_compiles_without_training_and_matches_plan(tmp_path,
                                                            monkeypatch):
  config = small_config()
  config.method = "lanczos"
  config.mesh_shape = (4, 2)
  config.dry_run = "local"
  monkeypatch.setattr(tasks_lib, "train",
                      lambda *a: pytest.fail("a dry run trains nothing"))
  result = experiment.run(config, str(tmp_path))
  on_disk = json.loads((tmp_path / "dry_run.json").read_text())
  assert not (tmp_path / "result.json").exists()
  assert on_disk["mesh"] == {"data": 4, "model": 2}
  assert on_disk["programs"][0]["bytes"] == result["programs"][0]["bytes"] > 0
  ncv = max(2 * config.lanczos.k + 1, 20)
  assert f"Krylov basis ({ncv + 1} vectors" in on_disk["table"]
  # The launcher's plan is the library's on the same inputs.
  task = tasks_lib.build_task(config)
  mesh = experiment.build_mesh(config)
  shapes = jax.eval_shape(lambda: task.params)
  direct = deeplanczos.plan(
      task.loss, flax.core.meta.unbox(shapes),
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(
          (config.batch_size, *a.shape[1:]), a.dtype), (task.x, task.y)),
      mesh=mesh, shardings=deeplanczos.sharding_from_metadata(shapes, mesh))
  assert direct.programs[0].bytes == on_disk["programs"][0]["bytes"]
