"""Device meshes and shardings, always passed explicitly (no global mesh)."""

from collections.abc import Callable, Sequence
import functools
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
                   fsdp_axis: str | None = None, min_size: int = 1024):
  """Default rule: split each leaf's largest dimensions over the mesh.

  The model axis takes the largest dimension it divides (tensor
  parallelism). With ``fsdp_axis`` (the data axis, say: FSDP / ZeRO-3),
  that axis takes the largest remaining dimension it divides, so parameters
  and vectors are split over every device; the Hessian-vector product then
  gathers the parameters it needs inside its compiled step. Leaves with fewer
  than ``min_size`` elements, and dimensions no axis divides, are replicated.
  Replace this function (``shardings_rule=``) to use another layout.

  Args:
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
    mesh: the mesh.
    model_axis: the mesh axis that parameters are split over.
    fsdp_axis: a second mesh axis to split parameters over, or None.
    min_size: leaves smaller than this stay replicated.

  Returns:
    A pytree of ``NamedSharding`` shaped like ``params``.
  """
  axes = [a for a in (model_axis, fsdp_axis)
          if a is not None and mesh.shape.get(a, 1) > 1]

  def rule(x):
    shape = np.shape(x)
    spec = [None] * len(shape)
    if math.prod(shape) >= min_size:
      for axis in axes:
        n = mesh.shape[axis]
        dims = [d for d in np.argsort(shape, kind="stable")[::-1]
                if spec[d] is None and shape[d] % n == 0]
        if dims:
          spec[dims[0]] = axis
    return NamedSharding(mesh, P(*spec) if any(spec) else P())

  return jax.tree.map(rule, params)


def without_axis(spec: P, axis: str) -> P:
  """``spec`` with mesh axis ``axis`` removed (that dimension's split undone)."""
  def drop(part):
    if part == axis:
      return None
    if isinstance(part, tuple):
      kept = tuple(a for a in part if a != axis)
      return kept if len(kept) > 1 else (kept[0] if kept else None)
    return part
  return P(*(drop(part) for part in spec))


def over_all_devices(shape, sharding: NamedSharding) -> NamedSharding:
  """``sharding`` further split over the mesh axes it leaves unused.

  Each unused axis (of size > 1) splits the dimension with the largest
  extent per device that it divides, so an array that its sharding
  replicates over the data axis (a vector of a tensor-parallel model) is
  stored split over every device. Dimensions no axis divides stay as they
  are.
  """
  mesh = sharding.mesh
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  used = {a for part in spec if part is not None
          for a in (part if isinstance(part, tuple) else (part,))}

  def parts(d):
    part = spec[d]
    return () if part is None else part if isinstance(part, tuple) else (part,)

  for axis in mesh.axis_names:
    n = mesh.shape[axis]
    if axis in used or n == 1:
      continue
    local = [shape[d] // math.prod(mesh.shape[a] for a in parts(d))
             for d in range(len(shape))]
    dims = [d for d in np.argsort(local, kind="stable")[::-1]
            if local[d] % n == 0]
    if dims:
      new = parts(dims[0]) + (axis,)
      spec[dims[0]] = new if len(new) > 1 else new[0]
  return NamedSharding(mesh, P(*spec))


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
  check_params(params)
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


def check_params(params):
  """Refuses parameters with no arrays, or with arrays that are not floats."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if not leaves:
    raise ValueError(
        "The parameters hold no arrays (got "
        f"{type(params).__name__} {params!r:.80}); pass the model's parameter "
        "pytree, e.g. model.init(key, x) or nnx.split(model, nnx.Param)[1].")
  for path, leaf in leaves:
    dtype = getattr(leaf, "dtype", None) or np.result_type(leaf)
    if not jax.dtypes.issubdtype(dtype, np.inexact):
      raise TypeError(
          f"Every parameter must be a floating-point array; the one at "
          f"{jax.tree_util.keystr(path) or '(root)'} is {dtype} of shape "
          f"{np.shape(leaf)}. Derivatives need floats: cast it, or leave it "
          "out of the parameters (pass it through the loss instead).")


@functools.lru_cache(maxsize=4096)
def _equivalent(a, b, ndim: int) -> bool:
  """``a.is_equivalent_to(b, ndim)``, remembered: :func:`put` asks it for
  every leaf of every product's vector."""
  return a.is_equivalent_to(b, ndim)


def put(tree, shardings):
  """Places every leaf of ``tree`` on its sharding, on one or many hosts.

  Host values (numpy, or arrays on a local device) are assumed identical on
  every process; each process only copies the shards its devices hold.
  Every leaf comes back committed to its sharding: ``jit`` compiles a
  program again for an argument that is not (numpy, or an array that was
  never placed), even when its data sits on the same device.
  """
  def one(x, s):
    if isinstance(x, jax.Array):
      if x.committed and _equivalent(x.sharding, s, x.ndim):
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


def split_over_all_devices(params, shardings):
  """``shardings`` with every leaf also split over the axes it leaves unused.

  Turns a tensor-parallel layout (split over the model axis, replicated over
  the data axis) into FSDP plus tensor parallelism: each leaf's largest
  dimension that an unused axis divides is split over it too.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    shardings: their shardings, a pytree of ``NamedSharding``.
  """
  return jax.tree.map(lambda p, s: over_all_devices(np.shape(p), s), params,
                      shardings)


def stacked(shardings):
  """Shardings of vectors stacked on a leading axis: that axis unsplit."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)),
                      shardings)


def basis_shardings(template, shardings, size: int):
  """A basis of ``size`` vectors like ``template``, split over every device.

  Each leaf's sharding gets a leading unsplit Krylov axis and is then split
  over the mesh axes the vector sharding leaves unused (the data axis of a
  tensor-parallel model), so a basis takes ``1 / devices`` of its size on
  each device whatever the parameters' layout.
  """
  return jax.tree.map(
      lambda t, s: over_all_devices((size, *t.shape),
                                    NamedSharding(s.mesh, P(None, *s.spec))),
      template, shardings)
