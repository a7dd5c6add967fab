"""A launcher run stopped, refused or starved at any phase loses nothing and
says what happened in one line."""

import json
import signal
import os
import re
import subprocess
import sys

import pytest

from deeplanczos import checkpoint
from deeplanczos import experiment
from deeplanczos._src import files
from deeplanczos._src import lanczos as lanczos_lib
from deeplanczos.experiment import methods as methods_lib
from deeplanczos.experiment import runner as runner_lib
from deeplanczos.experiment import workdir as workdir_lib
from tests import helpers

ROOT = helpers.ROOT


def lanczos_config():
  config = helpers.small_config()
  config.method = "lanczos"
  config.lanczos.k = 2
  config.lanczos.tol = 1e-4
  config.checkpoint_every = 0  # only the final state and SIGTERM save
  config.train.steps = 0  # the Hessian at the initialization will do
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  return experiment.run(lanczos_config(), str(tmp_path_factory.mktemp("ref")))


def sigterm_then(fn):
  """``fn``, after this process receives SIGTERM (on its first call)."""
  sent = []

  def wrapped(*args, **kwargs):
    if not sent:
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    return fn(*args, **kwargs)
  return wrapped


PHASES = {
    "training": lambda mp: mp.setattr(
        runner_lib.tasks_lib, "train", sigterm_then(runner_lib.tasks_lib.train)),
    "residual check": lambda mp: [mp.setattr(  # in blocks or step by step
        lanczos_lib, name, sigterm_then(getattr(lanczos_lib, name)))
                                  for name in ("_checked_in_blocks",
                                               "residual_norms")],
    "eigenvector save": lambda mp: mp.setattr(
        runner_lib.deeplanczos, "save_eigenvectors",
        sigterm_then(runner_lib.deeplanczos.save_eigenvectors)),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_sigterm_outside_the_method_stops_cleanly_and_resumes(
    tmp_path, monkeypatch, uninterrupted, phase):
  previous = signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as mp:
    PHASES[phase](mp)
    with pytest.raises(checkpoint.Preempted) as e:
      experiment.run(lanczos_config(), str(tmp_path), handle_sigterm=True)
  assert signal.getsignal(signal.SIGTERM) is previous
  assert not (tmp_path / ".lock").exists()
  assert not (tmp_path / "result.json").exists()
  saved = list((tmp_path / "checkpoints" / "lanczos").glob("[0-9]*"))
  assert (e.value.step is None) and (bool(saved) == (phase != "training"))
  result = experiment.run(lanczos_config(), str(tmp_path))
  assert result["eigenvalues"] == uninterrupted["eigenvalues"]
  assert result["residuals"] == uninterrupted["residuals"]


def test_sigterm_while_plotting_finishes_the_run(tmp_path, monkeypatch,
                                                 uninterrupted):
  method = methods_lib.METHODS["lanczos"]
  monkeypatch.setitem(methods_lib.METHODS, "lanczos", method._replace(
      plot=sigterm_then(method.plot)))
  result = experiment.run(lanczos_config(), str(tmp_path), handle_sigterm=True)
  assert result["eigenvalues"] == uninterrupted["eigenvalues"]
  assert json.loads((tmp_path / "result.json").read_text()) == result
  assert not (tmp_path / ".lock").exists()


def test_a_rerun_of_a_finished_workdir_says_it_is_complete(tmp_path, caplog):
  experiment.run(lanczos_config(), str(tmp_path))
  with caplog.at_level("INFO"):
    experiment.run(lanczos_config(), str(tmp_path))
  assert re.search(r"lanczos LA k=2: already complete at step \d+",
                   caplog.text)


def refuse_training(task, config):
  raise AssertionError("trained before the workdir was checked")


@pytest.mark.parametrize("refusal", ["not a directory", "locked",
                                     "another config"])
def test_workdir_refusals_come_before_training(tmp_path, monkeypatch, refusal):
  workdir = tmp_path / "run"
  if refusal == "not a directory":
    workdir.write_text("a file")
  elif refusal == "another config":
    experiment.run(lanczos_config(), str(workdir))
  monkeypatch.setattr(runner_lib.tasks_lib, "train", refuse_training)
  changed = lanczos_config()
  changed.lanczos.k = 3
  message = {"not a directory": "Cannot write to", "locked": "Another run",
             "another config": r"config.lanczos.k: 2 -> 3"}[refusal]
  with workdir_lib.Lock(str(tmp_path), lead=refusal == "locked"):
    target = tmp_path if refusal == "locked" else workdir
    with pytest.raises(experiment.ConfigError, match=message):
      experiment.run(changed, str(target))


def test_result_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
  experiment.run(lanczos_config(), str(tmp_path))
  before = (tmp_path / "result.json").read_text()

  def fills_the_disk(value, f, **kwargs):
    f.write(json.dumps(value, **kwargs)[:100])
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(files.json, "dump", fills_the_disk)
  with pytest.raises(OSError, match="No space left"):
    experiment.run(lanczos_config(), str(tmp_path))
  assert (tmp_path / "result.json").read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "checkpoints", "eigenvectors", "lanczos.png", "result.json"]


def launch(workdir, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.main", f"--workdir={workdir}", *args],
      cwd=ROOT, env=env, capture_output=True, timeout=300, check=False)
  # Decoded by hand: text mode would turn the bar's \r into line breaks.
  return subprocess.CompletedProcess(proc.args, proc.returncode,
                                     proc.stdout.decode(), proc.stderr.decode())


@pytest.mark.parametrize("args,line", [
    (["--config=configs/mlp_digits.py:small", "--config.num_iteratons=3"],
     "deeplanczos: --config.num_iteratons: configs have no key "
     "'num_iteratons'; did you mean --config.num_iterations?"),
    (["--config=configs/mlp_digits.py", "--config.lanczos.kk=3"],
     "deeplanczos: --config.lanczos.kk: configs have no key 'lanczos.kk'; "
     "did you mean --config.lanczos.k?"),
    (["--config=configs/no_such_config.py"],
     "deeplanczos: --config=configs/no_such_config.py: no such file"),
    (["--config=configs/mlp_digits.py:small", "--config.mesh_shape=(3,1)"],
     "deeplanczos: The mesh does not fit the devices"),
])
def test_launcher_errors_are_one_line(tmp_path, args, line):
  proc = launch(tmp_path / "run", *args)
  assert proc.returncode != 0
  errors = [l for l in proc.stderr.splitlines() if l.startswith(("deeplanczos",
                                                                 "E", "F"))]
  assert len(errors) == 1 and errors[0].startswith(line), proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_default_run_prints_a_handful_of_lines(tmp_path):
  proc = launch(tmp_path / "run", "--config=configs/mlp_digits.py")
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stderr.split("\n") if l.strip()]
  ours = [l for l in lines if re.search(
      r"(runner|tasks|driver|checkpoint|main)\.py:\d+\]|power method:", l)]
  assert len(lines) <= 6 and len(lines) - len(ours) <= 1, proc.stderr
  bar = [l for l in lines if "power method:" in l]  # \r-separated updates
  assert len(bar) == 1 and "30/30" in bar[0].split("\r")[-1]
  assert "Hessian eigenvalue 8.35" in lines[-1]
