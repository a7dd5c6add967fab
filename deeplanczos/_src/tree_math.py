"""Leaf-wise linear algebra on parameter-shaped pytrees.

Vectors are never flattened: each leaf keeps its shape, dtype and sharding, and
every reduction is a sum of per-leaf reductions (as optax's power iteration
does), so a vector sharded over a mesh is reduced on device.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


# Every product of vectors here is taken in full float32 (or wider): JAX's
# default precision rounds float32 matrix products to bfloat16 on TPUs (the
# TPU compiler's default for a basis rotation is one bfloat16 pass) and to
# TensorFloat32 on recent NVIDIA GPUs, three significant digits, which
# would cost the Krylov basis its orthogonality and the eigenvectors their
# accuracy. These products read a few vectors per product computed, so the
# extra passes cost little.
HIGHEST = jax.lax.Precision.HIGHEST


def accumulation_dtype(dtype):
  """The dtype reductions are carried out in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def tree_vdot(x, y):
  """Inner product ``<x, y>`` of two pytrees, accumulated in >= float32."""
  def leaf(a, b):
    dt = accumulation_dtype(jnp.result_type(a, b))
    return jnp.vdot(a.astype(dt), b.astype(dt), precision=HIGHEST)
  return sum(jax.tree.leaves(jax.tree.map(leaf, x, y)))


def tree_max_abs(x):
  """``max |x_i|`` over every leaf, in >= float32."""
  return functools.reduce(jnp.maximum, [
      jnp.max(jnp.abs(l)).astype(accumulation_dtype(l.dtype))
      for l in jax.tree.leaves(x)])


def tree_norm(x):
  """Euclidean norm of a pytree, accumulated in >= float32.

  Computed as ``m * ||x / m||`` with ``m = max |x_i|``, so it neither
  overflows (a float32 vector of entries near ``1e20``) nor underflows
  where the norm itself is representable.
  """
  m = tree_max_abs(x)
  safe = jnp.where((m > 0) & jnp.isfinite(m), m, 1)
  scaled = jax.tree.map(lambda l: l.astype(safe.dtype) / safe, x)
  return jnp.where(jnp.isfinite(m), safe * jnp.sqrt(tree_vdot(scaled, scaled)),
                   m) * (m > 0)


def tree_scale(x, s):
  """``s * x``, keeping every leaf's dtype."""
  return jax.tree.map(lambda a: (a * s).astype(a.dtype), x)


def tree_axpy(a, x, y):
  """``a * x + y``, keeping the dtypes of ``y``."""
  return jax.tree.map(lambda u, v: (a * u + v).astype(v.dtype), x, y)


def tree_random(key, like, sampler=jax.random.normal, together=None):
  """A random pytree with ``like``'s structure, shapes and dtypes.

  ``sampler(key, shape, dtype)`` draws each leaf, with its own key:
  ``jax.random.normal`` (the default) or ``jax.random.rademacher``.

  ``together`` (one tag or None per leaf) draws the leaves that share a tag
  and a dtype as one vmapped draw of the longest one's size, each leaf the
  prefix of its row: one random-bits program for many small leaves instead
  of one each (XLA:CPU compiles each in about 0.17 s). With JAX's
  partitionable threefry keys (its default) a leaf's values depend only on
  its key and its elements' positions, so they equal the leaf drawn alone;
  with other keys every leaf is drawn alone.
  """
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  if together is None or not (
      getattr(jax.config, "jax_threefry_partitionable", True)  # newer: always
      and str(jax.random.key_impl(key)) == "threefry2x32"):
    together = (None,) * len(leaves)
  groups = {}
  for i, (leaf, tag) in enumerate(zip(leaves, together)):
    groups.setdefault(i if tag is None else (tag, jnp.dtype(leaf.dtype)),
                      []).append(i)
  out = [None] * len(leaves)
  for members in groups.values():
    if len(members) == 1:
      leaf = leaves[members[0]]
      out[members[0]] = sampler(keys[members[0]], leaf.shape, leaf.dtype)
      continue
    sizes = [math.prod(leaves[i].shape) for i in members]
    dtype = leaves[members[0]].dtype
    rows = jax.vmap(lambda k, n=max(sizes), d=dtype: sampler(k, (n,), d))(
        keys[np.asarray(members)])
    for row, i, size in zip(rows, members, sizes):
      out[i] = row[:size].reshape(leaves[i].shape)
  return treedef.unflatten(out)


def tree_size(x):
  """Total number of scalars in a pytree."""
  return sum(int(jnp.size(l)) for l in jax.tree.leaves(x))
