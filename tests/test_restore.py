"""Parameters from a trainer's orbax checkpoints, onto the operator's layout."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import deeplanczos
from tests import helpers


def _trainer_run(directory, steps=(1, 2, 3)):
  """What a flax/orbax training loop leaves: params, optimizer state, step."""
  model = helpers.TinyMLP(hidden=16, out=8)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8)))
  tx = optax.adam(1e-2)
  saved = {}
  with ocp.CheckpointManager(directory) as manager:
    for step in steps:
      params = jax.tree.map(lambda a, s=step: a + s, params)
      state = {"params": params, "opt_state": tx.init(params), "step": step}
      manager.save(step, args=ocp.args.StandardSave(state))
      saved[step] = params
  return saved


def test_restores_a_step_onto_fsdp_shardings(tmp_path):
  saved = _trainer_run(tmp_path / "ckpt")
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  shapes = jax.eval_shape(lambda: saved[1])
  shardings = deeplanczos.infer_sharding(shapes, mesh, fsdp_axis="data",
                                         min_size=8)
  like = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                        sharding=h),
                      shapes, shardings)
  for step in (None, 2):
    got = deeplanczos.restore_params(str(tmp_path / "ckpt"), like, step=step)
    want = saved[3 if step is None else step]
    for g, w, s in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                       jax.tree.leaves(shardings)):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
      assert g.sharding == s
  kernel = got["params"]["Dense_0"]["kernel"]  # (8, 16)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", "model")
  assert kernel.addressable_shards[0].data.shape == (2, 8)
  assert len({s.device for s in kernel.addressable_shards}) == 8
  # The restored parameters are an operator's: its products are the dense
  # Hessian's at them.
  x = np.random.default_rng(0).normal(size=(24, 8))
  y = np.arange(24) % 8
  model = helpers.TinyMLP(hidden=16, out=8)
  loss = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, xb), yb).mean()
  op = deeplanczos.HessianOperator(loss, got, [(x, y)], shardings=shardings)
  v = jax.tree.map(np.ones_like, want)
  h, _ = helpers.dense_hessian(loss, want, x, y)
  np.testing.assert_allclose(helpers.flat(op.matvec(op.check_vector(v))),
                             h @ helpers.flat(v), rtol=1e-10)


def test_disagreements_are_named(tmp_path):
  saved = _trainer_run(tmp_path / "ckpt", steps=(5,))
  directory = str(tmp_path / "ckpt")
  like = jax.eval_shape(lambda: saved[5])
  bad = flax.core.unfreeze(like)
  bad["params"]["Dense_1"]["kernel"] = jax.ShapeDtypeStruct((16, 9),
                                                            jnp.float64)
  with pytest.raises(ValueError, match=r"params/Dense_1/kernel.*\(16, 9\).*"
                     r"\(16, 8\)"):
    deeplanczos.restore_params(directory, bad)
  with pytest.raises(ValueError, match="no step 4; it holds \\[5\\]"):
    deeplanczos.restore_params(directory, like, step=4)
  with pytest.raises(ValueError, match="no 'model' on the way"):
    deeplanczos.restore_params(directory, like, path="model/params")
  with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
    deeplanczos.restore_params(str(tmp_path / "nothing"), like)


def test_launcher_analyses_a_trainers_checkpoint(tmp_path, monkeypatch):
  from deeplanczos import experiment  # pylint: disable=g-import-not-at-top
  from deeplanczos.experiment import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  config = helpers.small_config()
  config.num_iterations = 10
  task = tasks_lib.build_task(config)
  params = jax.tree.map(lambda a: 1.5 * a, task.params)
  with ocp.CheckpointManager(tmp_path / "train") as manager:
    manager.save(7, args=ocp.args.StandardSave({"params": params}))
  config.params.directory = str(tmp_path / "train")
  monkeypatch.setattr(tasks_lib, "train",
                      lambda *a: pytest.fail("restored, not trained"))
  result = experiment.run(config, str(tmp_path / "work"))
  # The same power iteration, run directly on the checkpoint's parameters.
  batches = [(task.x[i:i + config.batch_size], task.y[i:i + config.batch_size])
             for i in range(0, len(task.y), config.batch_size)]
  direct = deeplanczos.power_iteration(
      task.loss, params, batches, num_iterations=config.num_iterations,
      key=jax.random.key(config.seed), show_pbar=False)
  np.testing.assert_allclose(result["eigenvalue"], direct.eigenvalue,
                             rtol=1e-5)
  config.params.path = "state/params"
  with pytest.raises(experiment.ConfigError, match="config.params: .*no "
                     "'state'"):
    experiment.run(config, str(tmp_path / "other"))
