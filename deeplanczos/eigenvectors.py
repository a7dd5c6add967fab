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
    with open(os.path.join(directory, VALUES), "w") as f:
      json.dump([float(x) for x in np.asarray(eigenvalues)], f)


def load_eigenvectors(path: str, *, mesh=None, shardings=None):
  """Reads eigenpairs saved by :func:`save_eigenvectors` or the launcher.

  Args:
    path: a launcher workdir, or the directory that was saved to.
    mesh: the mesh to place the vectors on (default: every device), each
      leaf split by ``infer_sharding`` over the model axis and (FSDP) the
      first axis wherever they divide it.
    shardings: the layout of one vector, a pytree of ``NamedSharding``
      shaped like the parameters; overrides ``mesh``.

  Returns:
    ``(eigenvalues, eigenvectors)``: a ``(k,)`` numpy array, and the vectors
    as nested dicts keyed like the parameters, each leaf with a leading axis
    of ``k``.

  Raises:
    FileNotFoundError: nothing saved at ``path``.
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
  if shardings is None:
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    shardings = sharding_lib.infer_sharding(
        one, mesh, fsdp_axis=mesh.axis_names[0], min_size=1)
  target = jax.tree.map(
      lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree,
      sharding_lib.stacked(shardings))
  return eigenvalues, checkpointer.restore(vectors, target)
