"""The trace of the Hessian: Hutchinson and Hutch++ estimators.

Hutchinson: ``tr(H) = E[z^T H z]`` for Rademacher ``z``. Hutch++ (Meyer et
al., 2021) spends a third of its budget on a sketch ``Q = orth(H S)``, takes
``tr(Q^T H Q)`` exactly, and applies Hutchinson only to the deflated rest
``(I - QQ^T) H (I - QQ^T)``, whose trace has far smaller variance when ``H``
has a few large eigenvalues, as network Hessians do.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import tqdm.auto as tqdm

from deeplanczos._src import basis as basis_lib
from deeplanczos._src import operator as operator_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math


class TraceResult(NamedTuple):
  """A trace estimate.

  Attributes:
    estimate: the estimated trace of the Hessian.
    stderr: its standard error (from the spread of the random samples).
    samples: the random samples ``z^T H z`` (of the deflated operator for
      Hutch++), whose mean is the random part of the estimate.
    num_hvps: Hessian-vector products used.
    method: ``'hutchinson'`` or ``'hutch++'``.
  """
  estimate: float
  stderr: float
  samples: np.ndarray
  num_hvps: int
  method: str


def _quadratic_form(op, z, where):
  return float(sharding_lib.host_value(
      _vdot(z, op.matvec(z, where=where))))


_vdot = jax.jit(tree_math.tree_vdot)


def _stderr(samples):
  return float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(
      samples) > 1 else float("inf")


def hutchinson_operator(op, *, num_probes=30, key=None, show_pbar=False,
                        checkpointer=None):
  """:func:`hutchinson` on an existing :class:`HessianOperator`."""
  if not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
    raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
  keys = jax.random.split(jax.random.key(0) if key is None else key,
                          num_probes)
  samples = []
  if checkpointer is not None and (saved := checkpointer.restore({})):
    samples = saved[1]["samples"]
  first = op.num_matvecs - len(samples)
  for i in tqdm.trange(len(samples), num_probes, desc="Hutchinson",
                       initial=len(samples), total=num_probes,
                       disable=not show_pbar):
    z = op.random_vector(keys[i], kind="rademacher", normalize=False)
    samples.append(_quadratic_form(op, z, f"for probe {i}"))
    if checkpointer is not None and i + 1 < num_probes:
      checkpointer.save(i + 1, {}, {"samples": samples})
  samples = np.array(samples)
  return TraceResult(float(samples.mean()), _stderr(samples), samples,
                     op.num_matvecs - first, "hutchinson")


def hutchpp_operator(op, *, num_hvps=60, key=None, show_pbar=False,
                     checkpointer=None):
  """:func:`hutchpp` on an existing :class:`HessianOperator`."""
  if not isinstance(num_hvps, (int, np.integer)) or num_hvps < 3:
    raise ValueError(f"num_hvps must be an integer of at least 3, got {num_hvps!r}.")
  sketch = num_hvps // 3
  probes = num_hvps - 2 * sketch
  keys = jax.random.split(jax.random.key(0) if key is None else key,
                          sketch + probes)
  q = basis_lib.zeros(op.template, sketch, op.shardings)
  # The state after each product: sketch vectors drawn, the sketch's rank,
  # basis vectors whose quadratic form is summed into `exact`, and samples.
  st = {"sketched": 0, "rank": 0, "exact": 0.0, "summed": 0, "samples": [],
        "hvps": 0}
  if checkpointer is not None and (saved := checkpointer.restore({"q": q})):
    q, st = saved[0]["q"], saved[1]
  first = op.num_matvecs - st["hvps"]
  dtype = jax.numpy.result_type(*jax.tree.leaves(op.template))
  tiny = 100 * float(jax.numpy.finfo(dtype).eps)
  bar = tqdm.tqdm(total=num_hvps, initial=st["hvps"], desc="Hutch++",
                  disable=not show_pbar)
  while len(st["samples"]) < probes:
    if st["sketched"] < sketch:
      i = st["sketched"]
      s = op.random_vector(keys[i], kind="rademacher", normalize=False)
      y = op.matvec(s, where=f"for sketch vector {i}")
      y_norm = float(sharding_lib.host_value(tree_math.tree_norm(y)))
      y, _, norm = basis_lib.orthogonalize(q, y, st["rank"])
      norm = float(sharding_lib.host_value(norm))
      if norm > tiny * y_norm:  # otherwise H S has rank < sketch: skip it
        q = basis_lib.put(q, st["rank"], basis_lib.scale(y, 1.0 / norm))
        st["rank"] += 1
      st["sketched"] += 1
    elif st["summed"] < st["rank"]:
      i = st["summed"]
      st["exact"] += _quadratic_form(op, basis_lib.get(q, i),
                                     f"for basis vector {i}")
      st["summed"] += 1
    else:
      i = len(st["samples"])
      z = op.random_vector(keys[sketch + i], kind="rademacher",
                           normalize=False)
      z, _, _ = basis_lib.orthogonalize(q, z, st["rank"])
      st["samples"].append(_quadratic_form(op, z, f"for probe {i}"))
    st["hvps"] = op.num_matvecs - first
    bar.update(1)
    if checkpointer is not None and len(st["samples"]) < probes:
      checkpointer.save(st["hvps"], {"q": q}, st)
  bar.close()
  samples = np.array(st["samples"])
  return TraceResult(st["exact"] + float(samples.mean()), _stderr(samples),
                     samples, op.num_matvecs - first, "hutch++")


def _operator(loss, params, batch_iterable, **kwargs):
  return operator_lib.HessianOperator(loss, params, batch_iterable, **kwargs)


def hutchinson(loss: Callable, params, batch_iterable, *, num_probes=30,
               key=None, batch_parser=None, mesh=None, shardings=None,
               data_axis="data", subset=None, show_pbar=True,
               checkpointer=None, loss_rng=None) -> TraceResult:
  """Hutchinson's estimate of the Hessian's trace from Rademacher probes.

  Args:
    loss, params, batch_iterable, batch_parser, mesh, shardings, data_axis,
      subset: as for :func:`deeplanczos.lanczos`.
    num_probes: probes, one HVP each.
    key: PRNG key (default ``jax.random.key(0)``).
    show_pbar: a tqdm bar over probes.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``.
    loss_rng: a PRNG key for losses that take one (dropout): the loss is
      then ``loss(params, x, y, rng)``, ``rng`` fixed per batch and device
      (see ``HessianOperator``), so every pass applies the same ``H``.
  """
  op = _operator(loss, params, batch_iterable, batch_parser=batch_parser,
                 mesh=mesh, shardings=shardings, data_axis=data_axis,
                 subset=subset, loss_rng=loss_rng)
  return hutchinson_operator(op, num_probes=num_probes, key=key,
                             show_pbar=show_pbar, checkpointer=checkpointer)


def hutchpp(loss: Callable, params, batch_iterable, *, num_hvps=60, key=None,
            batch_parser=None, mesh=None, shardings=None, data_axis="data",
            subset=None, show_pbar=True, checkpointer=None,
            loss_rng=None) -> TraceResult:
  """The Hutch++ estimate of the Hessian's trace within ``num_hvps`` HVPs.

  Args:
    loss, params, batch_iterable, batch_parser, mesh, shardings, data_axis,
      subset: as for :func:`deeplanczos.lanczos`.
    num_hvps: the budget: a third sketches, a third takes the sketch's exact
      trace, the rest are Hutchinson probes of the deflated operator.
    key: PRNG key (default ``jax.random.key(0)``).
    show_pbar: a tqdm bar over the products.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``.
    loss_rng: a PRNG key for losses that take one (dropout): the loss is
      then ``loss(params, x, y, rng)``, ``rng`` fixed per batch and device
      (see ``HessianOperator``), so every pass applies the same ``H``.
  """
  op = _operator(loss, params, batch_iterable, batch_parser=batch_parser,
                 mesh=mesh, shardings=shardings, data_axis=data_axis,
                 subset=subset, loss_rng=loss_rng)
  return hutchpp_operator(op, num_hvps=num_hvps, key=key, show_pbar=show_pbar,
                          checkpointer=checkpointer)
