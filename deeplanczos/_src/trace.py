"""The trace of the Hessian: Hutchinson and Hutch++ estimators.

Hutchinson: ``tr(H) = E[z^T H z]`` for Rademacher ``z``. Hutch++ (Meyer et
al., 2021) spends a third of its budget on a sketch ``Q = orth(H S)``, takes
``tr(Q^T H Q)`` exactly, and applies Hutchinson only to the deflated rest
``(I - QQ^T) H (I - QQ^T)``, whose trace has far smaller variance when ``H``
has a few large eigenvalues, as network Hessians do.
"""

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deeplanczos._src import api
from deeplanczos._src import basis as basis_lib
from deeplanczos._src import driver
from deeplanczos._src import operator as operator_lib
from deeplanczos._src import plan as plan_lib
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


_vdot = jax.jit(tree_math.tree_vdot)
_vdots = jax.jit(jax.vmap(tree_math.tree_vdot))


def _quadratic_form(op, z, where):
  """``z^T H z``, one product."""
  return float(sharding_lib.host_value(_vdot(z, op.matvec(z, where=where))))


def _stderr(samples):
  return float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(
      samples) > 1 else float("inf")


def _forms_of_stack(op, stacked, where):
  """``[v^T H v for v in stacked]``: one batched pass, one host read."""
  hv = op.matvecs(stacked, where=where)
  return list(sharding_lib.host_value(_vdots(stacked, hv)).astype(float))


def _probes(op, n, deflate=False):
  """A jitted ``keys -> z`` (``deflate``: ``(keys, q, rank) -> z``): ``n``
  Rademacher probes stacked on the operator's shardings, each as
  ``op.random_vector(key, kind='rademacher', normalize=False)`` draws it,
  with ``deflate`` orthogonalized against ``q[:rank]``: one program for the
  batch instead of one (or two) per probe. Kept on the operator."""
  programs = op.remembered(("trace probes", n, deflate))
  if "fn" not in programs:
    draw = operator_lib.random_draw(op.template, op.shardings, "rademacher")

    def make(keys, q=None, rank=None):
      z = jax.vmap(draw)(keys)
      if deflate:
        z = jax.vmap(lambda v: basis_lib._orthogonalize(q, v, rank)[0])(z)  # pylint: disable=protected-access
      return z
    programs["fn"] = jax.jit(
        make, out_shardings=sharding_lib.stacked(op.shardings))
  return programs["fn"]


@functools.partial(jax.jit, donate_argnums=(0,))
def _absorb(q, ys, rank, tiny):
  """Hutch++'s sketch: each ``y`` of the stack in turn orthogonalized
  against ``q[:rank]`` and, unless its norm is negligible (``tiny`` of
  ``||y||``: ``H S`` has a smaller rank), scaled into slot ``rank``.

  Returns:
    ``(q, rank)``.
  """
  def body(i, carry):
    q, rank = carry
    y = jax.tree.map(lambda a: a[i], ys)
    w, _, norm = basis_lib._orthogonalize(q, y, rank)  # pylint: disable=protected-access
    keep = norm > tiny * tree_math.tree_norm(y)
    w = tree_math.tree_scale(w, jnp.where(keep, 1 / jnp.where(keep, norm, 1),
                                          0))
    q = jax.tree.map(lambda b, x: b.at[rank].set(
        jnp.where(keep, x.astype(b.dtype), b[rank])), q, w)
    return q, rank + keep.astype(rank.dtype)
  return jax.lax.fori_loop(0, jax.tree.leaves(ys)[0].shape[0], body,
                           (q, rank))


@functools.partial(jax.jit, static_argnames="n")
def _rows(q, start, n):
  """Slots ``start .. start + n - 1`` of the basis ``q``, stacked."""
  return jax.tree.map(
      lambda b: jax.lax.dynamic_slice_in_dim(b, start, n), q)


# The most products one call of the compiled loop runs (its keys are padded
# to this many, so every call has the same shapes).
_BLOCK = 64
SKETCH, EXACT, PROBE = 0, 1, 2  # the phases of Hutch++ (Hutchinson: PROBE)


@functools.partial(jax.jit, static_argnames=("pass_fn", "make", "packing"),
                   donate_argnums=(2,))
def _products_loop(params, data, q, keys, start, count, phase, rank, tiny, *,
                   pass_fn, make, packing):
  """Up to ``count`` products of one phase in one compiled loop.

  Product ``i`` is of: in ``SKETCH``, ``s = make(keys[i])``, whose product
  orthogonalized against ``q[:rank]`` becomes ``q[rank]`` (and ``rank``
  grows) unless less than ``tiny`` of its norm is left; in ``EXACT``, the
  basis vector ``q[start + i]``; in ``PROBE``, ``make(keys[i])`` deflated by
  ``q[:rank]``. The last slot of ``q`` is scratch, never part of the sketch.

  Returns:
    ``(q, rank, table)``: per product ``[count, loss, bad, v^T H v]``
    ``(len(keys), 4)``, NaN after the last one run (a non-finite product
    ends the loop). The products work on ``q`` packed by ``packing``
    (:class:`basis.Packing`).
  """
  q = packing.pack(q, lead=1)
  scratch = jax.tree.leaves(q)[0].shape[0] - 1
  dtype = tree_math.accumulation_dtype(jax.tree.leaves(q)[0].dtype)

  def body(carry):
    i, q, rank, table, _ = carry
    z = packing.pack(make(keys[i]))
    like_q = lambda v: jax.tree.map(lambda x, b: x.astype(b.dtype), v, q)
    v = jax.lax.switch(phase, [  # in the basis's dtypes, as step by step
        lambda: like_q(z),
        lambda: basis_lib.get(q, start + i),
        lambda: basis_lib.orthogonalize(q, z, rank)[0]])
    hv, stats = pass_fn(params, packing.unpack(v), data)
    hv = packing.pack(hv)

    def sketch():  # the branch returns a vector, never the basis (a copy)
      w, _, norm = basis_lib.orthogonalize(q, hv, rank)
      w = tree_math.tree_scale(w, 1.0 / jnp.where(norm > 0, norm, 1.0))
      return w, norm > tiny * tree_math.tree_norm(hv)
    w, grows = jax.lax.cond(
        phase == SKETCH, sketch,
        lambda: (jax.tree.map(lambda b: jnp.zeros(b.shape[1:], b.dtype), q),
                 jnp.asarray(False)))
    q = basis_lib.put(q, jnp.where(phase == SKETCH, rank, scratch), w)
    row = jnp.concatenate([stats.astype(dtype),
                           tree_math.tree_vdot(v, hv).astype(dtype)[None]])
    return (i + 1, q, rank + grows, table.at[i].set(row), stats[2] >= 0)

  carry = (0, q, rank, jnp.full((keys.shape[0], 4), jnp.nan, dtype), False)
  _, q, rank, table, _ = jax.lax.while_loop(
      lambda c: (c[0] < count) & ~c[4], body, carry)
  return packing.unpack(q, lead=1), rank, table


class Loop(NamedTuple):
  """A method's products in compiled blocks (where :func:`driver.loops_pay`).

  Attributes:
    pace: the block lengths (about a second each).
    make: the Rademacher probes' program.
    tiny: below ``tiny`` of its norm a sketch product adds nothing.
  """
  pace: driver.Pace
  make: Any
  tiny: float


def _loop(op, tiny):
  """A :class:`Loop` where compiled loops pay, else None."""
  if not driver.loops_pay(op, "trace"):
    return None
  make = operator_lib.random_vector_fn(op.template, op.shardings,
                                       kind="rademacher", normalize=False)
  return Loop(driver.Pace(None, memory=op.remembered("trace products")),
              make, tiny)


def _in_loop(op, loop: Loop, q, rank, keys, start, count, phase, name):
  """Up to ``count`` products of ``phase`` from index ``start`` (of
  ``keys``, or of ``q`` for ``EXACT``) in one program and one host read.

  Returns:
    ``(q, rank, forms)``: the forms ``v^T H v`` of the products run.
  """
  pass_fn, data = op.pass_program()
  n = min(count, loop.pace.count(), _BLOCK)
  index = np.minimum(np.arange(_BLOCK) + (0 if phase == EXACT else start),
                     len(keys) - 1)
  tick = time.perf_counter()
  op.note_pass_program("trace")
  q, rank, table = _products_loop(
      op.params, data, q, keys[index], np.int32(start), np.int32(n),
      np.int32(phase), np.int32(rank), loop.tiny, pass_fn=pass_fn,
      make=loop.make, packing=basis_lib.packing(op.template, op.shardings, q))
  table = sharding_lib.host_value(table).astype(np.float64)
  ran = int(np.sum(~np.isnan(table[:, 0])))
  loop.pace.took(time.perf_counter() - tick, ran)
  for i in range(ran):
    op.account(table[i, :3], f"for {name} {start + i}")
  return q, int(sharding_lib.host_value(rank)), table[:ran, 3]


class HutchinsonState(NamedTuple):
  """``count`` samples ``z^T H z`` drawn, in ``samples`` (NaN beyond)."""
  samples: np.ndarray
  count: int


def hutchinson_step(op, state: HutchinsonState, keys,
                    per_call: int = 1,
                    loop: Loop | None = None) -> HutchinsonState:
  """Rademacher probes ``z``: the samples ``z^T H z``, ``E = tr(H)``.

  One probe, up to ``per_call`` of them as one batched pass
  (:meth:`HessianOperator.matvecs`), or with ``loop`` (one at a time) a
  block of them in one compiled loop (an empty sketch: one scratch slot).
  """
  i = state.count
  samples = state.samples.copy()
  if per_call == 1 and loop is not None:
    scratch = basis_lib.zeros(op.template, 1, op.shardings)
    _, _, forms = _in_loop(op, loop, scratch, 0, keys, i,
                           len(samples) - i, PROBE, "probe")
    samples[i:i + len(forms)] = forms
    return HutchinsonState(samples, i + len(forms))
  n = min(per_call, len(state.samples) - i)
  if n == 1:
    samples[i] = _quadratic_form(
        op, op.random_vector(keys[i], kind="rademacher", normalize=False),
        _which("probe", i, 1))
  else:
    samples[i:i + n] = _forms_of_stack(
        op, _probes(op, n)(keys[i:i + n]), _which("probe", i, n))
  return HutchinsonState(samples, i + n)


def _which(name, i, n):
  return f"for {name} {i}" if n == 1 else f"for {name}s {i} to {i + n - 1}"


@api.takes_operator
def hutchinson(op, *, num_probes: int = 30, key=None, show_pbar: bool = True,
               checkpointer=None,
               probes_per_call: int | str = 1) -> TraceResult:
  """Hutchinson's estimate of the Hessian's trace from Rademacher probes.

  Also callable as ``hutchinson(loss, params, batch_iterable, ...)`` with
  the keyword options of :class:`HessianOperator`.

  Args:
    op: the operator.
    num_probes: probes, one HVP each.
    key: PRNG key (default ``jax.random.key(0)``).
    show_pbar: a tqdm bar over probes.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``.
    probes_per_call: with the data on the devices, run this many probes as
      one batched pass (``vmap`` over the probes: the data is read once and
      the products share it); memory grows with it (that many vectors and
      their tangents at once). The samples are the same to rounding.
      ``'auto'`` takes as many as half the free device memory holds, from
      the compiled pass's bytes (``deeplanczos.probes_per_call``). One at a
      time (the default) runs them in compiled blocks of about a second
      (one program and one host read each) where ``driver.loops_pay``
      (compiled loops run fast, and no other compiled program holding the
      pass has run on the operator), else a pass each on ``op.matvec``'s
      program.
  """
  if not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
    raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}.")
  probes_per_call = plan_lib.resolve_probes_per_call(
      op, probes_per_call, num_probes, vectors=2)
  keys = jax.random.split(jax.random.key(0) if key is None else key,
                          num_probes)
  loop = _loop(op, 0.0)
  method = driver.Method(
      name="Hutchinson",
      step=lambda op, s: hutchinson_step(op, s, keys, probes_per_call, loop),
      done=lambda s: s.count == num_probes, planned_hvps=num_probes)
  state = HutchinsonState(np.full(num_probes, np.nan), 0)
  run = driver.run(op, method, state, checkpointer=checkpointer,
                   show_pbar=show_pbar)
  samples = run.state.samples
  return TraceResult(float(samples.mean()), _stderr(samples), samples,
                     run.num_hvps, "hutchinson")


class HutchppState(NamedTuple):
  """Hutch++ part way: the sketch ``Q`` and what is summed so far.

  Attributes:
    q: the orthonormal sketch basis (device arrays), ``rank`` slots used.
    sketched: sketch vectors ``H s`` drawn so far.
    rank: the sketch's rank (``H S`` may have a smaller one).
    exact: ``sum_i q_i^T H q_i`` over the first ``summed`` basis vectors.
    summed: basis vectors whose quadratic form is in ``exact``.
    samples: ``z^T (I - QQ^T) H (I - QQ^T) z`` of the probes drawn (NaN
      beyond ``count``).
    count: probes drawn.
  """
  q: Any
  sketched: int
  rank: int
  exact: float
  summed: int
  samples: np.ndarray
  count: int


def hutchpp_step(op, state: HutchppState, keys, sketch, tiny, per_call=1,
                 loop: Loop | None = None):
  """Products of one phase: sketch vectors, exact terms, or deflated probes
  (one, up to ``per_call`` as one batched pass, or with ``loop`` a block of
  them in one compiled loop).

  First ``Q = orth(H S)`` for Rademacher ``S`` (columns of negligible norm
  after orthogonalization are skipped: ``H S`` has a smaller rank), then
  ``tr(Q^T H Q)`` term by term, then Hutchinson on the deflated rest.
  ``Q`` has a slot more than the sketch, scratch for the loop.
  """
  if per_call == 1 and loop is not None:
    return _hutchpp_in_loop(op, state, keys, sketch, loop)
  if state.sketched < sketch:
    i = state.sketched
    n = min(per_call, sketch - i)
    where = _which("sketch vector", i, n)
    if n == 1:
      ys = jax.tree.map(lambda a: a[None], op.matvec(op.random_vector(
          keys[i], kind="rademacher", normalize=False), where=where))
    else:
      ys = op.matvecs(_probes(op, n)(keys[i:i + n]), where=where)
    q, rank = _absorb(state.q, ys, np.int32(state.rank), tiny)
    return state._replace(q=q, rank=int(sharding_lib.host_value(rank)),
                          sketched=i + n)
  if state.summed < state.rank:
    i = state.summed
    n = min(per_call, state.rank - i)
    where = _which("basis vector", i, n)
    terms = ([_quadratic_form(op, basis_lib.get(state.q, i), where)]
             if n == 1 else
             _forms_of_stack(op, _rows(state.q, np.int32(i), n), where))
    return state._replace(exact=state.exact + sum(terms), summed=i + n)
  i = state.count
  n = min(per_call, len(state.samples) - i)
  where = _which("probe", i, n)
  samples = state.samples.copy()
  if n == 1:
    samples[i] = _quadratic_form(op, basis_lib.orthogonalize(
        state.q, op.random_vector(keys[sketch + i], kind="rademacher",
                                  normalize=False), state.rank)[0], where)
  else:
    samples[i:i + n] = _forms_of_stack(op, _probes(op, n, deflate=True)(
        keys[sketch + i:sketch + i + n], state.q, np.int32(state.rank)),
                                       where)
  return state._replace(samples=samples, count=i + n)


def _hutchpp_in_loop(op, state: HutchppState, keys, sketch, loop: Loop):
  """:func:`hutchpp_step` with its products in one compiled loop."""
  q, rank = state.q, state.rank
  if state.sketched < sketch:
    i = state.sketched
    q, rank, forms = _in_loop(op, loop, q, rank, keys, i, sketch - i, SKETCH,
                              "sketch vector")
    return state._replace(q=q, rank=rank, sketched=i + len(forms))
  if state.summed < state.rank:
    i = state.summed
    q, _, forms = _in_loop(op, loop, q, rank, keys, i, rank - i, EXACT,
                           "basis vector")
    exact = state.exact
    for form in forms:  # one at a time, as however the blocks fell
      exact += float(form)
    return state._replace(q=q, exact=exact, summed=i + len(forms))
  i = state.count
  q, _, forms = _in_loop(op, loop, q, rank, keys[sketch:], i,
                         len(state.samples) - i, PROBE, "probe")
  samples = state.samples.copy()
  samples[i:i + len(forms)] = forms
  return state._replace(q=q, samples=samples, count=i + len(forms))


@api.takes_operator
def hutchpp(op, *, num_hvps: int = 60, key=None, show_pbar: bool = True,
            checkpointer=None,
            probes_per_call: int | str = 1) -> TraceResult:
  """The Hutch++ estimate of the Hessian's trace within ``num_hvps`` HVPs.

  Also callable as ``hutchpp(loss, params, batch_iterable, ...)`` with the
  keyword options of :class:`HessianOperator`.

  Args:
    op: the operator.
    num_hvps: the budget: a third sketches, a third takes the sketch's exact
      trace, the rest are Hutchinson probes of the deflated operator.
    key: PRNG key (default ``jax.random.key(0)``).
    show_pbar: a tqdm bar over the products.
    checkpointer: a ``deeplanczos.checkpoint.Checkpointer``.
    probes_per_call: with the data on the devices, run up to this many
      products of a phase (sketch vectors, exact terms, probes) as one
      batched pass, as :func:`hutchinson` does (``'auto'`` too); one at a
      time, in compiled blocks where that pays, as there.
  """
  if not isinstance(num_hvps, (int, np.integer)) or num_hvps < 3:
    raise ValueError(f"num_hvps must be an integer of at least 3, got {num_hvps!r}.")
  probes_per_call = plan_lib.resolve_probes_per_call(
      op, probes_per_call, num_hvps - 2 * (num_hvps // 3), vectors=2)
  sketch = num_hvps // 3
  probes = num_hvps - 2 * sketch
  keys = jax.random.split(jax.random.key(0) if key is None else key,
                          sketch + probes)
  dtype = jax.numpy.result_type(*jax.tree.leaves(op.template))
  tiny = 100 * float(jax.numpy.finfo(dtype).eps)
  state = HutchppState(basis_lib.zeros(op.template, sketch + 1, op.shardings),
                       0, 0, 0.0, 0, np.full(probes, np.nan), 0)
  loop = _loop(op, tiny)
  method = driver.Method(
      name="Hutch++", step=lambda op, s: hutchpp_step(op, s, keys, sketch,
                                                      tiny, probes_per_call,
                                                      loop),
      done=lambda s: s.count == probes, planned_hvps=num_hvps)
  run = driver.run(op, method, state, checkpointer=checkpointer,
                   show_pbar=show_pbar)
  samples = run.state.samples
  return TraceResult(run.state.exact + float(samples.mean()), _stderr(samples),
                     samples, run.num_hvps, "hutch++")
