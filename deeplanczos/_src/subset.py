"""Parameter subsets: the operator of one layer (a block of the Hessian).

A subset is the parameter pytree with ``None`` at every leaf outside it, so it
is itself a valid, smaller pytree, and vectors of the subset operator hold
only its leaves.
"""

from collections.abc import Callable
import re

import jax


def path_str(path) -> str:
  """``(DictKey('params'), DictKey('Dense_0'), ...)`` -> ``'params/Dense_0/...'``."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def select(params, subset: str | Callable[[str], bool] | None):
  """The parameters an operator acts on: a pytree with ``None`` elsewhere.

  Args:
    params: the full parameter pytree.
    subset: ``None`` for all parameters; a regular expression searched in each
      leaf's path (``'params/Dense_0/kernel'``); or a predicate on that path.

  Returns:
    ``params`` with every leaf outside the subset replaced by ``None``.
  """
  if subset is None:
    return params
  if isinstance(subset, str):
    pattern = re.compile(subset)
    keep = lambda p: pattern.search(p) is not None
  elif callable(subset):
    keep = subset
  else:
    raise TypeError("subset must be None, a regular expression or a predicate "
                    f"on parameter paths; got {type(subset).__name__}.")
  chosen = jax.tree_util.tree_map_with_path(
      lambda p, x: x if keep(path_str(p)) else None, params)
  if not jax.tree.leaves(chosen):
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    raise ValueError(f"subset {subset!r} selects no parameter; the parameter "
                     f"paths are {paths}.")
  return chosen


def take(template, tree):
  """The leaves of ``tree`` where ``template`` (from :func:`select`) has one."""
  return jax.tree.map(lambda t, x: None if t is None else x, template, tree,
                      is_leaf=lambda t: t is None)


def merge(params, sub):
  """``params`` with the leaves that ``sub`` holds replaced by ``sub``'s."""
  return jax.tree.map(lambda full, s: full if s is None else s, params, sub,
                      is_leaf=lambda x: x is None)
