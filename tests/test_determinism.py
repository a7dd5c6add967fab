"""The operator is one fixed symmetric matrix, with BatchNorm and dropout too."""

import jax
import numpy as np
import pytest

import deeplanczos
from deeplanczos import data as data_lib
from deeplanczos import experiment
from tests import helpers


@pytest.fixture(scope="module")
def bn_task():
  config = helpers.small_config("bn_dropout_digits")
  return config, experiment.build_task(config)


def operator(task, config, **kwargs):
  data = data_lib.batch_dataset(task.x, task.y, config.batch_size)
  return deeplanczos.HessianOperator(task.loss, task.params, data,
                                     batch_parser=data_lib.parse_batch,
                                     **kwargs)


def test_check_passes_with_batchnorm_and_dropout(bn_task):
  config, task = bn_task
  data = data_lib.batch_dataset(task.x, task.y, config.batch_size)
  check = deeplanczos.check_operator(
      task.loss, task.params, data, batch_parser=data_lib.parse_batch,
      loss_rng=jax.random.key(7))
  assert check.deterministic and check.symmetric, check
  assert check.repeat_difference == 0.0


def test_dropout_is_on_and_fixed_by_the_key(bn_task):
  config, task = bn_task
  v = None
  products = []
  for key in (1, 1, 2):
    op = operator(task, config, loss_rng=jax.random.key(key))
    v = op.random_vector(jax.random.key(0)) if v is None else v
    products.append(helpers.flat(op.matvec(v)))
  np.testing.assert_array_equal(products[0], products[1])
  assert np.linalg.norm(products[0] - products[2]) > 1e-3 * np.linalg.norm(
      products[0])


def test_batch_statistics_mode_differs_and_state_is_untouched(bn_task):
  config, task = bn_task
  del task
  config_batch = helpers.small_config("bn_dropout_digits")
  config_batch.hessian.batch_norm = "batch"
  with pytest.raises(experiment.ConfigError, match="must divide the 1797"):
    experiment.build_task(config_batch)
  config_batch.hessian.dropout = False
  config_batch.batch_size = 599  # divides 1797
  batch_task = experiment.build_task(config_batch)
  config.hessian.dropout = False
  running = experiment.build_task(config)
  x, y = running.x[:599], running.y[:599]
  key = jax.random.key(0)
  a = running.loss(running.params, x, y, key)
  b = batch_task.loss(batch_task.params, x, y, key)
  assert abs(float(a) - float(b)) > 1e-4  # batch statistics really used
  again = batch_task.loss(batch_task.params, x, y, key)
  assert float(again) == float(b)  # and the BatchNorm state did not move


def test_check_fails_on_data_that_changes_between_passes():
  loss, params, x, y = helpers.mlp_problem()

  class Noisy:
    """Fresh noise on every pass: a different H each time."""
    def __init__(self):
      self.rng = np.random.default_rng(0)
    def __iter__(self):
      return iter([(x + 0.3 * self.rng.normal(size=x.shape), y)])

  # Streamed: data kept on the devices is read once, and so is fixed.
  bad = deeplanczos.check_operator(loss, params, Noisy(),
                                   data_on_device=False)
  assert not bad.deterministic and bad.repeat_difference > 1e-2
  good = deeplanczos.check_operator(loss, params, [(x, y)])
  assert good.deterministic and good.symmetric
  assert good.asymmetry < 1e-12


def test_launcher_records_the_check(tmp_path):
  config = helpers.small_config("bn_dropout_digits")
  result = experiment.run(config, str(tmp_path))
  assert result["operator_check"]["deterministic"]
  assert result["operator_check"]["symmetric"]
