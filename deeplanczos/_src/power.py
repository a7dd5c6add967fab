"""The power method for the dominant eigenpair of a dataset Hessian."""

from collections.abc import Callable
import numbers
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm

from deeplanczos._src import operator as operator_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math


def InitPowerMethodVector(rng, P, *, shardings=None, mesh=None):  # pylint: disable=invalid-name
  """A random unit vector shaped like the parameters ``P``.

  The vector has ``P``'s tree structure, shapes and dtypes, unit Euclidean
  norm over the whole tree, and ``P``'s shardings: it is generated under
  ``jit`` with ``out_shardings``, so no full copy exists on any one host.

  Args:
    rng: a JAX PRNG key; the same key gives the same vector.
    P: the parameter pytree (arrays, possibly sharded).
    shardings: optional pytree of ``NamedSharding`` shaped like ``P``.
    mesh: optional mesh for the default sharding rule when ``P`` is not
      sharded yet.

  Returns:
    A pytree like ``P``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> v = InitPowerMethodVector(jax.random.key(0), {"w": jnp.ones((3, 2))})
    >>> round(float(jnp.linalg.norm(v["w"])), 5)
    1.0
  """
  mesh, params, shardings = sharding_lib.resolve_shardings(
      P, mesh=mesh, shardings=shardings)
  return operator_lib.random_vector_fn(params, shardings)(rng)


@jax.jit
def _power_update(v, hv):
  """``lambda = <v, Hv>``, ``alpha = ||Hv||^2``, ``v' = Hv / ||Hv||``, ``q = |<v, v'>|``."""
  eigenvalue = tree_math.tree_vdot(v, hv)
  alpha = tree_math.tree_vdot(hv, hv)
  norm = jnp.sqrt(alpha)
  new_v = tree_math.tree_scale(hv, 1.0 / jnp.where(norm > 0, norm, 1.0))
  q = jnp.abs(tree_math.tree_vdot(v, new_v))
  return new_v, jnp.stack([eigenvalue, alpha, q])


@jax.jit
def _normalize(v):
  norm = tree_math.tree_norm(v)
  return tree_math.tree_scale(v, 1.0 / norm), norm


def PowerMethodIterate(loss: Callable, P, batch_iterable, num_iteration: int,  # pylint: disable=invalid-name
                       V0=None, batch_parser: Callable | None = None,
                       show_pbar: bool = True, *, tol: float | None = None,
                       key=None, mesh=None, shardings=None,
                       data_axis: str = "data", subset=None,
                       checkpointer=None, loss_rng=None):
  """Power iteration on the Hessian of the loss averaged over a dataset.

  Each iteration is one full pass over ``batch_iterable``: ``H v`` is the
  sum over batches of ``n_b H_b v`` divided by the number of examples, where
  ``H_b`` is the Hessian of ``loss`` on batch ``b`` (so a short last batch
  counts for its examples only), and ``v <- H v / ||H v||``.

  Args:
    loss: ``loss(params, x, y) -> scalar``, the mean loss of a batch.
    P: the parameter pytree at which the Hessian is taken.
    batch_iterable: a re-iterable of batches (list, grain ``MapDataset`` or
      ``DataLoader``, ...) or a zero-argument callable returning an iterator.
    num_iteration: the most iterations to run.
    V0: the starting vector, shaped like ``P`` (normalized here); by default
      ``InitPowerMethodVector(key, P)``.
    batch_parser: ``batch -> (x, y)`` (or ``(x, y, mask)`` with a 0/1 mask of
      real examples); by default a batch is ``(x, y)`` itself.
    show_pbar: tqdm bars over iterations (with the current eigenvalue) and
      over batches; ``False`` prints nothing.
    tol: stop once ``|lambda_k - lambda_{k-1}| <= tol * |lambda_k|``.
    key: PRNG key for the default ``V0`` (default ``jax.random.key(0)``).
    mesh: the device mesh; by default the mesh of ``P``'s ``NamedSharding``
      or a single device.
    shardings: the parameters' shardings, a pytree of ``NamedSharding``.
    data_axis: the mesh axis that batches are split over.
    subset: restrict the Hessian to some parameters: a regular expression
      on parameter paths (``'Dense_1'``) or a predicate; vectors then hold
      only those leaves.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``: the state is
      saved after iterations and restored, if saved before, at the start.
    loss_rng: a PRNG key for losses that take one (dropout): the loss is
      then ``loss(params, x, y, rng)``, ``rng`` fixed per batch and device
      (see ``HessianOperator``), so every pass applies the same ``H``.

  Returns:
    ``(V, History)``: ``V`` the unit eigenvector estimate (shaped like ``P``,
    on its shardings) and ``History`` a dict of numpy arrays, one entry per
    iteration run:

    - ``'alpha'``: ``||H v_k||^2``, the squared estimate of the dominant
      eigenvalue's magnitude.
    - ``'eigenvalue'``: the Rayleigh quotient ``<v_k, H v_k>``, the signed
      estimate of the dominant eigenvalue.
    - ``'q'``: the overlap ``|<v_k, v_{k+1}>|`` of consecutive estimates,
      which tends to 1 as the vector converges.
    - ``'iteration'``: the iteration indices ``0, 1, ...``.
    - ``'loss'``: the dataset loss at ``P`` (the same every iteration).
    - ``'seconds'``: wall time of each iteration (the first includes
      compilation).
  """
  if (not isinstance(num_iteration, numbers.Integral)
      or isinstance(num_iteration, bool) or num_iteration < 1):
    raise ValueError("num_iteration must be a positive integer, got "
                     f"{num_iteration!r}.")
  if tol is not None and not tol >= 0:
    raise ValueError(f"tol must be a non-negative number, got {tol!r}.")
  op = operator_lib.HessianOperator(
      loss, P, batch_iterable, batch_parser=batch_parser, mesh=mesh,
      shardings=shardings, data_axis=data_axis, subset=subset,
      show_pbar=show_pbar, loss_rng=loss_rng)
  if V0 is None:
    v = op.random_vector(jax.random.key(0) if key is None else key)
  else:
    v, norm = _normalize(op.check_vector(V0))
    if not float(sharding_lib.host_value(norm)) > 0:
      raise ValueError("V0 must be a non-zero, finite vector; its norm is "
                       f"{float(sharding_lib.host_value(norm))}.")
  records, finished, loss_value = [], False, None
  if checkpointer is not None and (saved := checkpointer.restore({"v": v})):
    v = saved[0]["v"]
    records = [tuple(r) for r in saved[1]["records"]]
    finished, loss_value = saved[1]["finished"], saved[1]["loss"]
  bar = tqdm.tqdm(range(len(records), 0 if finished else num_iteration),
                  desc="power method", initial=len(records),
                  total=num_iteration, disable=not show_pbar)
  for k in bar:
    tick = time.perf_counter()
    hv = op.matvec(v, where=f"at iteration {k}")
    loss_value = op.loss_value
    new_v, stats = _power_update(v, hv)
    eigenvalue, alpha, q = sharding_lib.host_value(stats).astype(float)
    if alpha == 0:
      raise ValueError(
          f"H v = 0 at iteration {k}: the vector lies in the Hessian's null "
          "space. Start from another V0 or key.")
    records.append((k, eigenvalue, alpha, q, time.perf_counter() - tick))
    bar.set_postfix(eigenvalue=f"{eigenvalue:.6g}", q=f"{q:.6f}")
    v = new_v
    finished = (tol is not None and k > 0 and abs(eigenvalue - records[-2][1])
                <= tol * abs(eigenvalue))
    if checkpointer is not None:
      checkpointer.save(k + 1, {"v": v}, {"records": records,
                                          "finished": finished,
                                          "loss": loss_value})
    if finished:
      break
  bar.close()
  iteration, eigenvalue, alpha, q, seconds = (
      np.array(c) for c in zip(*records))
  history = {
      "alpha": alpha,
      "eigenvalue": eigenvalue,
      "q": q,
      "iteration": iteration.astype(int),
      "loss": np.full(len(records), loss_value),
      "seconds": seconds,
  }
  return v, history
