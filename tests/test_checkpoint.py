"""Checkpoints: interrupted runs resume to the uninterrupted result, exactly."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deeplanczos
from deeplanczos import checkpoint
from deeplanczos import experiment
from deeplanczos.experiment import workdir as workdir_lib
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Interrupt(Exception):
  pass


class DiesAfter(checkpoint.Checkpointer):
  """Saves as usual, then dies (like a killed process) after some saves."""

  def __init__(self, directory, saves):
    super().__init__(directory, every=1)
    self.left = saves

  def save(self, step, arrays, meta):
    super().save(step, arrays, meta)
    self.left -= 1
    if self.left == 0:
      raise Interrupt()


METHODS = {
    "power": lambda loss, p, data, ck: deeplanczos.PowerMethodIterate(
        loss, p, data, 12, show_pbar=False, checkpointer=ck)[1]["eigenvalue"],
    "lanczos": lambda loss, p, data, ck: deeplanczos.lanczos(
        loss, p, data, 3, ncv=6, tol=1e-12, max_hvps=20, show_pbar=False,
        checkpointer=ck).eigenvalues,
    "density": lambda loss, p, data, ck: deeplanczos.spectral_density(
        loss, p, data, num_probes=4, num_steps=4, show_pbar=False,
        checkpointer=ck).density,
    "hutchpp": lambda loss, p, data, ck: np.array([deeplanczos.hutchpp(
        loss, p, data, num_hvps=9, show_pbar=False,
        checkpointer=ck).estimate]),
    "hutchinson": lambda loss, p, data, ck: np.array([deeplanczos.hutchinson(
        loss, p, data, num_probes=5, show_pbar=False,
        checkpointer=ck).estimate]),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_interrupted_method_resumes_bit_for_bit(tmp_path, method):
  loss, params, x, y = helpers.mlp_problem()
  data = helpers.batches_of(x, y, [20, 20, 20])
  run = METHODS[method]
  whole = run(loss, params, data, None)
  # Hutchinson's probes run in two compiled blocks here (one probe, then
  # the rest): it is interrupted after each.
  first = 1 if method == "hutchinson" else 2
  with pytest.raises(Interrupt):
    run(loss, params, data, DiesAfter(tmp_path, saves=first))
  with pytest.raises(Interrupt):  # a second interruption, later on
    run(loss, params, data, DiesAfter(tmp_path, saves=1))
  resumed = run(loss, params, data, checkpoint.Checkpointer(tmp_path))
  np.testing.assert_array_equal(resumed, whole)


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path, every=1)
  like = {"v": jnp.zeros(3)}
  ck.save(1, {"v": jnp.ones(3)}, {"step": 1})
  ck.save(2, {"v": 2 * jnp.ones(3)}, {"step": 2})
  for f in (tmp_path / "2").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  arrays, meta = checkpoint.Checkpointer(tmp_path).restore(like)
  assert meta == {"step": 1}
  np.testing.assert_array_equal(arrays["v"], np.ones(3))


def test_half_written_checkpoint_is_ignored(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path, every=1)
  ck.save(1, {"v": jnp.ones(3)}, {"step": 1})
  # What a process killed mid-save leaves: a step without its commit.
  (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
  arrays, meta = checkpoint.Checkpointer(tmp_path).restore({"v": jnp.zeros(3)})
  assert meta == {"step": 1}
  del arrays


def launch(workdir, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "launch.main",
         "--config=configs/mlp_digits.py:small", f"--workdir={workdir}",
         "--config.show_pbar=False", "--config.num_iterations=60",
         "--config.checkpoint_every=1", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def newest_step(workdir):
  steps = [int(p.name) for p in (workdir / "checkpoints" / "power").glob("*")
           if p.name.isdigit()]
  return max(steps, default=0)


def wait_for_step(proc, workdir, step, timeout=240):
  deadline = time.monotonic() + timeout
  while newest_step(workdir) < step:
    assert proc.poll() is None, proc.communicate()[0]
    assert time.monotonic() < deadline
    time.sleep(0.05)


@pytest.mark.slow
def test_killed_and_preempted_launcher_resumes_to_same_result(tmp_path):
  whole = launch(tmp_path / "whole")
  out, _ = whole.communicate(timeout=300)
  assert whole.returncode == 0, out
  workdir = tmp_path / "interrupted"
  proc = launch(workdir)
  wait_for_step(proc, workdir, 5)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not (workdir / "result.json").exists()
  killed_at = newest_step(workdir)
  proc = launch(workdir)  # resumes, then is preempted
  wait_for_step(proc, workdir, killed_at + 5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "Preempted" in out, out
  assert f"Resuming from checkpoint step {killed_at}" in out
  assert newest_step(workdir) < 60 and not (workdir / "result.json").exists()
  proc = launch(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  a = json.loads((tmp_path / "whole" / "result.json").read_text())["history"]
  b = json.loads((workdir / "result.json").read_text())["history"]
  for key in ("eigenvalue", "alpha", "q"):
    assert a[key] == b[key], key


def test_resume_with_another_config_or_mesh_is_refused(tmp_path):
  config = helpers.small_config()
  config.checkpoint_every = 1
  experiment.run(config, str(tmp_path))
  again = experiment.run(config, str(tmp_path))  # same run: resumes, finished
  assert again["history"] == experiment.run(config, str(tmp_path))["history"]
  for key, value, named in (("num_iterations", 7, "config.num_iterations"),
                            ("mesh_shape", (4, 2), "mesh.data: 8 -> 4")):
    changed = helpers.small_config()
    setattr(changed, key, value)
    with pytest.raises(experiment.ConfigError, match=re.escape(named)):
      experiment.run(changed, str(tmp_path))


def test_second_run_on_a_workdir_is_refused_and_stale_lock_is_not(tmp_path):
  with workdir_lib.Lock(str(tmp_path), lead=True):  # a run holding it
    with pytest.raises(experiment.ConfigError, match="Another run"):
      experiment.run(helpers.small_config(), str(tmp_path))
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / ".lock").write_text(f"{socket.gethostname()} {dead.pid}")
  experiment.run(helpers.small_config(), str(tmp_path))  # a killed run's lock
  assert (tmp_path / "result.json").exists()
  assert not (tmp_path / ".lock").exists()


def _steps(directory):
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _flip_a_digit_of_t(step_dir):
  """Adds 0.1 to the first entry of the Lanczos projected matrix ``T``."""
  path = step_dir / "meta" / "metadata"
  meta = json.loads(path.read_text())
  t = next(v for v in meta["host"].values()
           if isinstance(v, dict) and v.get("shape") == [6, 6])
  t["data"][0] += 0.1
  path.write_text(json.dumps(meta))


def _overwrite_array_bytes(step_dir):
  """16 bytes in the middle of every data file (the middle of one file
  alone may hold nothing that a restore reads: orbax's OCDBT data files also
  hold index nodes, and where the arrays' bytes sit depends on their
  values)."""
  for f in (step_dir / "arrays").rglob("*"):
    if f.is_file() and "/d/" in str(f):
      data = bytearray(f.read_bytes())
      middle = len(data) // 2
      data[middle:middle + 16] = b"\xff" * 16
      f.write_bytes(bytes(data))


def _array_value_changed(step_dir):
  """One element rewritten through orbax itself: every file stays valid."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  saver = ocp.StandardCheckpointer()
  arrays = saver.restore(step_dir / "arrays")
  name = max(arrays, key=lambda k: arrays[k].size)
  flat = np.asarray(arrays[name]).copy()
  flat.flat[flat.size // 2] = 2.5e38
  arrays[name] = jnp.asarray(flat)
  saver.save(step_dir / "arrays", arrays, force=True)
  saver.wait_until_finished()


def _empty_host_state(step_dir):
  (step_dir / "meta" / "metadata").write_text("{}")


@pytest.mark.parametrize("damage", [_flip_a_digit_of_t, _overwrite_array_bytes,
                                    _array_value_changed, _empty_host_state])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage,
                                                             caplog):
  loss, params, x, y = helpers.mlp_problem()
  data = helpers.batches_of(x, y, [20, 20, 20])
  run = METHODS["lanczos"]
  whole = run(loss, params, data, None)
  with pytest.raises(Interrupt):
    run(loss, params, data, DiesAfter(tmp_path, saves=4))
  newest = _steps(tmp_path)[-1]
  damage(tmp_path / str(newest))
  with caplog.at_level("INFO"):
    resumed = run(loss, params, data, checkpoint.Checkpointer(tmp_path))
  assert f"step {newest}" in caplog.text and "older one" in caplog.text
  assert f"Resuming from checkpoint step {newest - 1}" in caplog.text
  np.testing.assert_array_equal(resumed, whole)


def test_array_checksum_is_layout_free_and_sees_one_changed_word():
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  split = jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data", "model")))
  one = np.asarray(checkpoint.array_checksum(jnp.asarray(x)))
  np.testing.assert_array_equal(np.asarray(checkpoint.array_checksum(split)),
                                one)
  changed = x.copy()
  changed.view(np.uint32)[5, 3] ^= 1  # one bit of one word
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  for other in (changed, swapped, x.T.copy().reshape(8, 6)):
    assert (np.asarray(checkpoint.array_checksum(jnp.asarray(other)))
            != one).all()
  for dtype in (jnp.bfloat16, jnp.float64, jnp.int8, jnp.bool_):
    checkpoint.array_checksum(jnp.zeros((3, 2), dtype))


@pytest.fixture
def small_disk(tmp_path):
  """A 512 KiB tmpfs: a disk that fills, where this test may mount one."""
  mount = tmp_path / "disk"
  mount.mkdir()
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs",
                         str(mount)], capture_output=True)
  if made.returncode:
    pytest.skip(f"cannot mount a small tmpfs here: {made.stderr!r}")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_while_checkpointing_names_directory_and_last_step(
    small_disk):
  ck = checkpoint.Checkpointer(small_disk / "checkpoints", every=1)
  ck.save(1, {"v": jnp.ones(8)}, {"step": 1})
  with pytest.raises(checkpoint.WriteError) as e:
    for step in range(2, 50):  # incompressible, and larger every step
      ck.save(step, {"v": jax.random.normal(jax.random.key(step),
                                            (step, 2000))}, {"step": step})
  message = str(e.value)
  assert str(small_disk / "checkpoints") in message
  assert "the disk is full" in message
  assert re.search(r"The last good step is \d+", message)
  last = int(re.search(r"last good step is (\d+)", message).group(1))
  arrays, meta = checkpoint.Checkpointer(small_disk / "checkpoints").restore(
      {"v": jnp.zeros((last, 2000))})
  assert meta == {"step": last}
  np.testing.assert_array_equal(arrays["v"], jax.random.normal(
      jax.random.key(last), (last, 2000)))


def _contend(workdir, barrier, holders, overlaps):
  barrier.wait()
  try:
    with workdir_lib.Lock(workdir, lead=True):
      holders.value += 1
      if holders.value > 1:
        overlaps.value += 1
      time.sleep(0.05)
      holders.value -= 1
  except experiment.ConfigError:
    pass


def test_stale_lock_is_taken_by_exactly_one_of_several_contenders(tmp_path):
  import multiprocessing  # pylint: disable=g-import-not-at-top
  ctx = multiprocessing.get_context("fork")
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  holders, overlaps = ctx.Value("i", 0), ctx.Value("i", 0)
  for trial in range(10):
    workdir = tmp_path / str(trial)
    workdir.mkdir()
    (workdir / ".lock").write_text(f"{socket.gethostname()} {dead.pid}")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_contend, args=(str(workdir), barrier,
                                                holders, overlaps))
             for _ in range(4)]
    for p in procs:
      p.start()
    for p in procs:
      p.join(30)
      assert p.exitcode == 0
  assert overlaps.value == 0
