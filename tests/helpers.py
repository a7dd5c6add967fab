"""Small models with answers known without deeplanczos: dense Hessians."""

import importlib.util
import pathlib

import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np


class TinyMLP(nn.Module):
  """A 2-layer tanh MLP, small enough for a dense Hessian."""
  hidden: int = 5
  out: int = 3
  dtype: jnp.dtype = jnp.float64

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(self.hidden, param_dtype=self.dtype,
                          dtype=self.dtype)(x))
    return nn.Dense(self.out, param_dtype=self.dtype, dtype=self.dtype)(x)


def mlp_problem(n=60, d=4, dtype=jnp.float64, seed=0):
  """``(loss, params, x, y)`` for a tiny softmax-regression MLP."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(dtype)
  y = rng.integers(0, 3, size=n)
  model = TinyMLP(dtype=dtype)
  params = model.init(jax.random.key(seed), x[:1])

  def loss(p, xb, yb):
    logits = model.apply(p, xb)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  return loss, params, x, y


def batches_of(x, y, sizes):
  """Split ``(x, y)`` into consecutive batches of the given sizes."""
  assert sum(sizes) == len(x)
  edges = np.cumsum([0, *sizes])
  return [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def counting(program, calls, name=1):
  """The jitted ``program``, appending ``name`` to ``calls`` at each call;
  its ``lower`` (a compile ahead of the calls) is the program's own."""
  def counted(*args, **kwargs):
    calls.append(name)
    return program(*args, **kwargs)
  counted.lower = program.lower
  return counted


def dense_hessian(loss, params, x, y):
  """The full-data Hessian as a dense float64 matrix, and the unraveller."""
  flat, unravel = ravel_pytree(params)
  h = jax.hessian(lambda f: loss(unravel(f), x, y))(flat)
  return np.asarray(h, np.float64), unravel


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def quadratic_problem(eigenvalues, seed=0, shapes=((3,), (2, 2))):
  """A loss whose Hessian over the data is ``Q diag(eigenvalues) Q^T``.

  Example ``i`` contributes ``0.5 * N * lambda_i * (q_i . p)^2``, so the mean
  over the ``N = len(eigenvalues)`` examples has exactly that Hessian.
  Parameters are a dict of leaves with the given shapes.
  """
  eigenvalues = np.asarray(eigenvalues, np.float64)
  n = eigenvalues.size
  assert sum(int(np.prod(s)) for s in shapes) == n
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  params = {f"p{i}": jnp.asarray(
      np.random.default_rng(seed + 1 + i).normal(size=s)) for i, s in
            enumerate(shapes)}
  _, unravel = ravel_pytree(params)
  x = q.T * np.sqrt(n)
  y = eigenvalues

  def loss(p, xb, yb):
    v = ravel_pytree(p)[0]
    return 0.5 * jnp.mean(yb * (xb @ v) ** 2)

  return loss, params, x, y, q @ np.diag(eigenvalues) @ q.T


def user_task(config):
  """A user's own ``module:function`` task for the launcher."""
  del config
  loss, params, x, y = mlp_problem(dtype=np.float32)
  return loss, params, (x, y)


def nan_task(config):
  """A user task whose loss is NaN at its parameters."""
  loss, params, data = user_task(config)
  return loss, jax.tree.map(lambda a: a * np.nan, params), data


ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config(name="mlp_digits"):
  """``configs/NAME.py:small`` with the progress bar off."""
  spec = importlib.util.spec_from_file_location(
      name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("small")
  config.show_pbar = False
  return config
