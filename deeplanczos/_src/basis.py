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
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


# A program that runs once per call over vectors up to this size compiles
# without LLVM's optimizations on XLA:CPU: the Lanczos start's on the digits
# MLP (3,466 parameters) compiles in about half the time and runs 0.1 ms
# slower; at about 2**20 parameters the slower run would cost what the
# compile saves. (Random draws stay optimized: threefry unoptimized runs 4x
# slower, 1 ms a call on that MLP.)
_UNOPTIMIZED = 2**20


def start_program(template, size, shardings, dtype=None, normalize=False):
  """A jitted ``v -> (basis, v)``: :func:`zeros` with ``v`` in slot 0, and
  ``v`` in the basis's dtype on ``shardings``, in one program (keep it: each
  call of this function builds a new one). With ``normalize``, ``v`` is
  first scaled to unit norm.
  """
  leaves = jax.tree.leaves(shardings)
  once = None
  if (leaves[0].mesh.devices.flat[0].platform == "cpu"
      and tree_math.tree_size(template) <= _UNOPTIMIZED):
    once = {"xla_backend_optimization_level": 0}
  specs = _specs(template, (size,), dtype)
  treedef = jax.tree.structure(template)
  layout = sharding_lib.basis_shardings(template, shardings, size)
  pack = packing(template, shardings, [
      jax.ShapeDtypeStruct(s, d, sharding=l)
      for (s, d), l in zip(specs, jax.tree.leaves(layout))])

  def make(v):
    if normalize:
      v = tree_math.tree_scale(v, 1.0 / tree_math.tree_norm(pack.pack(v)))
    first = [x.astype(d) for (_, d), x in zip(specs, jax.tree.leaves(v))]
    basis = [jnp.zeros(s, d).at[0].set(x) for (s, d), x in zip(specs, first)]
    return treedef.unflatten(basis), treedef.unflatten(first)
  return jax.jit(make, out_shardings=(layout, shardings),
                 compiler_options=once)


def stack_start_program(template, count, size, shardings, draw):
  """A jitted ``keys -> bases``: ``count`` bases (a leading axis), each as
  :func:`zeros` makes it, base ``i`` with ``draw(keys[i])`` scaled to unit
  norm in slot 0, in one program (keep it: each call builds a new one)."""
  specs = _specs(template, (count, size), None)
  treedef = jax.tree.structure(template)
  layout = sharding_lib.stacked(sharding_lib.basis_shardings(
      template, shardings, size))
  pack = packing(template, shardings, [
      jax.ShapeDtypeStruct(s, d, sharding=l)
      for (s, d), l in zip(specs, jax.tree.leaves(layout))])

  def unit(key):
    v = draw(key)
    return tree_math.tree_scale(v, 1.0 / tree_math.tree_norm(pack.pack(v)))

  def make(keys):
    first = jax.tree.leaves(jax.vmap(unit)(keys))
    return treedef.unflatten([jnp.zeros(s, d).at[:, 0].set(x.astype(d))
                              for (s, d), x in zip(specs, first)])
  return jax.jit(make, out_shardings=layout)


# Leaves up to this size are small: a program may pack them (below).
SMALL = 2**16


class Packing(NamedTuple):
  """Small replicated leaves kept as one flat array inside a program.

  XLA compiles every per-leaf operation of a program on its own (on
  XLA:CPU about 15-80 ms each), and runs each as its own kernel; a model's
  many small leaves (biases, norm scales, a small model's every leaf) make
  a Lanczos step's reorthogonalization, norm and updates cost dozens of
  them. A program that packs them concatenates each group (one per dtype)
  on its last axis once, works on the groups as on any other leaf, and
  unpacks at its end. Only leaves that are whole on every device (their
  vectors' and their basis's shardings replicated) and at most ``SMALL``
  are packed, so nothing moves between devices and the copy is small.
  Hashable: a static argument of the program.

  Attributes:
    treedef: the vectors' structure.
    shapes: every leaf's shape.
    groups: leaf indices packed together, one tuple per group.
  """
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  groups: tuple[tuple[int, ...], ...]

  def pack(self, tree, lead: int = 0):
    """``(groups, others)``: each group's leaves flattened past ``lead``
    axes and concatenated, and the other leaves as they are."""
    leaves = self.treedef.flatten_up_to(tree)
    packed = tuple(jnp.concatenate(
        [leaves[i].reshape(*leaves[i].shape[:lead], -1) for i in group],
        axis=lead) for group in self.groups)
    inside = {i for group in self.groups for i in group}
    return packed, tuple(l for i, l in enumerate(leaves) if i not in inside)

  def unpack(self, packed, lead: int = 0):
    """The tree that :meth:`pack` took."""
    groups, others = packed
    leaves = [None] * len(self.shapes)
    for group, flat in zip(self.groups, groups):
      start = 0
      for i in group:
        size = math.prod(self.shapes[i])
        part = jax.lax.slice_in_dim(flat, start, start + size, axis=lead)
        leaves[i] = part.reshape(*flat.shape[:lead], *self.shapes[i])
        start += size
    rest = iter(others)
    return self.treedef.unflatten(
        [next(rest) if l is None else l for l in leaves])


def packing(template, shardings, basis) -> Packing:
  """The :class:`Packing` for ``basis`` (arrays or ``ShapeDtypeStruct``s
  with shardings) of vectors like ``template`` on ``shardings``: leaves of
  one dtype in the vectors and one in the basis are a group."""
  leaves, treedef = jax.tree.flatten(template)
  groups = {}
  for i, (leaf, s, b) in enumerate(zip(leaves, jax.tree.leaves(shardings),
                                       jax.tree.leaves(basis))):
    if (s.is_fully_replicated and b.sharding.is_fully_replicated
        and math.prod(leaf.shape) <= SMALL):
      groups.setdefault((jnp.dtype(leaf.dtype), jnp.dtype(b.dtype)),
                        []).append(i)
  return Packing(treedef, tuple(tuple(l.shape) for l in leaves),
                 tuple(tuple(g) for g in groups.values() if len(g) > 1))


@functools.partial(jax.jit, donate_argnums=0)
def put(basis, index, v, factor=1.0):
  """``basis[index] = factor * v`` (the product in ``v``'s dtype first, as
  :func:`scale` computes it)."""
  def leaf(b, x):
    return b.at[index].set((x * factor).astype(x.dtype).astype(b.dtype))
  return jax.tree.map(leaf, basis, v)


@jax.jit
def get(basis, index):
  """``basis[index]``, a vector."""
  return jax.tree.map(lambda b: b[index], basis)


def _coefficients(basis, v):
  """``c_i = <basis_i, v>`` for every slot, in >= float32."""
  def leaf(b, x):
    dt = tree_math.accumulation_dtype(b.dtype)
    return jnp.tensordot(b.astype(dt), x.astype(dt), axes=x.ndim,
                         precision=tree_math.HIGHEST)
  return sum(jax.tree.leaves(jax.tree.map(leaf, basis, v)))


def _subtract(basis, v, c):
  """``v - sum_i c_i basis_i``."""
  def leaf(b, x):
    dt = tree_math.accumulation_dtype(b.dtype)
    sub = jnp.tensordot(c.astype(dt), b.astype(dt), axes=1,
                        precision=tree_math.HIGHEST)
    return (x.astype(dt) - sub).astype(x.dtype)
  return jax.tree.map(leaf, basis, v)


@functools.partial(jax.jit, static_argnames="packing")
def orthogonalize(basis, v, count, packing=None):
  """Removes from ``v`` its components along ``basis[:count]``.

  Classical Gram-Schmidt applied twice ("twice is enough"), so ``v`` is
  orthogonal to the slots to working precision. With ``packing`` (a
  :class:`Packing`), on the basis and ``v`` packed, ``w`` unpacked.

  Returns:
    ``(w, c, norm)``: the orthogonalized vector (in the basis's dtypes),
    the total coefficients
    ``c_i = <basis_i, v>`` (zero for slots ``>= count``), and ``||w||``.
  """
  if packing is None:
    return _orthogonalize(basis, v, count)
  w, c, norm = _orthogonalize(packing.pack(basis, lead=1), packing.pack(v),
                              count)
  return packing.unpack(w), c, norm


def _orthogonalize(basis, v, count):
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
    return jnp.tensordot(y.astype(dt).T, b.astype(dt), axes=1,
                         precision=tree_math.HIGHEST).astype(b.dtype)
  return jax.tree.map(leaf, basis)


combine = jax.jit(_combination)
# The same with the old basis donated: a restart's new basis (``y`` square,
# zero-padded) may reuse its buffers.
rotate = jax.jit(_combination, donate_argnums=0)


def head(basis, count):
  """``basis[:count]``, exactly: the product with the identity's first
  ``count`` columns. XLA:CPU calls a library for it where a slice compiles
  a kernel per leaf (0.017 against 0.084 s for the digits MLP's basis)."""
  leaves = jax.tree.leaves(basis)
  return combine(basis, np.eye(leaves[0].shape[0], count,
                               dtype=np.float32))


@jax.jit
def scale(v, s):
  return tree_math.tree_scale(v, s)
