"""Eigenvectors on disk: saved sharded by orbax, loaded onto any mesh.

The launcher saves the eigenpairs that ``power`` and ``lanczos`` find into
``WORKDIR/eigenvectors``: the vectors, stacked on a leading axis, written by
every process from its own shards, and the eigenvalues in
``eigenvalues.json``. :func:`load_eigenvectors` reads them back with any
layout, on any mesh, for later analysis (overlaps with gradients, the
loss along an eigenvector, ...).
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from deeplanczos._src import files
from deeplanczos._src import sharding as sharding_lib

VALUES = "eigenvalues.json"
VECTORS = "vectors"


def save_eigenvectors(directory: str, eigenvalues, eigenvectors):
  """Writes eigenpairs into ``directory`` (replacing what is there).

  Args:
    directory: where to write; created if missing.
    eigenvalues: ``(k,)`` numbers.
    eigenvectors: a pytree shaped like the parameters with a leading axis of
      ``k`` (as ``LanczosResult.eigenvectors``), sharded or not.
  """
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, VECTORS), eigenvectors,
                    force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    files.write_json(os.path.join(directory, VALUES),
                     [float(x) for x in np.asarray(eigenvalues)])


def _key(entry) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _like(template, saved: dict):
  """``saved`` (nested dicts, as orbax restores) in ``template``'s pytree."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, _ in paths:
    node = saved
    for entry in path:
      key = _key(entry)
      if not isinstance(node, dict) or key not in node:
        raise ValueError(
            f"The saved eigenvectors have no leaf at "
            f"{jax.tree_util.keystr(path)}, which the template has: the "
            "template must be the parameters the vectors were computed for.")
      node = node[key]
    leaves.append(node)
  if len(leaves) != len(jax.tree.leaves(saved)):
    raise ValueError(
        f"The saved eigenvectors have {len(jax.tree.leaves(saved))} leaves "
        f"and the template {len(leaves)}: the template must be the "
        "parameters the vectors were computed for.")
  return treedef.unflatten(leaves)


def load_eigenvectors(path: str, *, like=None, mesh=None, shardings=None):
  """Reads eigenpairs saved by :func:`save_eigenvectors` or the launcher.

  Args:
    path: a launcher workdir, or the directory that was saved to.
    like: the parameters (or any pytree of the same structure, arrays or
      ``jax.ShapeDtypeStruct``): the vectors come back in its pytree type
      (flax ``FrozenDict``, an ``nnx.State``, your own classes), and on its
      shardings where its leaves carry ``NamedSharding`` and neither
      ``mesh`` nor ``shardings`` is given.
    mesh: the mesh to place the vectors on (default: every device), each
      leaf split by ``infer_sharding`` over the model axis and (FSDP) the
      first axis wherever they divide it.
    shardings: the layout of one vector, a pytree of ``NamedSharding``
      shaped like the parameters; overrides ``mesh``.

  Returns:
    ``(eigenvalues, eigenvectors)``: a ``(k,)`` numpy array, and the vectors
    with a leading axis of ``k`` on every leaf: in ``like``'s pytree type, or
    as nested dicts keyed like the parameters.

  Raises:
    FileNotFoundError: nothing saved at ``path``.
    ValueError: ``like`` does not have the saved vectors' structure.
  """
  directory = os.path.abspath(path)
  if os.path.isdir(os.path.join(directory, "eigenvectors")):
    directory = os.path.join(directory, "eigenvectors")
  values = os.path.join(directory, VALUES)
  if not os.path.exists(values):
    raise FileNotFoundError(
        f"No saved eigenvectors at {path}: expected {values} (run the "
        "launcher with method 'power' or 'lanczos', or save_eigenvectors).")
  with open(values) as f:
    eigenvalues = np.array(json.load(f), np.float64)
  checkpointer = ocp.StandardCheckpointer()
  vectors = os.path.join(directory, VECTORS)
  metadata = checkpointer.metadata(vectors)
  tree = dict(getattr(metadata, "item_metadata", metadata))
  one = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape[1:], m.dtype),
                     tree)
  carried = [getattr(l, "sharding", None) for l in jax.tree.leaves(like)]
  if (shardings is None and mesh is None and carried and
      all(isinstance(s, jax.sharding.NamedSharding) for s in carried)):
    shardings = _nested(like, carried)
  if shardings is None:
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    shardings = sharding_lib.infer_sharding(
        one, mesh, fsdp_axis=mesh.axis_names[0], min_size=1)
  target = jax.tree.map(
      lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree,
      sharding_lib.stacked(shardings))
  vectors = checkpointer.restore(vectors, target)
  return eigenvalues, vectors if like is None else _like(like, vectors)


def _nested(template, values) -> dict:
  """``values`` (one per leaf of ``template``) as nested dicts of its keys."""
  out = {}
  for (path, _), value in zip(
      jax.tree_util.tree_flatten_with_path(template)[0], values):
    keys = [_key(entry) for entry in path]
    node = out
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return out
