"""The Hessian of a dataset loss as a matrix-free, sharded linear operator.

``H v = sum_b n_b H_b v / sum_b n_b``: the Hessian of the loss averaged over
every example of ``batch_iterable``, applied to ``v`` by forward-over-reverse
differentiation (``jax.jvp`` of ``jax.grad``), one batch at a time. Each batch
is split over the mesh's data axis; every device differentiates the loss of
its own examples, and an explicit ``psum`` over the data axis sums the
contributions of all devices and hosts. The model axis is left to the
compiler, so parameters and vectors stay sharded as the parameters are.
"""

from collections.abc import Callable, Iterable, Iterator
import re

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import tqdm.auto as tqdm

from deeplanczos._src import sharding as sharding_lib
from deeplanczos._src import tree_math


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


def select_subset(params, subset: str | Callable[[str], bool] | None):
  """The parameters an operator acts on: a pytree with ``None`` elsewhere.

  Args:
    params: the full parameter pytree.
    subset: ``None`` for all parameters; a regular expression searched in each
      leaf's path (``'params/Dense_0/kernel'``); or a predicate on that path.

  Returns:
    ``params`` with every leaf outside the subset replaced by ``None`` (an
    empty pytree node), so the result is itself a valid, smaller pytree.
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


def take_subset(template, tree):
  """The leaves of ``tree`` where ``template`` (from select_subset) has one."""
  return jax.tree.map(lambda t, x: None if t is None else x, template, tree,
                      is_leaf=lambda t: t is None)


def merge_subset(params, sub):
  """``params`` with the leaves that ``sub`` holds replaced by ``sub``'s."""
  return jax.tree.map(lambda full, s: full if s is None else s, params, sub,
                      is_leaf=lambda x: x is None)


def _describe(x) -> str:
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of {len(x)} items"
  return f"a {type(x).__name__}"


def _leading_dims(tree):
  return {int(np.shape(l)[0]) if np.ndim(l) else None
          for l in jax.tree.leaves(tree)}


class _Passes:
  """Fresh passes over a re-iterable, or over a callable's new iterators."""

  def __init__(self, batch_iterable):
    if isinstance(batch_iterable, Iterable):
      if isinstance(batch_iterable, Iterator):
        raise TypeError(
            "batch_iterable is a one-shot iterator (a generator or iter(...)), "
            "but every Hessian-vector product needs a fresh pass over the "
            "data. Pass a re-iterable (a list, a grain MapDataset or "
            "DataLoader, any object whose __iter__ starts a new pass) or a "
            "zero-argument callable returning a new iterator.")
      self._new = lambda: iter(batch_iterable)
    elif callable(batch_iterable):
      self._new = lambda: iter(batch_iterable())
    else:
      raise TypeError("batch_iterable must be a re-iterable of batches or a "
                      "zero-argument callable returning an iterator; got "
                      f"{type(batch_iterable).__name__}.")
    try:
      self.length = len(batch_iterable)
    except TypeError:
      self.length = None

  def __call__(self):
    return self._new()


class HessianOperator:
  """``v -> H v`` for the Hessian of a loss averaged over a whole dataset.

  Vectors are pytrees with the structure, shapes, dtypes and shardings of the
  parameters (of the selected ``subset``). One application is one full pass
  over ``batch_iterable``. The per-batch step is compiled once per batch
  shape and reused; the running sum stays on device in donated buffers, and
  the host reads three scalars per pass (example count, loss, first
  non-finite batch).

  With ``loss_rng`` (a PRNG key), the loss is called as
  ``loss(params, x, y, rng)`` with ``rng`` derived from ``loss_rng`` by
  ``fold_in`` of the batch index and of the device's data-axis index (and of
  the example's index in a masked batch): dropout masks are then the same on
  every pass, so every product applies the same ``H``.

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
               loss_rng=None):
    if not callable(loss):
      raise TypeError(f"loss must be callable, got {type(loss).__name__}.")
    if batch_parser is not None and not callable(batch_parser):
      raise TypeError("batch_parser must be callable, got "
                      f"{type(batch_parser).__name__}.")
    self.mesh, self.params, full_shardings = sharding_lib.resolve_shardings(
        params, mesh=mesh, shardings=shardings, shardings_rule=shardings_rule)
    if data_axis not in self.mesh.axis_names:
      raise ValueError(f"The mesh has axes {self.mesh.axis_names}, but the "
                       f"data axis is {data_axis!r}.")
    self.template = select_subset(self.params, subset)
    self.shardings = take_subset(self.template, full_shardings)
    self._full_shardings = full_shardings
    self._loss = loss
    self._loss_rng = loss_rng
    self._parser = batch_parser
    self._data_axis = data_axis
    self._passes = _Passes(batch_iterable)
    self._show_pbar = show_pbar
    self._local_data = sharding_lib.local_data_size(self.mesh, data_axis)
    self._batch_sharding = NamedSharding(self.mesh, P(data_axis))
    self._replicated = sharding_lib.replicated(self.mesh)
    self._checked = set()
    self._random = {}
    self.num_matvecs = 0
    self.num_examples = None
    self.loss_value = None
    self._acc_dtype = tree_math.accumulation_dtype(
        jnp.result_type(*jax.tree.leaves(self.template)))
    acc_dtypes = jax.tree.map(
        lambda t: tree_math.accumulation_dtype(t.dtype), self.template)
    self._zeros = jax.jit(
        lambda: jax.tree.map(lambda t, d: jnp.zeros(t.shape, d),
                             self.template, acc_dtypes),
        out_shardings=self.shardings)
    self._finalize = jax.jit(
        lambda acc, stats: jax.tree.map(
            lambda a, t: (a / stats[0]).astype(t.dtype), acc, self.template),
        out_shardings=self.shardings)
    self._steps = {
        padded: self._build_step(padded) for padded in (False, True)}

  def _build_step(self, padded: bool):
    loss, data_axis = self._loss, self._data_axis

    loss_rng = self._loss_rng

    def call(p, x, y, rng):
      return loss(p, x, y) if loss_rng is None else loss(p, x, y, rng)

    def local(params, v, x, y, w, index):
      acc_dtype = w.dtype
      rng = None
      if loss_rng is not None:
        rng = jax.random.fold_in(jax.random.fold_in(loss_rng, index),
                                 lax.axis_index(data_axis))

      def objective(sub):
        p = merge_subset(params, sub)
        if padded:
          one = lambda a: a[None]
          n = w.shape[0]
          keys = (jnp.zeros(n) if rng is None else
                  jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n)))
          per_example = jax.vmap(
              lambda xi, yi, ki: call(p, jax.tree.map(one, xi),
                                      jax.tree.map(one, yi), ki))(x, y, keys)
          return jnp.sum(w * per_example.astype(acc_dtype))
        n = jax.tree.leaves(x)[0].shape[0]
        return n * call(p, x, y, rng).astype(acc_dtype)

      # Parameters and v enter replicated over the data axis; marked
      # device-varying, their derivatives are this device's examples' alone
      # (no implicit reduction), and the psum below is the only one.
      sub, v = lax.pcast((take_subset(self.template, params), v), data_axis,
                         to="varying")
      (value, _), (_, hv) = jax.jvp(jax.value_and_grad(objective), (sub,),
                                     (v,))
      return (lax.psum(hv, data_axis), lax.psum(value, data_axis),
              lax.psum(jnp.sum(w), data_axis))

    batched = P(data_axis)
    per_device = jax.shard_map(
        local, mesh=self.mesh,
        in_specs=(P(), P(), batched, batched, batched, P()),
        out_specs=(P(), P(), P()), axis_names={data_axis})

    def step(params, v, acc, stats, index, x, y, w):
      hv, value, count = per_device(params, v, x, y, w, index)
      finite = jnp.isfinite(value)
      for leaf in jax.tree.leaves(hv):
        finite &= jnp.all(jnp.isfinite(leaf))
      acc = jax.tree.map(lambda a, h: a + h.astype(a.dtype), acc, hv)
      bad = jnp.where((stats[2] < 0) & ~finite, index, stats[2])
      stats = jnp.stack([stats[0] + count, stats[1] + value, bad])
      return acc, stats

    rep, bs = self._replicated, self._batch_sharding
    return jax.jit(
        step,
        in_shardings=(self._full_shardings, self.shardings, self.shardings,
                      rep, rep, bs, bs, bs),
        out_shardings=(self.shardings, rep),
        donate_argnums=(2, 3))

  def _parse(self, batch):
    parsed = batch if self._parser is None else self._parser(batch)
    if not isinstance(parsed, (tuple, list)) or len(parsed) not in (2, 3):
      hint = ("" if self._parser is not None else
              " Without batch_parser each batch must itself be (x, y); for "
              "other layouts pass e.g. batch_parser=lambda b: (b['imgs'], "
              "b['labels']).")
      raise TypeError("batch_parser must return (x, y) or (x, y, mask); got "
                      f"{_describe(parsed)}.{hint}")
    x, y = parsed[0], parsed[1]
    mask = parsed[2] if len(parsed) == 3 else None  # None: all examples real
    dims = _leading_dims((x, y))
    if len(dims) != 1 or None in dims:
      raise ValueError("Every array of x and y must share one leading batch "
                       f"dimension; got leading dimensions {sorted(dims, key=str)}.")
    n = dims.pop()
    if n == 0:
      raise ValueError("A batch with no examples came in.")
    if mask is not None:
      mask = np.asarray(mask)
      if mask.shape != (n,):
        raise ValueError(f"The mask must have shape ({n},), one entry per "
                         f"example; got shape {mask.shape}.")
    return x, y, mask, n

  def _check_loss(self, x, y, n):
    key = jax.tree.map(lambda a: (np.shape(a), np.result_type(a)), (x, y))
    key = str(key)
    if key in self._checked:
      return
    args = () if self._loss_rng is None else (self._loss_rng,)
    out = jax.eval_shape(self._loss, self.params, x, y, *args)
    if not (hasattr(out, "shape") and out.shape == ()
            and jnp.issubdtype(out.dtype, jnp.floating)):
      got = getattr(out, "shape", type(out).__name__)
      raise ValueError("loss(params, x, y) must return a floating scalar (the "
                       f"mean loss of the batch); for a batch of {n} examples "
                       f"it returned {got} {getattr(out, 'dtype', '')}.")
    self._checked.add(key)

  def _place(self, batch):
    x, y, mask, n = self._parse(batch)
    self._check_loss(x, y, n)
    padded_n = -(-n // self._local_data) * self._local_data
    w = np.zeros(padded_n, self._acc_dtype)
    w[:n] = 1 if mask is None else mask
    # The masked program is chosen from facts every process shares (a mask
    # given, the padded size), never from the mask's values, so that all
    # processes run the same collectives.
    padded = padded_n != n or mask is not None

    def pad(a):
      if padded_n != n:
        widths = [(0, padded_n - n)] + [(0, 0)] * (np.ndim(a) - 1)
        a = jnp.pad(a, widths) if isinstance(a, jax.Array) else np.pad(a, widths)
      return a

    x, y = jax.tree.map(pad, (x, y))
    x, y, w = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(
            self._batch_sharding, a), (x, y, w))
    return x, y, w, padded

  def matvec(self, v, *, where: str = ""):
    """``H v`` over one full pass of the data; ``v`` shaped like ``template``.

    Args:
      v: a pytree like ``template``, on ``shardings``.
      where: a phrase for messages ("at iteration 3").

    Returns:
      ``H v``, with ``v``'s structure, dtypes and shardings.
    """
    acc = self._zeros()
    stats = jax.device_put(np.array([0.0, 0.0, -1.0], self._acc_dtype),
                           self._replicated)
    batches = tqdm.tqdm(self._passes(), total=self._passes.length,
                        desc="batches", leave=False,
                        disable=not self._show_pbar)
    num_batches = 0
    for index, batch in enumerate(batches):
      x, y, w, padded = self._place(batch)
      acc, stats = self._steps[padded](self.params, v, acc, stats, index, x,
                                       y, w)
      num_batches += 1
    if num_batches == 0:
      when = ("The data" if self.num_matvecs == 0 else
              f"Pass {self.num_matvecs + 1} over the data")
      raise ValueError(
          f"{when} gave no batches{' ' + where if where else ''}. "
          "batch_iterable must yield at least one batch on every pass; a "
          "one-shot iterator is empty on its second pass.")
    count, loss_sum, bad = sharding_lib.host_value(stats).astype(float)
    if bad >= 0:
      raise ValueError(
          f"Non-finite Hessian-vector product{' ' + where if where else ''} "
          f"at batch {int(bad)}: the loss or its derivatives are NaN or "
          "infinite there.")
    self.num_matvecs += 1
    self.num_examples = int(round(count))
    self.loss_value = loss_sum / count
    return self._finalize(acc, stats)

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
            f"{name} at {path_str(path)!r} must have shape {t.shape} and dtype "
            f"{t.dtype}; got shape {np.shape(a)} and dtype "
            f"{jnp.result_type(a)}.")
    return sharding_lib.put(v, self.shardings)

  def random_vector(self, key, *, kind: str = "normal", normalize=True):
    """A random vector on ``shardings``, generated sharded under ``jit``."""
    if (kind, normalize) not in self._random:
      self._random[kind, normalize] = random_vector_fn(
          self.template, self.shardings, kind=kind, normalize=normalize)
    return self._random[kind, normalize](key)


def random_vector_fn(template, shardings, *, kind="normal", normalize=True):
  """A jitted ``key -> vector``: random pytrees like ``template``.

  The vector is generated directly on ``shardings`` (``out_shardings``), so
  no full copy exists on any one device.

  Args:
    template: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
    shardings: the output shardings, a pytree like ``template``.
    kind: ``'normal'`` or ``'rademacher'`` (random signs).
    normalize: scale to unit norm over the whole tree.
  """
  if kind not in ("normal", "rademacher"):
    raise ValueError(f"kind must be 'normal' or 'rademacher', got {kind!r}.")
  shapes = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype),
                        template)
  sampler = (jax.random.rademacher if kind == "rademacher"
             else jax.random.normal)

  def make(key):
    v = tree_math.tree_random(key, shapes, sampler)
    if normalize:
      v = tree_math.tree_scale(v, 1.0 / tree_math.tree_norm(v))
    return v

  return jax.jit(make, out_shardings=shardings)
