"""Following a training run: a trainer's checkpoints, evaluated step by step."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

import deeplanczos
from deeplanczos import checkpoint as checkpoint_lib
from deeplanczos import experiment
from deeplanczos._src import driver
from deeplanczos.experiment import follow as follow_lib
from tests import follow_config as follow_config_lib
from tests import helpers
from tests import test_launch


def follow_config(directory, methods=None):
  config = follow_config_lib.get_config(methods)
  config.params.directory = str(directory)
  return config


def saved_params(directory, config, step):
  task = experiment.build_task(config)
  like = jax.eval_shape(lambda: task.params)
  return task, deeplanczos.restore_params(str(directory), like, step=step)


def dense_spectrum(directory, config, step):
  task, params = saved_params(directory, config, step)
  h, _ = helpers.dense_hessian(
      task.loss, jax.tree.map(lambda a: np.asarray(a, np.float64), params),
      np.asarray(task.x, np.float64), task.y)
  return np.linalg.eigvalsh(h)


def lines(workdir):
  return [json.loads(l) for l in (workdir / "curvature.jsonl").read_text()
          .splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished training run: steps 0, 2, 4, 6 and the trainer's marker."""
  workdir = tmp_path_factory.mktemp("trainer")
  config = follow_config(workdir / "checkpoints")
  experiment.train_and_save(config, str(workdir))
  return workdir / "checkpoints"


def test_every_step_against_its_dense_hessian(trained, tmp_path):
  config = follow_config(trained)
  summary = experiment.run(config, str(tmp_path))
  assert summary["steps"] == [0, 2, 4, 6] and summary["skipped"] == []
  assert "marker" in summary["ended_by"]
  got = lines(tmp_path)
  assert [l["step"] for l in got] == [0, 2, 4, 6]
  for line in got:
    lam = dense_spectrum(trained, config, line["step"])
    top = lam[-1]
    # Power: a Rayleigh quotient, never above the top eigenvalue.
    assert top * (1 - 1e-3) < line["power"]["eigenvalue"] <= top * (1 + 1e-5)
    np.testing.assert_allclose(line["lanczos"]["eigenvalues"], lam[::-1][:3],
                               rtol=1e-4)
    assert line["lanczos"]["converged"] is True
    t = line["trace"]
    assert abs(t["estimate"] - lam.sum()) <= 4 * t["stderr"] + 1e-3 * abs(
        lam.sum())
    nodes = np.array(line["density"]["nodes"], dtype=float)
    assert np.nanmax(nodes) == pytest.approx(top, rel=1e-3)
    assert np.nanmin(nodes) >= lam[0] - 1e-3 * abs(top)
    assert line["loss"] > 0 and line["seconds"] > 0
  # The plot, and TensorBoard's scalars and histogram, one per step.
  png = (tmp_path / "curvature.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
  events = tensorboard_events(tmp_path / "tensorboard")
  power = [(s, v) for tag, s, v in events if tag == "power/eigenvalue"]
  assert power == [(l["step"], pytest.approx(l["power"]["eigenvalue"],
                                             rel=1e-6)) for l in got]
  assert [s for tag, s, _ in events if tag == "density/spectrum"] == [
      0, 2, 4, 6]
  assert not os.listdir(tmp_path / "checkpoints")  # each step's removed


def tensorboard_events(logdir):
  """``(tag, step, value)`` of every event file's scalars and histograms."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for name in sorted(os.listdir(logdir)):
    data = (logdir / name).read_bytes()
    i = 0
    while i < len(data):  # TFRecords: length, its CRC, the record, its CRC
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.append((v.tag, event.step,
                    v.simple_value if v.HasField("simple_value") else None))
  return out


def test_restarted_follower_resumes_a_half_done_step(trained, tmp_path,
                                                     monkeypatch, caplog):
  """SIGTERM in step 4's power method: its state is saved and the run stops;
  the rerun skips steps 0 and 2, resumes step 4's power method from its
  checkpoint, and every line equals an uninterrupted run's."""
  config = follow_config(trained, "power,trace")
  whole = experiment.run(config, str(tmp_path / "whole"))
  real_run, names = driver.run, []

  def run_with_sigterm(op, method, state, **kwargs):
    names.append(method.name)
    if names.count("power method") == 3:  # step 4
      step = method.step

      def step_then_sigterm(op, state):
        os.kill(os.getpid(), signal.SIGTERM)
        return step(op, state)

      method = method._replace(step=step_then_sigterm)
    return real_run(op, method, state, **kwargs)

  monkeypatch.setattr(driver, "run", run_with_sigterm)
  workdir = tmp_path / "stopped"
  with pytest.raises(checkpoint_lib.Preempted):
    experiment.run(config, str(workdir), handle_sigterm=True)
  assert [l["step"] for l in lines(workdir)] == [0, 2]
  assert os.path.isdir(workdir / "checkpoints" / "follow" / "step_4" / "power")
  # A kill while the next line was written leaves a torn line.
  with open(workdir / "curvature.jsonl", "a") as f:
    f.write('{"step": 4, "power": {"eigenv')
  monkeypatch.setattr(driver, "run", real_run)
  with caplog.at_level("INFO"):
    again = experiment.run(config, str(workdir), handle_sigterm=True)
  assert "incomplete last line" in caplog.text
  assert "power method: resumed from step 1" in caplog.text
  assert again["steps"] == whole["steps"] == [0, 2, 4, 6]
  for a, b in zip(lines(workdir), lines(tmp_path / "whole")):
    assert a["step"] == b["step"]
    assert a["power"]["eigenvalue"] == b["power"]["eigenvalue"]
    assert a["trace"]["estimate"] == b["trace"]["estimate"]


def test_vanished_and_unfinished_steps_are_skipped(trained, tmp_path,
                                                   monkeypatch, caplog):
  directory = tmp_path / "checkpoints"
  shutil.copytree(trained, directory)
  # An unfinished step, as orbax names it while writing: never read.
  (directory / "8.orbax-checkpoint-tmp-1").mkdir()
  real = deeplanczos.restore_params

  def retention(where, like, *, step=None, **kwargs):
    if step == 4:  # the trainer deletes it between listing and reading
      shutil.rmtree(directory / "4")
    return real(where, like, step=step, **kwargs)

  monkeypatch.setattr(deeplanczos, "restore_params", retention)
  config = follow_config(directory, "power")
  config.follow_every = 2
  with caplog.at_level("WARNING"):
    summary = experiment.run(config, str(tmp_path / "follower"))
  assert "Skipping step 4" in caplog.text and "deleted" in caplog.text
  assert summary["steps"] == [0, 2, 6] and summary["skipped"] == [4]


def test_follow_until_every_and_timeout(trained, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(trained, directory)
  config = follow_config(directory, "power")
  config.num_iterations = 3
  config.follow_every = 3  # 0, then 4 (2 is fewer than 3 steps after 0)
  config.follow_until = 4
  summary = experiment.run(config, str(tmp_path / "until"))
  assert summary["steps"] == [0, 4] and "follow_until" in summary["ended_by"]
  os.remove(directory / config.follow_marker)
  config.follow_until, config.follow_every = -1, 0
  config.follow_timeout = 0.3
  summary = experiment.run(config, str(tmp_path / "until"))
  assert summary["steps"] == [0, 4, 6]  # resumed after 4; 2 is before it
  assert "timeout" in summary["ended_by"]


@pytest.mark.parametrize("change,message", [
    ({"follow_methods": "power,sharpness"}, "follow_methods"),
    ({"params.directory": ""}, "params.directory"),
    ({"follow_poll": 0.0}, "follow_poll"),
])
def test_bad_follow_config(tmp_path, change, message):
  config = follow_config(tmp_path)
  for key, value in change.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(experiment.ConfigError, match=message):
    experiment.run(config, str(tmp_path / "w"))


def test_a_checkpoint_of_another_model_is_named(trained, tmp_path):
  config = follow_config(trained, "power")
  config.task = "mlp_digits"
  config.model.features = (8,)
  with pytest.raises(experiment.ConfigError, match="Parameter|structure"):
    experiment.run(config, str(tmp_path))


def test_the_example_config_follows_its_trainer():
  config = helpers.small_config("cnn_digits_follow")
  follow_lib.check(config)
  assert follow_lib.follow_methods(config) == ["power", "trace"]
  assert config.params.directory == "/tmp/trainer/checkpoints"
  assert config.follow_learning_rate == config.train.learning_rate


def launch(script, workdir, devices, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(helpers.ROOT))
  cmd = [sys.executable, "-m", f"launch.{script}",
         "--config=tests/follow_config.py:power,trace", f"--workdir={workdir}",
         *extra]
  return subprocess.Popen(cmd, cwd=helpers.ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


@pytest.mark.slow
def test_trainer_and_a_two_process_follower_side_by_side(tmp_path):
  """The README's two commands, the follower on 2 processes x 2 devices with
  the parameters split over both (FSDP), all three started together: process
  0 picks each step as the trainer writes it, both evaluate it, and each
  step's top eigenvalues and trace are its dense Hessian's."""
  directory = tmp_path / "trainer" / "checkpoints"
  port = test_launch.free_port()
  followers = [launch("main", tmp_path / "follower", 2,
                      f"--config.params.directory={directory}",
                      f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", f"--process_id={i}",
                      "--config.fsdp=True", "--config.trace.num_hvps=12",
                      "--config.follow_methods=lanczos,trace")
               for i in range(2)]
  trainer = launch("train", tmp_path / "trainer", 1)
  test_launch.finish(trainer)
  logs = [test_launch.finish(p) for p in followers]
  assert "Followed" in logs[0] and "0 skipped" in logs[0]
  assert "Followed" not in logs[1]
  got = lines(tmp_path / "follower")
  assert [l["step"] for l in got] == [0, 2, 4, 6]
  summary = json.loads((tmp_path / "follower" / "result.json").read_text())
  assert summary["mesh"] == {"data": 4, "model": 1}
  assert summary["accumulate"] == "split"  # FSDP: reduced per batch
  config = follow_config_lib.get_config()
  for line in got:
    lam = dense_spectrum(directory, config, line["step"])
    np.testing.assert_allclose(line["lanczos"]["eigenvalues"], lam[::-1][:3],
                               rtol=1e-4)
    t = line["trace"]
    assert abs(t["estimate"] - lam.sum()) <= 4 * t["stderr"] + 1e-3 * abs(
        lam.sum())
