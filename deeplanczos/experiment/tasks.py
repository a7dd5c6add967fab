"""Tasks: a loss, trained parameters and the data, built from a config.

A task is what the Hessian is taken of. The built-in ones train a flax model
on digits or synthetic tokens with one Adam loop (:func:`train`); a model with
state (BatchNorm statistics) plugs into that loop through ``train_loss``,
and its Hessian loss is made from the final state by ``hessian_loss``.
"""

from collections.abc import Callable
import dataclasses
import importlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deeplanczos import data as data_lib
from deeplanczos import models
from deeplanczos._src import sharding as sharding_lib
from deeplanczos.experiment.config import ConfigError


@dataclasses.dataclass
class Task:
  """What a method needs, and how to train it first.

  Attributes:
    loss: ``loss(params, x, y)`` (or ``loss(params, x, y, rng)`` when
      ``takes_rng``), the mean loss of a batch.
    params: the parameters, possibly boxed with flax partitioning metadata
      (the sharding module reads it; everything else sees them unboxed).
    x, y: the data, leading dimension the examples.
    takes_rng: the loss takes a PRNG key (dropout).
    state: model state that training updates (BatchNorm's statistics).
    train_loss: ``(params, state, x, y, rng) -> (loss, new_state)`` for
      training a model with state; None trains ``loss``.
    hessian_loss: ``state -> loss``, the Hessian's loss at the trained state;
      None keeps ``loss``.
    model_fn: ``(params, x) -> outputs`` and ``output_loss: (outputs, y) ->
      scalar``, for ``config.curvature='ggn'``; None where the task has no
      such split.
  """
  loss: Callable
  params: Any
  x: np.ndarray
  y: np.ndarray
  takes_rng: bool = False
  state: Any = None
  train_loss: Callable | None = None
  hessian_loss: Callable | None = None
  model_fn: Callable | None = None
  output_loss: Callable | None = None


def _cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y).mean()


def _classifier(model, x, y, config) -> Task:
  params = jax.jit(model.init)(jax.random.key(config.seed), x[:1])
  return Task(lambda p, xb, yb: _cross_entropy(model.apply(p, xb), yb),
              params, x, y, model_fn=model.apply, output_loss=_cross_entropy)


def mlp_digits(config) -> Task:
  x, y = data_lib.load_digits()
  return _classifier(models.MLP(tuple(config.model.features)), x, y, config)


def cnn_digits(config) -> Task:
  x, y = data_lib.load_digits()
  return _classifier(models.CNN(tuple(config.model.channels),
                                config.model.hidden), x, y, config)


def transformer_tokens(config) -> Task:
  m = config.model
  x, y = data_lib.synthetic_tokens(config.data.num_sequences, m.max_len,
                                   m.vocab_size, seed=config.seed)
  model = models.Transformer(m.vocab_size, m.max_len, m.d_model, m.num_heads,
                             m.num_layers, m.mlp_dim)
  return _classifier(model, x, y, config)


def bn_dropout_digits(config) -> Task:
  """An MLP with BatchNorm and dropout on digits: a model with state.

  Training updates BatchNorm's running statistics. The Hessian's loss never
  does: with ``config.hessian.batch_norm='running'`` (the default) it uses
  the running statistics, with ``'batch'`` each device's batch statistics,
  whose update is discarded. With ``config.hessian.dropout`` dropout stays on
  in the Hessian, its masks fixed per batch by the operator's ``loss_rng``.
  """
  x, y = data_lib.load_digits()
  h = config.hessian
  if h.batch_norm not in ("running", "batch"):
    raise ConfigError("config.hessian.batch_norm must be 'running' or "
                      f"'batch'; got {h.batch_norm!r}.")
  if h.batch_norm == "batch" and len(y) % config.batch_size:
    raise ConfigError(
        "config.hessian.batch_norm='batch' needs full batches (a masked batch "
        f"is differentiated example by example): config.batch_size="
        f"{config.batch_size} must divide the {len(y)} examples.")
  model = models.BNDropoutMLP(tuple(config.model.features),
                              dropout_rate=config.model.dropout_rate)
  variables = model.init(jax.random.key(config.seed), x[:2],
                         use_running_average=False, dropout=False)

  def apply(p, s, xb, rng, running, dropout):
    return model.apply({"params": p, "batch_stats": s}, xb,
                       use_running_average=running, dropout=dropout,
                       rngs={"dropout": rng}, mutable=["batch_stats"])

  def train_loss(p, s, xb, yb, rng):
    logits, new = apply(p, s, xb, rng, running=False, dropout=True)
    return _cross_entropy(logits, yb), new["batch_stats"]

  def hessian_loss(stats):
    running = h.batch_norm == "running"

    def loss(p, xb, yb, rng):
      logits, _ = apply(p, stats, xb, rng, running=running, dropout=h.dropout)
      return _cross_entropy(logits, yb)

    return loss

  stats = variables["batch_stats"]
  return Task(hessian_loss(stats), variables["params"], x, y, takes_rng=True,
              state=stats, train_loss=train_loss, hessian_loss=hessian_loss)


TASKS = {"mlp_digits": mlp_digits, "cnn_digits": cnn_digits,
         "transformer_tokens": transformer_tokens,
         "bn_dropout_digits": bn_dropout_digits}


def build_task(config) -> Task:
  """A built-in task by name, or a user's ``'module:function'``.

  A user's function takes the config and returns ``(loss, params, (x, y))``
  with ``x``, ``y`` arrays whose leading dimension is the examples.
  """
  name = config.task
  if name in TASKS:
    return TASKS[name](config)
  if ":" not in name:
    raise ConfigError(f"config.task must be one of {sorted(TASKS)} or "
                      f"'module:function'; got {name!r}.")
  module_name, fn_name = name.split(":", 1)
  try:
    fn = getattr(importlib.import_module(module_name), fn_name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"config.task {name!r}: cannot import {fn_name!r} from "
                      f"module {module_name!r} ({e}).") from e
  loss, params, (x, y) = fn(config)
  return Task(loss, params, np.asarray(x), np.asarray(y))


OPTIMIZERS = {"adam": optax.adam, "sgd": optax.sgd}


def train(task: Task, config, save: Callable | None = None) -> Task:
  """A few deterministic epochs of ``config.train``, so the Hessian is a
  trained net's.

  Args:
    task: the task at its initialization.
    config: ``config.train`` gives the steps, batch size, optimizer
      (``'adam'`` or ``'sgd'``) and learning rate.
    save: called as ``save(step, params, opt_state)`` before the first step
      (step 0) and after every step, as a trainer that checkpoints would.

  Returns:
    The task at its trained parameters (unboxed, on the host) and, for a
    model with state, with its Hessian loss made from the trained state.
  """
  params = sharding_lib.unbox(task.params)
  steps = config.train.steps
  if not steps:
    return dataclasses.replace(task, params=params)
  train_loss = task.train_loss or (
      lambda p, s, xb, yb, rng: (task.loss(p, xb, yb), s))
  name = config.train.get("optimizer", "adam")
  if name not in OPTIMIZERS:
    raise ConfigError(f"config.train.optimizer must be one of "
                      f"{sorted(OPTIMIZERS)}; got {name!r}.")
  tx = OPTIMIZERS[name](config.train.learning_rate)

  @jax.jit
  def step(params, state, opt_state, x, y, rng):
    (value, state), grads = jax.value_and_grad(train_loss, has_aux=True)(
        params, state, x, y, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, value

  params, state = jax.device_put((params, task.state), jax.local_devices()[0])
  opt_state = tx.init(params)
  key = jax.random.key(config.seed)
  rng = np.random.default_rng(config.seed)
  n, bs = len(task.y), config.train.batch_size
  order = np.zeros(0, int)
  if save is not None:
    save(0, params, opt_state)
  for i in range(steps):
    if len(order) < bs:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:bs], order[bs:]
    params, state, opt_state, value = step(params, state, opt_state,
                                           task.x[idx], task.y[idx],
                                           jax.random.fold_in(key, i))
    if save is not None:
      save(i + 1, params, opt_state)
  logging.info("Trained %d steps; last batch loss %.4f.", steps, float(value))
  params, state = jax.device_get((params, state))
  loss = task.loss if task.hessian_loss is None else task.hessian_loss(state)
  return dataclasses.replace(task, params=params, state=state, loss=loss)
