"""A Krylov basis stored as a parameter-shaped pytree with a leading axis.

Leaf ``l`` of the basis has shape ``(m, *l.shape)`` and the sharding
``P(None, *spec_l)``, further split over the mesh axes that ``spec_l`` leaves
unused (``sharding.basis_shardings``): a basis takes ``1 / devices`` of its
size on each device whatever the parameters' layout, and reorthogonalization
reduces over the devices without gathering a vector on one of them.
Every function here is jitted once per basis shape and takes slot indices as
traced integers, so nothing recompiles as a recurrence advances.
"""

import functools

import jax
import jax.numpy as jnp

from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math


@functools.lru_cache(maxsize=64)
def _zeros_program(treedef, specs, shardings):
  make = lambda: treedef.unflatten([jnp.zeros(s, d) for s, d in specs])
  return jax.jit(make, out_shardings=treedef.unflatten(shardings))


def _specs(template, lead, dtype):
  """Each leaf's basis shape (``lead`` axes first) and dtype: ``dtype``, by
  default the leaf's but at least float32."""
  return tuple(((*lead, *t.shape), jnp.dtype(
      tree_math.accumulation_dtype(t.dtype) if dtype is None else dtype))
               for t in jax.tree.leaves(template))


def zeros_stack(template, count, size, shardings, dtype=None):
  """``count`` all-zero bases (a leading axis), each as :func:`zeros` makes."""
  specs = _specs(template, (count, size), dtype)
  layout = sharding_lib.stacked(sharding_lib.basis_shardings(
      template, shardings, size))
  return _zeros_program(jax.tree.structure(template), specs,
                        tuple(jax.tree.leaves(layout)))()


def zeros(template, size, shardings, dtype=None):
  """An all-zero basis of ``size`` vectors like ``template``.

  Stored in ``dtype``, by default at least float32 (a bfloat16 basis loses
  orthogonality at its 3 significant digits: Lanczos on bfloat16
  parameters then finds 1.23 for a top eigenvalue of 1.92). The program is
  cached on the shapes, dtypes and shardings, so a second run of a method
  compiles nothing.
  """
  specs = _specs(template, (size,), dtype)
  treedef = jax.tree.structure(template)
  layout = sharding_lib.basis_shardings(template, shardings, size)
  return _zeros_program(treedef, specs, tuple(jax.tree.leaves(layout)))()


def start_program(template, size, shardings, dtype=None):
  """A jitted ``v -> (basis, v)``: :func:`zeros` with ``v`` in slot 0, and
  ``v`` in the basis's dtype on ``shardings``, in one program (keep it: each
  call of this function builds a new one)."""
  specs = _specs(template, (size,), dtype)
  treedef = jax.tree.structure(template)
  layout = sharding_lib.basis_shardings(template, shardings, size)

  def make(v):
    first = [x.astype(d) for (_, d), x in zip(specs, jax.tree.leaves(v))]
    basis = [jnp.zeros(s, d).at[0].set(x) for (s, d), x in zip(specs, first)]
    return treedef.unflatten(basis), treedef.unflatten(first)
  return jax.jit(make, out_shardings=(layout, shardings))


@functools.partial(jax.jit, donate_argnums=0)
def put(basis, index, v):
  """``basis[index] = v``."""
  return jax.tree.map(lambda b, x: b.at[index].set(x.astype(b.dtype)), basis,
                      v)


@jax.jit
def get(basis, index):
  """``basis[index]``, a vector."""
  return jax.tree.map(lambda b: b[index], basis)


@functools.partial(jax.jit, static_argnames="count")
def head(basis, count):
  """``basis[:count]``, in one program."""
  return jax.tree.map(lambda b: b[:count], basis)


def _coefficients(basis, v):
  """``c_i = <basis_i, v>`` for every slot, in >= float32."""
  def leaf(b, x):
    dt = tree_math.accumulation_dtype(b.dtype)
    return jnp.tensordot(b.astype(dt), x.astype(dt), axes=x.ndim)
  return sum(jax.tree.leaves(jax.tree.map(leaf, basis, v)))


def _subtract(basis, v, c):
  """``v - sum_i c_i basis_i``."""
  def leaf(b, x):
    dt = tree_math.accumulation_dtype(b.dtype)
    return (x.astype(dt) - jnp.tensordot(c.astype(dt), b.astype(dt),
                                         axes=1)).astype(x.dtype)
  return jax.tree.map(leaf, basis, v)


@jax.jit
def orthogonalize(basis, v, count):
  """Removes from ``v`` its components along ``basis[:count]``.

  Classical Gram-Schmidt applied twice ("twice is enough"), so ``v`` is
  orthogonal to the slots to working precision.

  Returns:
    ``(w, c, norm)``: the orthogonalized vector (in the basis's dtypes),
    the total coefficients
    ``c_i = <basis_i, v>`` (zero for slots ``>= count``), and ``||w||``.
  """
  v = jax.tree.map(lambda b, x: x.astype(b.dtype), basis, v)
  size = jax.tree.leaves(basis)[0].shape[0]
  mask = jnp.arange(size) < count
  c1 = jnp.where(mask, _coefficients(basis, v), 0)
  v = _subtract(basis, v, c1)
  c2 = jnp.where(mask, _coefficients(basis, v), 0)
  v = _subtract(basis, v, c2)
  return v, c1 + c2, tree_math.tree_norm(v)


def _combination(basis, y):
  """Vectors ``sum_i y_ij basis_i``, stacked on a leading axis of ``y.shape[1]``."""
  def leaf(b):
    dt = tree_math.accumulation_dtype(b.dtype)
    return jnp.tensordot(y.astype(dt).T, b.astype(dt), axes=1).astype(b.dtype)
  return jax.tree.map(leaf, basis)


combine = jax.jit(_combination)
# The same with the old basis donated: a restart's new basis (``y`` square,
# zero-padded) may reuse its buffers.
rotate = jax.jit(_combination, donate_argnums=0)


@jax.jit
def scale(v, s):
  return tree_math.tree_scale(v, s)
