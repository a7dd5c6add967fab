"""The Hessian-vector product kernel, accumulated over a pass in two layouts.

The product of one batch is forward-over-reverse (``jax.jvp`` of
``jax.grad``) of the batch's weighted loss sum. How the examples' products
are summed over the data axis is the kernel's ``accumulate``:

- ``'replicated'``: one ``psum`` per pass. Inside ``shard_map`` over the data
  axis, :func:`local_hvp` differentiates this device's examples only, with
  parameters and ``v`` entering whole over the data axis and marked
  device-varying, so no implicit reduction happens; each device sums its own
  products over the whole pass and one explicit ``psum`` over the data axis
  (across devices and hosts) ends it. The per-device partial sums are as
  large as the parameters' share of a device once they are whole over the
  data axis.
- ``'split'``: the parameters' layout. The batch's product is taken over the
  whole (global) batch in one auto-sharded program, and it is laid out, and
  summed over the pass, on the vectors' shardings: the compiler gathers each
  layer's parameters (and ``v``) where the layer runs, inside a scanned
  model's layer loop, and reduce-scatters the layer's product over the data
  axis, as a training step does for its gradient. With parameters split over
  the data axis (FSDP), no device ever holds a whole parameter set.

The model axis is left to the compiler in both, so parameters and vectors
stay sharded as the parameters are. :func:`choose_accumulate` picks the
layout by memory.

Compiled programs come from :func:`programs`, cached on the :class:`Kernel`
(the loss, the parameter structure and shardings, the mesh, the layout), so
a second operator on the same model reuses them; parameters are arguments,
never constants, so new parameter values do not recompile either.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math


@dataclasses.dataclass(frozen=True)
class WithPrecision:
  """``fn`` traced under ``jax.default_matmul_precision(precision)``:
  equal (and hashing alike) for equal ``fn`` and ``precision``, so the
  compiled programs keyed on a :class:`Kernel` are shared."""
  fn: Callable
  precision: str

  def __call__(self, *args):
    with jax.default_matmul_precision(self.precision):
      return self.fn(*args)


def check_precision(precision):
  """Raises unless ``precision`` is None or ``jax.default_matmul_precision``
  takes it."""
  if precision is None:
    return
  try:
    with jax.default_matmul_precision(precision):
      pass
  except (ValueError, TypeError) as e:
    raise ValueError(
        "precision must be None or a value jax.default_matmul_precision "
        "takes ('highest', 'float32', 'tensorfloat32', 'bfloat16', "
        f"'default', a DotAlgorithmPreset name); got {precision!r}.") from e


def with_precision(fn, precision):
  """``fn`` under ``precision`` (:class:`WithPrecision`); ``fn`` itself
  where either is None."""
  return fn if fn is None or precision is None else WithPrecision(
      fn, precision)


@dataclasses.dataclass(frozen=True)
class Kernel:
  """Everything the compiled programs depend on besides array shapes.

  Attributes:
    loss: ``loss(params, x, y)``, or ``loss(params, x, y, rng)`` with
      ``uses_rng``.
    treedef: the full parameters' tree structure.
    in_subset: for each parameter leaf, whether the operator acts on it.
    param_shardings: the full parameters' shardings, leaf by leaf.
    mesh: the device mesh.
    data_axis: the mesh axis batches are split over.
    uses_rng: the loss takes a fourth, per-batch and per-device PRNG key.
    curvature: ``'hessian'``, ``'ggn'`` or ``'fisher'``.
    model_fn: ``model_fn(params, x) -> outputs``, for the GGN.
    output_loss: ``output_loss(outputs, y) -> scalar`` (a batch mean), for
      the GGN.
    accumulate: ``'replicated'`` (one ``psum`` per pass) or ``'split'``
      (products on the vectors' shardings, per batch); see the module
      docstring.
  """
  loss: Callable
  treedef: Any
  in_subset: tuple[bool, ...]
  param_shardings: tuple[NamedSharding, ...]
  mesh: Mesh
  data_axis: str
  uses_rng: bool
  curvature: str = "hessian"
  model_fn: Callable | None = None
  output_loss: Callable | None = None
  accumulate: str = "replicated"

  def take(self, params):
    """The subset's leaves of ``params``, ``None`` elsewhere."""
    leaves = self.treedef.flatten_up_to(params)
    return self.treedef.unflatten(
        [l if keep else None for l, keep in zip(leaves, self.in_subset)])

  def merge(self, params, sub):
    """``params`` with the subset's leaves taken from ``sub``."""
    it = iter(jax.tree.leaves(sub))
    leaves = self.treedef.flatten_up_to(params)
    return self.treedef.unflatten(
        [next(it) if keep else l for l, keep in zip(leaves, self.in_subset)])

  @property
  def vector_shardings(self):
    return self.take(self.treedef.unflatten(list(self.param_shardings)))


CURVATURES = ("hessian", "ggn", "fisher")
ACCUMULATE = ("replicated", "split")


def split_over(shardings, axis: str) -> bool:
  """Whether any of ``shardings`` splits an array over mesh axis ``axis``."""
  return any(axis in (part if isinstance(part, tuple) else (part,))
             for s in jax.tree.leaves(shardings) for part in s.spec
             if part is not None)


def choose_accumulate(vector_shardings, mesh: Mesh, data_axis: str) -> str:
  """The accumulation layout that fits: ``'split'`` or ``'replicated'``.

  The replicated layout's per-device partial sums (float32 for 16-bit
  parameters) are whole over the data axis. When the parameters are whole
  over it too (data or tensor parallelism) that costs about what the
  parameters already take, and one ``psum`` per pass beats a reduction per
  batch: ``'replicated'``. When the parameters are split over the data axis
  (FSDP) it would cost the data-axis size times their share, and gathering
  them whole for the pass as much again: ``'split'``, which keeps every
  array in the parameters' layout. A data axis of size 1 reduces nothing:
  ``'split'``, one plain program.
  """
  if mesh.shape[data_axis] == 1 or split_over(vector_shardings, data_axis):
    return "split"
  return "replicated"


def _per_example(fn, x, y, keys):
  """``[fn(x_i, y_i, key_i)]``: ``fn`` on one-example batches, vectorized."""
  one = lambda a: a[None]
  return jax.vmap(lambda xi, yi, ki: fn(jax.tree.map(one, xi),
                                        jax.tree.map(one, yi), ki))(x, y, keys)


def _product(kernel: Kernel, params, v, x, y, w, rng, keys, *, padded: bool,
             varying: bool):
  """``(sum_i w_i C_i v, sum_i w_i loss_i)`` over the examples of ``x``.

  ``C_i`` is the curvature of example ``i``'s loss: its Hessian
  (forward-over-reverse, ``jax.jvp`` of ``jax.grad``); its generalized
  Gauss-Newton matrix ``J_i^T H_{L,i} J_i`` (``J`` the Jacobian of the model
  outputs, ``H_L`` the Hessian of the loss in the outputs: a JVP, an HVP in
  output space, a VJP); or its empirical Fisher ``g_i g_i^T`` (``g_i`` the
  example's gradient: ``J_L^T (w * J_L v)`` for the Jacobian ``J_L`` of the
  per-example losses).

  Unpadded batches are differentiated whole: ``n * loss(params, x, y)`` (the
  loss is a batch mean). Padded or masked batches are differentiated example
  by example, ``sum_i w_i loss(params, x_i, y_i)`` with example ``i``'s key
  ``keys[i]``, so padding rows weigh nothing.

  With ``varying`` (inside ``shard_map``) the parameters and ``v`` are marked
  device-varying over the data axis, so their derivatives are this device's
  examples' alone.
  """
  acc_dtype = w.dtype
  n = w.shape[0]

  def call(p, xb, yb, key):
    return kernel.loss(p, xb, yb) if rng is None else kernel.loss(p, xb, yb,
                                                                   key)

  def weighted_sum(per_batch, per_example):
    """``sum_i w_i l_i`` from a batch mean, or example by example."""
    if padded:
      return jnp.sum(w * per_example().astype(acc_dtype))
    return n * per_batch().astype(acc_dtype)

  sub = kernel.take(params)
  # Vectors may be stored wider than the parameters (a float32 Krylov basis
  # for bfloat16 parameters); the tangent takes the parameters' dtypes.
  v = jax.tree.map(lambda a, p: a.astype(p.dtype), v, sub)
  if varying:
    sub, v = lax.pcast((sub, v), kernel.data_axis, to="varying")

  if kernel.curvature == "hessian":
    def objective(sub):
      p = kernel.merge(params, sub)
      return weighted_sum(
          lambda: call(p, x, y, rng),
          lambda: _per_example(lambda a, b, k: call(p, a, b, k), x, y, keys))
    (value, _), (_, hv) = jax.jvp(jax.value_and_grad(objective), (sub,), (v,))
    return hv, value

  if kernel.curvature == "ggn":
    predict = lambda sub: kernel.model_fn(kernel.merge(params, sub), x)

    def output_objective(out):
      return weighted_sum(
          lambda: kernel.output_loss(out, y),
          lambda: _per_example(lambda o, b, k: kernel.output_loss(o, b), out,
                               y, keys))
    out, vjp = jax.vjp(predict, sub)
    _, jv = jax.jvp(predict, (sub,), (v,))
    (value, _), (_, hjv) = jax.jvp(jax.value_and_grad(output_objective),
                                   (out,), (jv,))
    (gv,) = vjp(hjv.astype(out.dtype))
    return gv, value

  def losses(sub):
    p = kernel.merge(params, sub)
    return _per_example(lambda a, b, k: call(p, a, b, k), x, y, keys)
  values, vjp = jax.vjp(losses, sub)
  _, directional = jax.jvp(losses, (sub,), (v,))  # g_i . v
  weighted = (w * directional.astype(acc_dtype)).astype(directional.dtype)
  (fv,) = vjp(weighted)
  return fv, jnp.sum(w * values.astype(acc_dtype))


def _keys(kernel, loss_rng, index, device, n):
  """The batch's loss key on data-axis position ``device``, and its examples'.

  ``fold_in(fold_in(loss_rng, batch), device)``, and ``fold_in`` of that with
  each example's position: the keys a one-device run uses when ``device`` is
  0 and the batch is whole.
  """
  if not kernel.uses_rng:
    return None, jnp.zeros(n)
  rng = jax.random.fold_in(jax.random.fold_in(loss_rng, index), device)
  return rng, jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))


def local_hvp(kernel: Kernel, params, v, x, y, w, index, loss_rng, *,
              padded: bool):
  """This device's ``(sum_i w_i C_i v, sum_i w_i loss_i, sum_i w_i)``.

  Runs inside ``shard_map`` with the data axis manual; nothing is reduced
  over the data axis here (see :func:`_product`). The loss key is folded
  with the device's data-axis index.
  """
  rng, keys = _keys(kernel, loss_rng, index, lax.axis_index(kernel.data_axis),
                    w.shape[0])
  hv, value = _product(kernel, params, v, x, y, w, rng, keys, padded=padded,
                       varying=True)
  return hv, value, jnp.sum(w)


def global_hvp(kernel: Kernel, params, v, x, y, w, index, loss_rng, *,
               padded: bool):
  """The whole batch's ``(sum_i w_i C_i v, sum_i w_i loss_i, sum_i w_i)``.

  An auto-sharded program: the product is laid out on the vectors'
  shardings, so the compiler reduces it over the data axis (a
  reduce-scatter with FSDP) where each layer's product is formed. The loss
  key is a one-device run's (data-axis index 0).
  """
  rng, keys = _keys(kernel, loss_rng, index, 0, w.shape[0])
  hv, value = _product(kernel, params, v, x, y, w, rng, keys, padded=padded,
                       varying=False)
  hv = jax.tree.map(lambda h, s: lax.with_sharding_constraint(
      h.astype(tree_math.accumulation_dtype(h.dtype)), s), hv,
                    kernel.vector_shardings)
  return hv, value, jnp.sum(w)


class Stats(NamedTuple):
  """Per-device running sums of a pass: examples, loss, first bad batch."""
  count: jax.Array
  loss: jax.Array
  bad: jax.Array  # the first batch with a non-finite product, or -1


def _add(acc, stats, hv, value, count, index):
  finite = jnp.isfinite(value)
  for leaf in jax.tree.leaves(hv):
    finite &= jnp.all(jnp.isfinite(leaf))
  acc = jax.tree.map(lambda a, h: a + h.astype(a.dtype), acc, hv)
  bad = jnp.where((stats.bad < 0) & ~finite, index, stats.bad)
  return acc, Stats(stats.count + count, stats.loss + value,
                    bad.astype(stats.bad.dtype))


def _reduce(kernel, acc, stats):
  """The pass's one reduction: ``psum`` over the data axis."""
  axis = kernel.data_axis
  none = jnp.asarray(jnp.iinfo(jnp.int32).max, stats.bad.dtype)
  bad = lax.pmin(jnp.where(stats.bad < 0, none, stats.bad), axis)
  return lax.psum(acc, axis), Stats(
      lax.psum(stats.count, axis), lax.psum(stats.loss, axis),
      jnp.where(bad == none, -1, bad))


def _finish(hv_sum, stats, like):
  """``H v``: the weighted sum over the examples' count, in ``v``'s dtypes."""
  hv = jax.tree.map(lambda a, t: (a / stats.count).astype(t.dtype), hv_sum,
                    like)
  return hv, jnp.stack([stats.count, stats.loss,
                        stats.bad.astype(stats.count.dtype)])


def _zeros_like(kernel, v, acc_dtype):
  z = jax.tree.map(
      lambda t: jnp.zeros(t.shape, tree_math.accumulation_dtype(t.dtype)), v)
  zero = jnp.zeros((), acc_dtype)
  stats = Stats(zero, zero, jnp.asarray(-1, jnp.int32))
  return lax.pcast((z, stats), kernel.data_axis, to="varying")


class Programs(NamedTuple):
  """The compiled programs of one :class:`Kernel`.

  A pass is ``start``, then ``segment_step`` for each run of batches kept on
  the devices or ``batch_step`` for each streamed batch, then ``finish``; a
  pass whose data on the devices fits one program is ``device_pass``:

  - ``start(v, weight_dtype=...) -> (acc, stats)``: zero accumulators (in
    the replicated layout per device, each leaf with a leading data axis; in
    the split layout on the vectors' shardings);
  - ``segment_step(params, v, acc, stats, segment, loss_rng, padded=...,
    unroll=...)``: adds a stacked run of batches (a ``lax.scan``);
  - ``batch_step(params, v, acc, stats, index, x, y, w, loss_rng,
    padded=...)``: adds one batch;
  - ``finish(acc, stats, v) -> (Hv, [count, loss, bad])``: the division by
    the count, after (replicated layout) the pass's one reduction over the
    data axis;
  - ``device_pass(params, v, segments, loss_rng, padded=..., unroll=...)
    -> (Hv, [count, loss, bad])``: all of it in one program.

  The steps donate the accumulators they update.
  """
  start: Callable
  segment_step: Callable
  batch_step: Callable
  finish: Callable
  device_pass: Callable


def _scan(product, kernel, params, v, carry, segment, loss_rng, padded,
          unroll):
  """Adds a stacked run of batches to the accumulators."""
  def body(carry, batch):
    x, y, w, index = batch
    hv, value, count = product(kernel, params, v, x, y, w, index, loss_rng,
                               padded=padded)
    return _add(*carry, hv, value, count, index), None
  carry, _ = lax.scan(body, carry, tuple(segment), unroll=unroll)
  return carry


def _compiled(start, segment_step, batch_step, finish, device_pass,
              accumulators, outputs) -> Programs:
  """The pass's functions under ``jit``, the steps donating their sums."""
  return Programs(
      start=jax.jit(start, static_argnames="weight_dtype",
                    out_shardings=accumulators),
      segment_step=jax.jit(segment_step, static_argnames=("padded", "unroll"),
                           out_shardings=accumulators, donate_argnums=(2, 3)),
      batch_step=jax.jit(batch_step, static_argnames="padded",
                         out_shardings=accumulators, donate_argnums=(2, 3)),
      finish=jax.jit(finish, out_shardings=outputs),
      device_pass=jax.jit(device_pass, static_argnames=("padded", "unroll"),
                          out_shardings=outputs))


@functools.lru_cache(maxsize=64)
def programs(kernel: Kernel) -> Programs:
  """The kernel's programs, compiled on first use and cached with it."""
  if kernel.accumulate == "split":
    return _split_programs(kernel)
  return _replicated_programs(kernel)


def _split_programs(kernel: Kernel) -> Programs:
  """Auto-sharded programs summing products on the vectors' shardings."""
  rep = NamedSharding(kernel.mesh, P())
  accumulators = (kernel.vector_shardings, Stats(rep, rep, rep))

  def start(v, weight_dtype):
    zero = jnp.zeros((), weight_dtype)
    return (jax.tree.map(lambda t: jnp.zeros(
        t.shape, tree_math.accumulation_dtype(t.dtype)), v),
            Stats(zero, zero, jnp.asarray(-1, jnp.int32)))

  def segment_step(params, v, acc, stats, segment, loss_rng, padded, unroll):
    return _scan(global_hvp, kernel, params, v, (acc, stats), segment,
                 loss_rng, padded, unroll)

  def batch_step(params, v, acc, stats, index, x, y, w, loss_rng, padded):
    hv, value, count = global_hvp(kernel, params, v, x, y, w, index,
                                  loss_rng, padded=padded)
    return _add(acc, stats, hv, value, count, index)

  def device_pass(params, v, segments, loss_rng, padded, unroll):
    carry = start(v, segments[0].w.dtype)
    for segment, is_padded, n in zip(segments, padded, unroll):
      carry = _scan(global_hvp, kernel, params, v, carry, segment, loss_rng,
                    is_padded, n)
    return _finish(*carry, v)

  return _compiled(start, segment_step, batch_step, _finish, device_pass,
                   accumulators, (kernel.vector_shardings, rep))


def _replicated_programs(kernel: Kernel) -> Programs:
  """``shard_map`` programs: per-device sums, one ``psum`` a pass."""
  axis = kernel.data_axis
  mesh = kernel.mesh
  rep = NamedSharding(mesh, P())
  vec_sh = kernel.vector_shardings
  # Each device's partial sums: a leading data axis, and no other split over
  # it (with FSDP the vectors are split over the data axis too; the sums are
  # whole until the pass's reduction).
  acc_sh = jax.tree.map(
      lambda s: NamedSharding(mesh, P(axis, *sharding_lib.without_axis(
          s.spec, axis))), vec_sh)
  stats_sh = Stats(*(NamedSharding(mesh, P(axis)),) * 3)
  manual = {axis}
  data = P(axis)
  stacked = P(None, axis)
  lead = lambda tree: jax.tree.map(lambda a: a[None], tree)
  unlead = lambda tree: jax.tree.map(lambda a: a[0], tree)

  def specs(segments):
    return tuple(type(s)(stacked, stacked, stacked, P()) for s in segments)

  def start(v, weight_dtype):
    def local(v):
      return lead(_zeros_like(kernel, v, weight_dtype))
    return jax.shard_map(local, mesh=mesh, in_specs=(P(),), out_specs=data,
                         axis_names=manual)(v)

  def segment_step(params, v, acc, stats, segment, loss_rng, padded, unroll):
    def local(params, v, acc, stats, segment, loss_rng):
      return lead(_scan(local_hvp, kernel, params, v, unlead((acc, stats)),
                        segment, loss_rng, padded, unroll))
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), data, data, specs([segment])[0],
                                    P()),
        out_specs=data, axis_names=manual)(params, v, acc, stats, segment,
                                           loss_rng)

  def batch_step(params, v, acc, stats, index, x, y, w, loss_rng, padded):
    def local(params, v, acc, stats, x, y, w, index, loss_rng):
      acc, stats = unlead((acc, stats))
      hv, value, count = local_hvp(kernel, params, v, x, y, w, index,
                                   loss_rng, padded=padded)
      return lead(_add(acc, stats, hv, value, count, index))
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(), P(), data, data, data, data, data, P(), P()),
        out_specs=data, axis_names=manual)(params, v, acc, stats, x, y, w,
                                           index, loss_rng)

  def finish(acc, stats, v):
    def local(acc, stats):
      return _reduce(kernel, *unlead((acc, stats)))
    hv_sum, stats = jax.shard_map(
        local, mesh=mesh, in_specs=(data, data), out_specs=P(),
        axis_names=manual)(acc, stats)
    return _finish(hv_sum, stats, v)

  def device_pass(params, v, segments, loss_rng, padded, unroll):
    weight_dtype = segments[0].w.dtype

    def local(params, v, segments, loss_rng):
      carry = _zeros_like(kernel, v, weight_dtype)
      for segment, is_padded, n in zip(segments, padded, unroll):
        carry = _scan(local_hvp, kernel, params, v, carry, segment, loss_rng,
                      is_padded, n)
      return _reduce(kernel, *carry)

    hv_sum, stats = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), specs(segments), P()),
        out_specs=P(), axis_names=manual)(params, v, segments, loss_rng)
    return _finish(hv_sum, stats, v)

  return _compiled(start, segment_step, batch_step, finish, device_pass,
                   (acc_sh, stats_sh), (vec_sh, rep))
