"""The Hessian of a dataset loss as a matrix-free, sharded linear operator.

``H v = sum_b sum_{i in b} w_i H_i v / sum_b sum_{i in b} w_i``: the Hessian
of the loss averaged over every example of ``batch_iterable``, one full pass
per product. The kernel (``hvp.py``) differentiates each device's examples and
reduces once per pass; batch handling (``batches.py``) parses, pads, masks
and places the data, kept on the devices when it fits; parameter subsets
(``subset.py``) select a block of the Hessian; shardings come from
``sharding.py``.
"""

import copy
from collections.abc import Callable
import dataclasses
import functools
import math
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import tqdm.auto as tqdm

from deeplanczos._src import batches as batches_lib
from deeplanczos._src import hvp as hvp_lib
from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import subset as subset_lib
from deeplanczos._src import tree_math

# Data up to this many bytes per process is kept on the devices by default.
DEVICE_BYTES = 1 << 28
# On CPU, the most batches one compiled program of a pass holds (unrolled).
SEGMENT_CPU = 8


def _spec(tree):
  """A hashable description of a pytree's shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l))
                        for l in leaves)


@functools.lru_cache(maxsize=256)
def _loss_output(loss, uses_rng, params_spec, batch_spec):
  params = params_spec[0].unflatten(params_spec[1])
  x, y = batch_spec[0].unflatten(batch_spec[1])
  args = (jax.ShapeDtypeStruct((), jax.random.key(0).dtype),) if uses_rng else ()
  return jax.eval_shape(loss, params, x, y, *args)


@functools.lru_cache(maxsize=64)
def _per_device_output(loss, uses_rng, mesh, data_axis, params_spec,
                       batch_spec):
  """``(output, None)`` of ``loss`` on one device's share of a batch, traced
  inside ``shard_map`` over the data axis; or ``(None, why)`` if it fails.

  Some models trace under ``jit`` but not with a manual data axis: flax's
  ``nn.DenseGeneral`` with ``nn.with_partitioning`` on a kernel of rank 3
  (its initializer's shape check applies a rank-3 sharding to a flattened
  rank-2 kernel whenever a mesh is in context), activations constrained
  over the data axis.
  """
  params = params_spec[0].unflatten(params_spec[1])
  x, y = batch_spec[0].unflatten(batch_spec[1])
  size = mesh.shape[data_axis]
  x, y = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      (-(-a.shape[0] // size) * size, *a.shape[1:]), a.dtype), (x, y))
  args = (jax.random.key(0),) if uses_rng else ()
  local = lambda p, xb, yb: jnp.asarray(loss(p, xb, yb, *args))[None]
  try:
    out = jax.eval_shape(jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(data_axis), P(data_axis)),
        out_specs=P(data_axis), axis_names={data_axis}), params, x, y)
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
  return jax.ShapeDtypeStruct(out.shape[1:], out.dtype), None


# Leaves up to this many elements, replicated, are drawn together.
_DRAWN_TOGETHER = 2**16


def random_draw(template, shardings, kind="normal"):
  """``key -> vector``, :func:`random_vector_fn`'s draw before its scaling,
  to trace inside another program."""
  leaves = jax.tree.leaves(template)
  sampler = (jax.random.rademacher if kind == "rademacher"
             else jax.random.normal)
  together = tuple(
      "replicated" if s.is_fully_replicated and math.prod(
          l.shape) <= _DRAWN_TOGETHER else None
      for s, l in zip(jax.tree.leaves(shardings), leaves))
  return lambda key: tree_math.tree_random(key, template, sampler, together)


@functools.lru_cache(maxsize=64)
def _random_fn(spec, shardings, kind, normalize):
  treedef, shapes = spec
  draw = random_draw(treedef.unflatten(shapes), treedef.unflatten(shardings),
                     kind)

  def make(key):
    v = draw(key)
    if normalize:
      v = tree_math.tree_scale(v, 1.0 / tree_math.tree_norm(v))
    return v

  return jax.jit(make, out_shardings=treedef.unflatten(shardings))


def random_vector_fn(template, shardings, *, kind="normal", normalize=True):
  """A jitted ``key -> vector``: random pytrees like ``template``.

  The vector is generated directly on ``shardings`` (``out_shardings``), so
  no full copy exists on any one device. Cached on the template's structure,
  shapes, dtypes and shardings.

  Args:
    template: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
    shardings: the output shardings, a pytree like ``template``.
    kind: ``'normal'`` or ``'rademacher'`` (random signs).
    normalize: scale to unit norm over the whole tree.
  """
  if kind not in ("normal", "rademacher"):
    raise ValueError(f"kind must be 'normal' or 'rademacher', got {kind!r}.")
  return _random_fn(_spec(template), tuple(jax.tree.leaves(shardings)), kind,
                    normalize)


def _primitives(jaxpr) -> set[str]:
  """The names of the primitives in ``jaxpr`` and the jaxprs it calls."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          names |= _primitives(sub)
  return names


class PassFn(NamedTuple):
  """A whole pass over data on the devices: ``fn(params, v, data)``.

  Hashable and equal for operators of one model and data layout, so a
  ``jit`` that takes it as a static argument compiles once.
  """
  programs: hvp_lib.Programs
  padded: tuple[bool, ...]
  unroll: tuple[int, ...]

  def __call__(self, params, v, data):
    segments, loss_rng = data
    return self.programs.device_pass(params, v, segments, loss_rng,
                                     padded=self.padded, unroll=self.unroll)


@functools.partial(jax.jit, static_argnames="pass_fn")
def _one(params, v, data, *, pass_fn):
  return pass_fn(params, v, data)


@functools.partial(jax.jit, static_argnames="pass_fn")
def _linearized(params, v, data, *, pass_fn):
  """``(H v, f, stats)``: ``pass_fn`` linearized in ``v`` at ``params``.

  ``f`` (a ``jax.tree_util.Partial``) applies the pass's linear map with
  what depends only on the parameters and data (the forward and backward
  passes) kept as its arrays; its tree structure comes from this program's
  one trace, so :func:`_apply` compiles once for every ``params``.
  """
  return jax.linearize(lambda u: pass_fn(params, u, data), v, has_aux=True)


@functools.partial(jax.jit, static_argnames="shardings")
def _apply(f, v, *, shardings):
  """``(f(v)`` on ``shardings`` (one per leaf), whether every element is
  finite)."""
  hv = f(v)
  hv = jax.lax.with_sharding_constraint(
      hv, jax.tree.unflatten(jax.tree.structure(hv), shardings))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(hv)]))
  return hv, finite


@functools.partial(jax.jit, static_argnames="pass_fn")
def _many(params, vectors, data, *, pass_fn):
  """``pass_fn`` for a stack of vectors: one program, products in parallel."""
  return jax.vmap(pass_fn, in_axes=(None, 0, None))(params, vectors, data)


class HessianOperator:
  """``v -> H v`` for the Hessian of a loss averaged over a whole dataset.

  (Or, with ``curvature=``, the generalized Gauss-Newton matrix or the
  empirical Fisher; every method works on each.)

  Vectors are pytrees with the structure, shapes, dtypes and shardings of the
  parameters (of the selected ``subset``). One application is one full pass
  over the data; the host reads three scalars per pass (example count, loss,
  first non-finite batch).

  By default (``data_on_device=None``) a dataset of at most
  ``device_bytes`` per process is read once, stacked and kept on the devices,
  split over the data axis, and every product is one compiled program (a
  ``lax.scan`` over the batches); a larger one streams, each batch placed
  while the one before computes. Either way each device accumulates its own
  examples and the pass ends with one ``psum`` over the data axis.

  The compiled programs are cached on the loss function, the parameters'
  structure and shardings, and the mesh: a second operator on the same model,
  or :meth:`with_params` after an optimizer step, compiles nothing.

  With ``loss_rng`` (a PRNG key), the loss is called as
  ``loss(params, x, y, rng)`` with ``rng`` derived from ``loss_rng`` by
  ``fold_in`` of the batch index and of the device's data-axis index (and of
  the example's index in a masked batch): dropout masks are then the same on
  every pass, so every product applies the same ``H``.

  Args:
    loss: ``loss(params, x, y) -> scalar``, the mean loss of a batch.
    params: the parameters at which the Hessian is taken.
    batch_iterable: a re-iterable of batches (list, grain ``MapDataset`` or
      ``DataLoader``, ...) or a zero-argument callable returning an iterator.
    batch_parser: ``batch -> (x, y)`` or ``(x, y, mask)`` with a 0/1 mask of
      real examples; by default a batch is ``(x, y)`` itself.
    mesh: the device mesh; by default the mesh of ``params``' shardings or
      one device.
    shardings: the parameters' shardings, a pytree of ``NamedSharding``.
    shardings_rule: ``rule(params, mesh)``, the layout when neither
      ``shardings`` nor the parameters give one.
    data_axis: the mesh axis batches are split over.
    subset: a regular expression on parameter paths (``'Dense_1'``) or a
      predicate: the operator is then that block of the Hessian.
    show_pbar: a tqdm bar over the batches of a streamed pass.
    loss_rng: a PRNG key for losses that take one (dropout).
    data_on_device: ``True`` keeps the data on the devices, ``False``
      streams every pass, ``None`` decides by ``device_bytes``.
    device_bytes: the most bytes per process kept on the devices when
      ``data_on_device`` is ``None``.
    curvature: the matrix: ``'hessian'``; ``'ggn'``, the generalized
      Gauss-Newton matrix ``J^T H_L J`` of ``output_loss(model_fn(params,
      x), y)`` (positive semi-definite for a convex ``output_loss``); or
      ``'fisher'``, the empirical Fisher ``mean_i g_i g_i^T`` of the
      per-example gradients of ``loss``.
    model_fn: ``model_fn(params, x) -> outputs``, for ``'ggn'``.
    output_loss: ``output_loss(outputs, y) -> scalar``, the mean loss of a
      batch of outputs, for ``'ggn'``.
    accumulate: how products are summed over the data axis:
      ``'replicated'``, per device over the whole pass and one ``psum`` at
      its end (partial sums whole over the data axis); ``'split'``, each
      batch's product reduced as it is formed and kept on the vectors'
      shardings (the compiler gathers one layer's parameters at a time, as a
      training step does). ``None`` chooses by memory: ``'split'`` when the
      parameters are split over the data axis (FSDP) or that axis has one
      device, ``'replicated'`` otherwise.
    precision: the matrix products' precision for float32 inputs inside
      ``loss`` (and ``model_fn``, ``output_loss``), as
      ``jax.default_matmul_precision`` takes it: ``'highest'`` (the default)
      computes them in float32 on every platform; ``None`` keeps JAX's
      default, which on TPUs rounds float32 inputs to bfloat16 and on recent
      NVIDIA GPUs to TensorFloat32 (measured on an H200: top-5 eigenvalues
      3.5e-4 off the dense float64 answer where float32 gives 2e-7), faster
      and coarser. A product's own ``precision=`` argument wins; like
      JAX's setting, it is for float32 inputs.
    linearize: with the data on the devices in one program, :meth:`matvec`
      linearizes the pass in ``v`` once per parameters (``jax.linearize``:
      one pass that keeps what depends only on the parameters and data, the
      forward and backward passes' intermediates over the whole kept data)
      and then applies only the linear map: products 17-31% faster on a
      small CNN (the speed a closure over the parameters gets from XLA's
      constant folding, without compiling again for new parameters), the
      same values, at the price of a second compiled program and the
      intermediates' memory on the devices. Methods running their own
      compiled loops of products keep the plain pass; streamed data
      always does.

  Attributes:
    mesh: the device mesh.
    params: the full parameters, placed on their shardings.
    shardings: the vectors' shardings (a pytree of ``NamedSharding``).
    template: the parameters the operator acts on (``None`` off the subset).
    num_matvecs: how many products (full data passes) were computed.
    num_examples: examples in one pass (known after the first product).
    loss_value: the dataset loss, from the last pass.
  """

  def __init__(self, loss: Callable, params, batch_iterable, *,
               batch_parser: Callable | None = None, mesh: Mesh | None = None,
               shardings=None,
               shardings_rule: Callable = sharding_lib.infer_sharding,
               data_axis: str = "data", subset=None, show_pbar: bool = False,
               loss_rng=None, data_on_device: bool | None = None,
               device_bytes: int = DEVICE_BYTES, curvature: str = "hessian",
               model_fn: Callable | None = None,
               output_loss: Callable | None = None,
               accumulate: str | None = None,
               precision: str | None = "highest", linearize: bool = False):
    if not callable(loss):
      raise TypeError(f"loss must be callable, got {type(loss).__name__}.")
    if linearize not in (True, False):
      raise TypeError(f"linearize must be True or False; got {linearize!r}.")
    hvp_lib.check_precision(precision)
    loss, model_fn, output_loss = (hvp_lib.with_precision(f, precision)
                                   for f in (loss, model_fn, output_loss))
    if batch_parser is not None and not callable(batch_parser):
      raise TypeError("batch_parser must be callable, got "
                      f"{type(batch_parser).__name__}.")
    if curvature not in hvp_lib.CURVATURES:
      raise ValueError(f"curvature must be one of {hvp_lib.CURVATURES}; got "
                       f"{curvature!r}.")
    if curvature == "ggn" and not (callable(model_fn) and
                                   callable(output_loss)):
      raise TypeError(
          "curvature='ggn' needs model_fn(params, x) -> outputs and "
          "output_loss(outputs, y) -> scalar; got model_fn="
          f"{type(model_fn).__name__}, output_loss="
          f"{type(output_loss).__name__}.")
    if curvature == "ggn" and loss_rng is not None:
      raise ValueError("curvature='ggn' takes model_fn(params, x) without a "
                       "PRNG key; loss_rng must be None.")
    if accumulate not in (None, *hvp_lib.ACCUMULATE):
      raise ValueError(f"accumulate must be None or one of "
                       f"{hvp_lib.ACCUMULATE}; got {accumulate!r}.")
    if data_on_device not in (None, True, False):
      raise TypeError("data_on_device must be None, True or False; got "
                      f"{data_on_device!r}.")
    self.mesh, self.params, full_shardings = sharding_lib.resolve_shardings(
        params, mesh=mesh, shardings=shardings, shardings_rule=shardings_rule)
    if data_axis not in self.mesh.axis_names:
      raise ValueError(f"The mesh has axes {self.mesh.axis_names}, but the "
                       f"data axis is {data_axis!r}.")
    self.template = subset_lib.select(self.params, subset)
    self.shardings = subset_lib.take(self.template, full_shardings)
    treedef = jax.tree.structure(self.params)
    self._auto_accumulate = accumulate is None
    self._probed = None, None  # (batch spec, loss output) checked per device
    # batched_pass_bytes by count: compiled once, shared with with_params's
    # copies (the bytes do not depend on the parameters' values).
    self._pass_bytes = {}
    # Shared the same way: loops_run_fast's answer, the compiled programs
    # holding the pass that have run, what methods remember (remembered).
    self._facts = {}
    if accumulate is None:
      accumulate = hvp_lib.choose_accumulate(self.shardings, self.mesh,
                                             data_axis)
    self.kernel = hvp_lib.Kernel(
        loss=loss, treedef=treedef,
        in_subset=tuple(t is not None
                        for t in treedef.flatten_up_to(self.template)),
        param_shardings=tuple(treedef.flatten_up_to(full_shardings)),
        mesh=self.mesh, data_axis=data_axis, uses_rng=loss_rng is not None,
        curvature=curvature, model_fn=model_fn, output_loss=output_loss,
        accumulate=accumulate)
    self._programs = hvp_lib.programs(self.kernel)
    self._params_spec = _spec(self.params)  # checked against each batch
    self._loss_rng = jax.random.key(0) if loss_rng is None else loss_rng
    self._parser = batch_parser
    self._passes = batches_lib.Passes(batch_iterable)
    self._show_pbar = show_pbar
    self._local_data = sharding_lib.local_data_size(self.mesh, data_axis)
    self._batch_sharding = NamedSharding(self.mesh, P(data_axis))
    self._weight_dtype = np.dtype(tree_math.accumulation_dtype(
        jnp.result_type(*jax.tree.leaves(self.template))))
    self._on_device = data_on_device
    self._device_bytes = device_bytes
    self._segments = None  # (segments, padded, unroll) once on the devices
    self._whole = None  # the pass as one program, where it fits one
    self._linearize = linearize
    self._linear = None  # (params, linear map, stats) once linearized
    self.num_matvecs = 0
    self.num_examples = None
    self.loss_value = None

  def __repr__(self):
    leaves = jax.tree.leaves(self.template)
    dtypes = sorted({str(l.dtype) for l in leaves})
    where = {None: "not read yet", True: "on the devices",
             False: "streamed"}[self._on_device]
    return (f"HessianOperator(curvature={self.kernel.curvature!r}, "
            f"parameters={tree_math.tree_size(self.template):,} in "
            f"{len(leaves)} arrays ({'/'.join(dtypes)}), "
            f"mesh={dict(self.mesh.shape)}, "
            f"data_axis={self.kernel.data_axis!r}, "
            f"accumulate={self.kernel.accumulate!r}, data {where}"
            + ("" if self.num_examples is None else
               f", {self.num_examples:,} examples")
            + f", products={self.num_matvecs})")

  @property
  def data_on_device(self) -> bool | None:
    """Whether the data is kept on the devices (None: not decided yet)."""
    return self._on_device

  def with_params(self, params) -> "HessianOperator":
    """The same operator at other parameter values, compiling nothing.

    The data (kept on the devices or not), mesh, shardings, subset and
    compiled programs are shared; only the parameters change. Use it to
    follow the Hessian through training.

    Args:
      params: parameters with the structure, shapes and dtypes of the
        operator's; they are placed on its shardings.
    """
    params = sharding_lib.unbox(params)
    if jax.tree.structure(params) != self.kernel.treedef:
      raise ValueError(
          "with_params needs parameters with the operator's tree structure; "
          f"expected {self.kernel.treedef}, got {jax.tree.structure(params)}.")
    for old, new in zip(jax.tree.leaves(self.params), jax.tree.leaves(params)):
      if np.shape(new) != old.shape or jnp.result_type(new) != old.dtype:
        raise ValueError(
            f"with_params needs parameters of the same shapes and dtypes; "
            f"expected {old.shape} {old.dtype}, got {np.shape(new)} "
            f"{jnp.result_type(new)}.")
    other = copy.copy(self)
    other.params = sharding_lib.put(params, self.kernel.treedef.unflatten(
        list(self.kernel.param_shardings)))
    other.num_matvecs, other.loss_value = 0, None
    return other

  def _check_loss(self, x, y, n, index):
    """Checks the loss's output; settles the layout on the first batch.

    With the layout chosen automatically as replicated, the operator's first
    batch is checked inside ``shard_map`` (where the replicated programs will
    trace it): a loss that traces under ``jit`` but not there switches the
    layout to split, with a warning. Every batch shape is traced once either
    way, however many passes stream the data.
    """
    spec, failure = _spec((x, y)), None
    if (self._probed[0] is None and self._auto_accumulate
        and self.kernel.accumulate == "replicated"):
      out, failure = _per_device_output(
          self.kernel.loss, self.kernel.uses_rng, self.mesh,
          self.kernel.data_axis, self._params_spec, spec)
      self._probed = spec, out
    out = self._probed[1] if self._probed[0] == spec else None
    if out is None:
      try:
        out = _loss_output(self.kernel.loss, self.kernel.uses_rng,
                           self._params_spec, spec)
      except Exception as e:  # pylint: disable=broad-except
        lines = str(e).strip().splitlines() or [""]
        raise ValueError(
            f"loss(params, x, y) fails on batch {index} (x "
            f"{batches_lib.shapes(x)}, y {batches_lib.shapes(y)}): "
            f"{type(e).__name__}: {lines[0][:300]}") from e
    if failure is not None:
      warnings.warn(
          "The loss does not trace per device inside shard_map over the data "
          f"axis ({failure}); summing products in the parameters' layout "
          "instead (accumulate='split').", stacklevel=2)
      self.kernel = dataclasses.replace(self.kernel, accumulate="split")
      self._programs = hvp_lib.programs(self.kernel)
    if not (hasattr(out, "shape") and out.shape == ()
            and jnp.issubdtype(out.dtype, jnp.floating)):
      got = getattr(out, "shape", type(out).__name__)
      raise ValueError("loss(params, x, y) must return a floating scalar (the "
                       f"mean loss of the batch); for a batch of {n} examples "
                       f"it returned {got} {getattr(out, 'dtype', '')}.")

  def _host_batches(self):
    first = None
    for index, batch in enumerate(self._passes()):
      x, y, mask, n = batches_lib.parse(batch, self._parser)
      first = batches_lib.check_features(x, y, index, first)
      self._check_loss(x, y, n, index)
      yield batches_lib.to_host_batch(x, y, mask, n,
                                      local_data=self._local_data,
                                      weight_dtype=self._weight_dtype)

  def _no_batches(self, where):
    when = ("The data" if self.num_matvecs == 0 else
            f"Pass {self.num_matvecs + 1} over the data")
    raise ValueError(
        f"{when} gave no batches{' ' + where if where else ''}. "
        "batch_iterable must yield at least one batch on every pass; a "
        "one-shot iterator is empty on its second pass.")

  def _load(self, where):
    """Reads one pass and keeps it on the devices, if it is to be kept."""
    kept, size = [], 0
    for batch in self._host_batches():
      kept.append(batch)
      size += batches_lib.nbytes(batch)
      if self._on_device is None and (
          size > self._device_bytes or self._passes.length and
          size * self._passes.length / len(kept) > 2 * self._device_bytes):
        self._on_device = False
        return
    if not kept:
      self._no_batches(where)
    self._on_device = True
    # XLA:CPU runs a loop's body without its fast (multi-threaded)
    # convolutions and matmuls, so there every scan is unrolled: a pass of at
    # most SEGMENT_CPU batches is one program, a longer one a program per
    # SEGMENT_CPU batches. Elsewhere a pass is one program of rolled scans.
    cpu = self.mesh.devices.flat[0].platform == "cpu"
    segments, padded = batches_lib.stack(
        kept, self.mesh, self.kernel.data_axis,
        max_length=SEGMENT_CPU if cpu else len(kept))
    unroll = tuple(len(s.index) if cpu else 1 for s in segments)
    self._segments = segments, padded, unroll
    if not cpu or sum(unroll) <= SEGMENT_CPU:
      self._whole = PassFn(self._programs, padded, unroll)

  def _device_pass(self, v):
    segments, padded, unroll = self._segments
    if self._whole is not None:
      self.note_pass_program("matvec")
      data = (segments, self._loss_rng)
      if self._linearize:
        return self._linear_pass(v, data)
      return self._whole(self.params, v, data)
    acc, stats = self._programs.start(v, weight_dtype=self._weight_dtype)
    for segment, is_padded, n in zip(segments, padded, unroll):
      acc, stats = self._programs.segment_step(
          self.params, v, acc, stats, segment, self._loss_rng,
          padded=is_padded, unroll=n)
    return self._programs.finish(acc, stats, v)

  def _linear_pass(self, v, data):
    """The pass by its linear map at ``params``, linearized on first use
    (and again after :meth:`with_params`); a non-finite product is taken
    again by the plain pass, whose numbers name the batch."""
    if self._linear is None or self._linear[0] is not self.params:
      hv, f, stats = _linearized(self.params, v, data, pass_fn=self._whole)
      # Read once: every later product of this map reports these numbers.
      stats = sharding_lib.host_value(stats)
      self._linear = self.params, f, stats
      return hv, stats
    _, f, stats = self._linear
    hv, finite = _apply(f, v, shardings=tuple(jax.tree.leaves(self.shardings)))
    if not sharding_lib.host_value(finite):
      return self._whole(self.params, v, data)
    return hv, stats

  def _stream_pass(self, v, where):
    stream = batches_lib.Stream(self._host_batches(), self._batch_sharding)
    bar = tqdm.tqdm(desc="batches", total=self._passes.length, leave=False,
                    disable=not self._show_pbar)
    index = -1
    for index, ((x, y, w), padded) in enumerate(stream):
      if index == 0:  # the first batch is checked (and the layout settled)
        acc, stats = self._programs.start(v, weight_dtype=self._weight_dtype)
      acc, stats = self._programs.batch_step(
          self.params, v, acc, stats, np.int32(index), x, y, w,
          self._loss_rng, padded=padded)
      bar.update(1)
    bar.close()
    if index < 0:
      self._no_batches(where)
    return self._programs.finish(acc, stats, v)

  def matvec(self, v, *, where: str = ""):
    """``H v`` over one full pass of the data; ``v`` shaped like ``template``.

    Args:
      v: a pytree like ``template``, on ``shardings``.
      where: a phrase for messages ("at iteration 3").

    Returns:
      ``H v``, with ``v``'s structure, dtypes and shardings.
    """
    if self._on_device is not False and self._segments is None:
      self._load(where)
    v = sharding_lib.put(v, self.shardings)  # one compile for any placement
    if self._segments is not None:
      hv, stats = self._device_pass(v)
    else:
      hv, stats = self._stream_pass(v, where)
    self.account(sharding_lib.host_value(stats), where)
    return hv

  def matvecs(self, vectors, *, where: str = ""):
    """``H v_i`` for a stack of vectors (a leading axis on every leaf).

    With the data on the devices in one program, all of them are one
    compiled pass (``vmap`` over the vectors: the data is read once and the
    products share it); otherwise one pass each. Each counts as a product.
    """
    count = jax.tree.leaves(vectors)[0].shape[0]
    program = self.pass_program()
    if program is None:
      return jax.tree.map(lambda *a: jnp.stack(a), *[
          self.matvec(jax.tree.map(lambda a, i=i: a[i], vectors),
                      where=f"{where}, vector {i}") for i in range(count)])
    pass_fn, data = program
    self.note_pass_program("matvecs")
    vectors = sharding_lib.put(vectors, sharding_lib.stacked(self.shardings))
    hv, stats = _many(self.params, vectors, data, pass_fn=pass_fn)
    for i, row in enumerate(sharding_lib.host_value(stats)):
      self.account(row, f"{where}, vector {i}")
    return hv

  def batched_pass_bytes(self, count: int) -> int | None:
    """Bytes per device of one batched pass over ``count`` vectors.

    Read from the compiled program's ``memory_analysis()`` (arguments,
    outputs and temporaries, aliased bytes once), compiled once per count;
    nothing runs. None when the data is streamed, where products are one
    pass each.
    """
    program = self.pass_program()
    if program is None:
      return None
    if count in self._pass_bytes:
      return self._pass_bytes[count]
    pass_fn, data = program
    vectors = jax.tree.map(
        lambda t, s: jax.ShapeDtypeStruct((count, *t.shape), t.dtype,
                                          sharding=s),
        self.template, sharding_lib.stacked(self.shardings))
    m = _many.lower(self.params, vectors, data,
                    pass_fn=pass_fn).compile().memory_analysis()
    self._pass_bytes[count] = int(
        m.argument_size_in_bytes + m.output_size_in_bytes +
        m.temp_size_in_bytes - m.alias_size_in_bytes)
    return self._pass_bytes[count]

  def loops_run_fast(self) -> bool:
    """Whether passes in a compiled loop run as fast as one program each.

    A method that runs many products in one ``while_loop`` (see
    :meth:`pass_program`) saves a host round trip per product. Not on
    XLA:CPU for a model with convolutions: it runs loop bodies without its
    fast convolution kernels (11x slower per product on the digits CNN);
    dense layers and attention run as fast there (the small Transformer
    faster), and GPUs and TPUs run loops at full speed. Decided once, from
    the traced pass (nothing lowers or compiles; the trace is the one the
    compiled programs reuse), and False when the data streams.
    """
    program = self.pass_program()
    if program is None:
      return False
    if "fast" not in self._facts:
      fast = self.mesh.devices.flat[0].platform != "cpu"
      if not fast:
        pass_fn, data = program
        v = jax.tree.map(
            lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
            self.template, self.shardings)
        traced = _one.trace(self.params, v, data, pass_fn=pass_fn)
        fast = "conv_general_dilated" not in _primitives(traced.jaxpr.jaxpr)
      self._facts["fast"] = fast
    return self._facts["fast"]

  def remembered(self, key) -> dict:
    """A dict a method keeps under ``key`` across its runs on this operator
    and its :meth:`with_params` copies (a block program's step time)."""
    return self._facts.setdefault(("remembered", key), {})

  def note_pass_program(self, name: str):
    """Records that a compiled program holding the pass has run: ``name``
    is ``'matvec'`` (:meth:`matvec`'s), ``'matvecs'`` (:meth:`matvecs`'s) or
    a method's own loop (see :meth:`pass_programs`)."""
    self._facts.setdefault("pass programs", set()).add(name)

  def pass_programs(self) -> frozenset:
    """The compiled programs holding the pass that have run on this
    operator or a :meth:`with_params` copy.

    Each holds its own copy of the pass, and compiling one costs the pass's
    compile (minutes for a large model on a pod), so a method runs its own
    compiled loop only while no other such program has run
    (``driver.loops_pay``): several methods on one operator then compile
    the pass at most twice, the first method's loop and :meth:`matvec`'s
    program that the others share.
    """
    return frozenset(self._facts.get("pass programs", ()))

  def account(self, stats, where: str = ""):
    """Counts one pass from its ``[count, loss, bad]``; raises if it was bad."""
    count, loss_sum, bad = np.asarray(stats).astype(float)
    if bad >= 0:
      raise ValueError(
          f"Non-finite Hessian-vector product{' ' + where if where else ''} "
          f"at batch {int(bad)}: the loss or its derivatives are NaN or "
          "infinite there.")
    self.num_matvecs += 1
    self.num_examples = int(round(count))
    self.loss_value = loss_sum / count

  def pass_program(self):
    """The pass as a function to call inside ``jit``, or None.

    For data kept on the devices in one program: ``(fn, data)`` with
    ``fn(params, v, data) -> (Hv, [count, loss, bad])``, so that a method
    can run many products in one compiled loop (count each pass with
    :meth:`account`). None when the data streams or needs several programs.
    """
    if self._on_device is not False and self._segments is None:
      self._load("")
    if self._segments is None or self._whole is None:
      return None
    return self._whole, (self._segments[0], self._loss_rng)

  def check_vector(self, v, name: str = "V0"):
    """Validates a user's vector against ``template`` and places it."""
    want = jax.tree.structure(self.template)
    got = jax.tree.structure(v)
    if want != got:
      raise ValueError(f"{name} must have the parameters' tree structure; "
                       f"expected {want}, got {got}.")
    for (path, t), a in zip(jax.tree_util.tree_leaves_with_path(self.template),
                            jax.tree.leaves(v)):
      if np.shape(a) != t.shape or jnp.result_type(a) != t.dtype:
        raise ValueError(
            f"{name} at {subset_lib.path_str(path)!r} must have shape "
            f"{t.shape} and dtype {t.dtype}; got shape {np.shape(a)} and "
            f"dtype {jnp.result_type(a)}.")
    return sharding_lib.put(v, self.shardings)

  def random_vector(self, key, *, kind: str = "normal", normalize=True):
    """A random vector on ``shardings``, generated sharded under ``jit``."""
    return self.random_program(kind=kind, normalize=normalize)(key)

  def random_program(self, *, kind: str = "normal", normalize=True):
    """:meth:`random_vector`'s jitted ``key -> vector``."""
    programs = self.remembered(("random vector", kind, normalize))
    if "make" not in programs:
      programs["make"] = random_vector_fn(self.template, self.shardings,
                                          kind=kind, normalize=normalize)
    return programs["make"]
