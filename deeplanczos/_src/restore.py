"""Parameters from a training run's orbax checkpoints, onto any shardings.

A flax/orbax training loop writes a ``CheckpointManager`` directory: numbered
step directories, each with one or more items (``default``, or names such as
``state``), each a saved pytree in which the parameters sit somewhere
(``params``, ``state/params``). :func:`restore_params` reads only the
parameters' arrays of one step, each process only the shards its devices
hold, straight onto the shardings asked for.
"""

import os

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from deeplanczos._src import subset as subset_lib


def _steps(directory) -> list[int]:
  """The finished steps of a CheckpointManager directory, oldest first.

  Orbax writes a step under a temporary name and renames it when complete,
  so a step still being written is never listed.
  """
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory,
                                                                 name)))


def checkpoint_steps(directory: str) -> list[int]:
  """The complete steps saved in a CheckpointManager ``directory``."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory at {directory!r}.")
  return _steps(directory)


def _item_dir(step_dir: str, item: str | None) -> str:
  items = sorted(name for name in os.listdir(step_dir)
                 if os.path.isdir(os.path.join(step_dir, name)))
  if item is None:
    if len(items) != 1:
      raise ValueError(
          f"The step at {step_dir} holds items {items}; name the one with the "
          "parameters (item=...).")
    item = items[0]
  if item not in items:
    raise ValueError(f"The step at {step_dir} has no item {item!r}; it holds "
                     f"{items}.")
  return os.path.join(step_dir, item)


def _subtree(tree, path: str, where: str):
  for key in [k for k in path.split("/") if k]:
    if not isinstance(tree, dict) or key not in tree:
      have = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
      raise ValueError(f"{where} has no {key!r} on the way to {path!r} (it "
                       f"holds {have}).")
    tree = tree[key]
  return tree


def _nest(path: str, tree):
  for key in reversed([k for k in path.split("/") if k]):
    tree = {key: tree}
  return tree


def restore_params(directory: str, like, *, step: int | None = None,
                   path: str = "params", item: str | None = None):
  """The parameters saved at ``step`` of a training run, on ``like``'s layout.

  Args:
    directory: an orbax ``CheckpointManager`` directory (numbered steps).
    like: the parameters' pytree of ``jax.ShapeDtypeStruct`` with
      shardings (or arrays): the structure, shapes, dtypes and shardings to
      restore onto. The model's own ``init`` (under ``jax.eval_shape``) gives
      it.
    step: the step to read; default the latest complete one.
    path: where the parameters sit in the saved tree, keys joined by ``/``
      (``'params'``, ``'state/params'``; ``''`` for the whole tree).
    item: the step's item that holds them; default its only item.

  Returns:
    The parameters, each leaf a ``jax.Array`` on its sharding, read shard by
    shard (no process reads what its devices do not hold).

  Raises:
    ValueError: no such step, item or path, or a leaf whose shape or dtype
      disagrees with ``like`` (named by its path).
  """
  steps = checkpoint_steps(directory)
  if not steps:
    raise ValueError(f"{directory!r} holds no complete checkpoint step.")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ValueError(f"{directory!r} has no step {step}; it holds {steps}.")
  item_dir = _item_dir(os.path.join(directory, str(step)), item)
  saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
  saved = getattr(saved, "tree", saved)
  saved = _subtree(saved, path, f"The checkpoint at {item_dir}")
  want = jax.tree_util.tree_leaves_with_path(like)
  try:
    got = jax.tree.structure(like).flatten_up_to(saved)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"The parameters at {path!r} of {item_dir} do not have the model's "
        f"structure: {str(e).splitlines()[0][:300]}") from e
  for (key, w), g in zip(want, got):
    shape, dtype = tuple(getattr(g, "shape", ())), getattr(g, "dtype", None)
    if shape != tuple(np.shape(w)) or (dtype is not None and
                                       np.dtype(dtype) != np.dtype(w.dtype)):
      raise ValueError(
          f"Parameter {subset_lib.path_str(key)!r}: the model has shape "
          f"{tuple(np.shape(w))} {np.dtype(w.dtype)}, the checkpoint at "
          f"{item_dir} (step {step}) has {shape} {dtype}.")
  target = _nest(path, jax.tree.map(
      lambda w: jax.ShapeDtypeStruct(np.shape(w), w.dtype,
                                     sharding=w.sharding), like))
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  restored = checkpointer.restore(
      epath.Path(item_dir), args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  return _subtree(restored, path, "The restored tree")
