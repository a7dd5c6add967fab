"""Is the operator one fixed, symmetric matrix? A check before long runs.

Power iteration and Lanczos assume every product applies the same symmetric
``H``. Batches that change between passes (an unseeded shuffle, random
augmentation), dropout keys that are not fixed per batch, or a model state
updated during a pass break that silently; this check shows it in three
products.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deeplanczos._src import api
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math


class OperatorCheck(NamedTuple):
  """The result of :func:`check_operator`.

  Attributes:
    deterministic: two products with the same vector agree within tolerance.
    symmetric: ``<u, Hv>`` and ``<v, Hu>`` agree within tolerance.
    repeat_difference: ``||Hv - (Hv)'|| / ||Hv||`` for two passes.
    asymmetry: ``|<u, Hv> - <v, Hu>| / max(||Hu||, ||Hv||)``, unit ``u, v``.
    tolerance: the relative tolerance used.
  """
  deterministic: bool
  symmetric: bool
  repeat_difference: float
  asymmetry: float
  tolerance: float


@jax.jit
def _measures(u, v, hv, hv_again, hu):
  diff = tree_math.tree_norm(tree_math.tree_axpy(-1.0, hv_again, hv))
  repeat = diff / tree_math.tree_norm(hv)
  gap = jnp.abs(tree_math.tree_vdot(u, hv) - tree_math.tree_vdot(v, hu))
  scale = jnp.maximum(tree_math.tree_norm(hu), tree_math.tree_norm(hv))
  return jnp.stack([repeat, gap / scale])


@api.takes_operator
def check_operator(op, *, key=None,
                   tolerance: float | None = None) -> OperatorCheck:
  """Checks that the dataset Hessian is deterministic and symmetric.

  Three products (full data passes): ``Hv`` twice and ``Hu``, for random unit
  ``u`` and ``v``. Also callable as ``check_operator(loss, params,
  batch_iterable, ...)`` with the keyword options of
  :class:`HessianOperator`.

  Args:
    op: the operator.
    key: PRNG key for ``u`` and ``v`` (default ``jax.random.key(0)``).
    tolerance: relative tolerance; default ``sqrt(eps)`` of the parameters'
      dtype (rounding differences lie far below it).

  Returns:
    An :class:`OperatorCheck`.
  """
  ku, kv = jax.random.split(jax.random.key(0) if key is None else key)
  u, v = op.random_vector(ku), op.random_vector(kv)
  hv = op.matvec(v, where="in the check's first product")
  hv_again = op.matvec(v, where="in the check's repeated product")
  hu = op.matvec(u, where="in the check's third product")
  repeat, asymmetry = sharding_lib.host_value(
      _measures(u, v, hv, hv_again, hu)).astype(float)
  if tolerance is None:
    dtype = jnp.result_type(*jax.tree.leaves(op.template))
    tolerance = float(np.sqrt(jnp.finfo(dtype).eps))
  return OperatorCheck(bool(repeat <= tolerance), bool(asymmetry <= tolerance),
                       float(repeat), float(asymmetry), float(tolerance))
