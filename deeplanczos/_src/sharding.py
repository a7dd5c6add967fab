"""Device meshes and shardings, always passed explicitly (no global mesh)."""

from collections.abc import Callable, Sequence
import math

import flax.linen as nn
from flax.core import meta
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np


def make_mesh(axes: Sequence[tuple[str, int]] = (("data", -1), ("model", 1)),
              devices=None) -> Mesh:
  """Builds a mesh from ``[(name, size), ...]``; one size may be -1 (the rest).

  Args:
    axes: axis names and sizes, e.g. ``[("data", 4), ("model", 2)]``. At most
      one size is -1, which takes all devices the other axes leave.
    devices: the devices to lay out (default: ``jax.devices()``, all hosts).

  Returns:
    A ``jax.sharding.Mesh`` with ``Auto`` axis types.

  Example:
    >>> mesh = make_mesh([("data", -1), ("model", 1)], jax.devices()[:1])
    >>> dict(mesh.shape)
    {'data': 1, 'model': 1}
  """
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"Mesh axis names must be distinct, got {names}.")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
        f"Mesh sizes must be positive, with at most one -1; got {axes}.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(
          f"Mesh {axes} needs a device count divisible by {known}, but "
          f"{len(devices)} devices are present.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"Mesh {dict(zip(names, sizes))} has {math.prod(sizes)} positions but "
        f"{len(devices)} devices are present.")
  grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def infer_sharding(params, mesh: Mesh, *, model_axis: str = "model",
                   min_size: int = 1024):
  """Default rule: shard each leaf's largest dimension the model axis divides.

  Leaves with fewer than ``min_size`` elements, and leaves none of whose
  dimensions the model axis divides, are replicated. Every leaf is replicated
  over the other mesh axes. Replace this function (``shardings_rule=``) to use
  another layout.

  Args:
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
    mesh: the mesh.
    model_axis: the mesh axis that parameters are split over.
    min_size: leaves smaller than this stay replicated.

  Returns:
    A pytree of ``NamedSharding`` shaped like ``params``.
  """
  n = mesh.shape.get(model_axis, 1)

  def rule(x):
    shape = np.shape(x)
    if n == 1 or math.prod(shape) < min_size:
      return NamedSharding(mesh, P())
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0]
    if not dims:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[dims[0]] = model_axis
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(rule, params)


def _is_boxed(x):
  return isinstance(x, meta.AxisMetadata)


def unbox(params):
  """``params`` with flax partitioning metadata removed (a no-op without)."""
  return meta.unbox(params)


def has_metadata(params) -> bool:
  """Whether ``params`` holds flax-boxed leaves (``nn.with_partitioning``)."""
  return any(_is_boxed(l) for l in jax.tree.leaves(params, is_leaf=_is_boxed))


def from_metadata(boxed, mesh: Mesh, *,
                  shardings_rule: Callable = infer_sharding):
  """Shardings from flax partitioning metadata, on ``mesh``.

  Each boxed leaf's axis names become its ``PartitionSpec``. When the mesh
  lacks an axis the metadata names, or no leaf names any axis, the layout
  comes from ``shardings_rule`` instead.

  Args:
    boxed: parameters as flax's ``init`` returns them, boxed or not.
    mesh: the mesh.
    shardings_rule: the fallback rule, ``rule(params, mesh)``.

  Returns:
    A pytree of ``NamedSharding`` shaped like the unboxed parameters.
  """
  params = meta.unbox(boxed)
  if has_metadata(boxed):
    specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                            is_leaf=lambda s: isinstance(s, P))
    named = {a for s in specs for part in s if part is not None
             for a in (part if isinstance(part, tuple) else (part,))}
    if named and named <= set(mesh.axis_names):
      return jax.tree.structure(params).unflatten(
          [NamedSharding(mesh, s) for s in specs])
  return shardings_rule(params, mesh)


def resolve_shardings(params, *, mesh: Mesh | None = None, shardings=None,
                      shardings_rule: Callable = infer_sharding):
  """Finds the mesh and the parameters' shardings, and places the parameters.

  In order of precedence the shardings are: ``shardings`` if given; the
  partitioning metadata of flax-boxed parameters (``nn.with_partitioning``)
  on ``mesh``; the ``NamedSharding`` the parameter arrays already carry; and
  ``shardings_rule`` applied on ``mesh``, by default a one-device mesh.

  Returns:
    ``(mesh, params, shardings)``: params unboxed and placed on ``shardings``.

  Raises:
    ValueError: ``shardings`` that do not match the parameters' structure,
      lie on several meshes, or on a mesh other than ``mesh``.
  """
  if has_metadata(params):
    if shardings is None and mesh is not None:
      shardings = from_metadata(params, mesh, shardings_rule=shardings_rule)
    params = meta.unbox(params)
  leaves = jax.tree.leaves(params)
  if shardings is None:
    carried = [getattr(l, "sharding", None) for l in leaves]
    if leaves and all(isinstance(s, NamedSharding) for s in carried):
      meshes = {s.mesh for s in carried}
      if len(meshes) == 1 and (mesh is None or meshes == {mesh}):
        shardings = jax.tree.map(lambda l: l.sharding, params)
  if shardings is None:
    if mesh is None:
      mesh = make_mesh([("data", 1)], jax.local_devices()[:1])
    shardings = shardings_rule(params, mesh)
  structure = jax.tree.structure(params)
  if jax.tree.structure(shardings) != structure:
    raise ValueError(
        "shardings must be a pytree shaped like the parameters; expected "
        f"{structure}, got {jax.tree.structure(shardings)}.")
  bad = [s for s in jax.tree.leaves(shardings)
         if not isinstance(s, NamedSharding)]
  if bad:
    raise TypeError(
        f"shardings must be NamedSharding leaves, got {type(bad[0]).__name__}.")
  meshes = {s.mesh for s in jax.tree.leaves(shardings)}
  if len(meshes) != 1:
    raise ValueError("All parameter shardings must be on one mesh, got "
                     f"{len(meshes)} meshes.")
  found = meshes.pop()
  if mesh is not None and found != mesh:
    raise ValueError(
        f"The shardings are on a mesh of shape {dict(found.shape)} over "
        f"devices {found.device_ids.ravel().tolist()}, but mesh= is "
        f"{dict(mesh.shape)} over {mesh.device_ids.ravel().tolist()}; pass "
        "one of them, or shardings made on that mesh.")
  return found, put(params, shardings), shardings


def put(tree, shardings):
  """Places every leaf of ``tree`` on its sharding, on one or many hosts.

  Host values (numpy, or arrays on a local device) are assumed identical on
  every process; each process only copies the shards its devices hold.
  """
  def one(x, s):
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(s, x.ndim):
        return x
      if not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=s)(x)
      if jax.process_count() == 1:
        return jax.device_put(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda i: host[i])
  return jax.tree.map(one, tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_value(x) -> np.ndarray:
  """The value of a replicated array as numpy, on any number of hosts."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)


def local_data_size(mesh: Mesh, data_axis: str) -> int:
  """How many positions of ``data_axis`` this process's devices cover."""
  axis = mesh.axis_names.index(data_axis)
  local = {d.id for d in jax.local_devices()}
  coords = {idx[axis] for idx, d in np.ndenumerate(mesh.devices)
            if d.id in local}
  return len(coords)


def basis_shardings(shardings):
  """A stacked basis' shardings: each vector sharding with a leading axis."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)),
                      shardings)
