"""The loop driver: state split for checkpoints, budget, SIGTERM."""

import json
import os
import signal
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deeplanczos
from deeplanczos import checkpoint
from deeplanczos._src import driver
from tests import helpers


class State(NamedTuple):
  v: Any
  history: np.ndarray
  count: int
  value: float
  flag: bool
  key: Any


def test_split_and_join_round_trip_exactly():
  state = State({"a": jnp.arange(3.0)},
                np.array([1 / 3, np.nan, np.inf, -np.inf]), 7, 0.1 + 0.2,
                True, jax.random.key(5))
  arrays, host = driver.split(state)
  assert set(arrays) == {"0"}  # the device array; the rest is JSON
  host = json.loads(json.dumps(host))  # what the checkpoint stores
  back = driver.join(state, arrays, host)
  np.testing.assert_array_equal(back.history, state.history)
  assert back.count == 7 and back.value == 0.1 + 0.2 and back.flag is True
  np.testing.assert_array_equal(jax.random.key_data(back.key),
                                jax.random.key_data(state.key))
  with pytest.raises(ValueError, match="does not hold this method's state"):
    driver.join(state._replace(v=(1.0, 2.0)), arrays, host)


def count_method(total, send_sigterm_at=None):
  def step(op, s):
    op.num_matvecs += 2
    if s.count + 1 == send_sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return s._replace(count=s.count + 1)
  return driver.Method("count", step, lambda s: s.count >= total, 2 * total)


class FakeOp:
  num_matvecs = 0


def first_state():
  return State({"a": jnp.zeros(2)}, np.zeros(1), 0, 0.0, False,
               jax.random.key(0))


def test_budget_stops_and_counts_products():
  run = driver.run(FakeOp(), count_method(10), first_state(), max_hvps=7)
  assert run.state.count == 4 and run.num_hvps == 8
  assert run.stopped_by == "max_hvps" and len(run.seconds) == 4
  run = driver.run(FakeOp(), count_method(3), first_state())
  assert run.stopped_by == "done" and run.num_hvps == 6


def test_sigterm_saves_stops_and_restores_the_handler(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  ck = checkpoint.Checkpointer(tmp_path, every=0, handle_sigterm=True)
  with pytest.raises(checkpoint.Preempted) as e:
    driver.run(FakeOp(), count_method(10, send_sigterm_at=3), first_state(),
               checkpointer=ck)
  assert e.value.step == 3
  assert signal.getsignal(signal.SIGTERM) is previous
  resumed = driver.run(FakeOp(), count_method(10), first_state(),
                       checkpointer=checkpoint.Checkpointer(tmp_path))
  assert resumed.state.count == 10 and resumed.num_hvps == 20
  assert len(resumed.seconds) == 10


def test_operator_first_and_loss_first_agree():
  loss, params, x, y = helpers.mlp_problem()
  h, _ = helpers.dense_hessian(loss, params, x, y)
  w = np.linalg.eigvalsh(h)
  top = w[np.argmax(np.abs(w))]
  op = deeplanczos.HessianOperator(loss, params, [(x, y)])
  r = deeplanczos.power_iteration(op, num_iterations=300, show_pbar=False)
  assert isinstance(r, deeplanczos.PowerResult)
  np.testing.assert_allclose(r.eigenvalue, top, rtol=1e-6)
  assert r.num_hvps == len(r.eigenvalues) == len(r.seconds) == 300
  same = deeplanczos.power_iteration(loss, params, [(x, y)],
                                     num_iterations=300, show_pbar=False)
  assert same.eigenvalue == r.eigenvalue
  with pytest.raises(TypeError, match="build the operator with them"):
    deeplanczos.lanczos(op, 2, mesh=op.mesh)
  with pytest.raises(TypeError, match="HessianOperator, or a loss"):
    deeplanczos.hutchinson(loss, params)
