"""Batches for Hessian passes: fresh passes, parsing, padding, placement.

A pass reads ``batch_iterable`` once. Each batch is parsed into ``(x, y)`` or
``(x, y, mask)``, padded to a multiple of this process's share of the data
axis, given 0/1 example weights ``w`` (the padding and masked-out examples
weigh 0) and placed split over the data axis. Either every pass streams
through the host (:class:`Stream`, with the next batch placed while the
current one computes), or the whole pass is read once and kept on the devices
(:func:`stack`): consecutive batches of one shape are stacked along a leading
axis, so a pass is one ``lax.scan`` per run of equal batches.
"""

from collections.abc import Iterable, Iterator
import concurrent.futures
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from deeplanczos._src import sharding as sharding_lib


def _describe(x) -> str:
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of {len(x)} items"
  return f"a {type(x).__name__}"


class Passes:
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


def parse(batch, parser):
  """``batch -> (x, y, mask, n)``; ``mask`` is None when all examples count."""
  parsed = batch if parser is None else parser(batch)
  if not isinstance(parsed, (tuple, list)) or len(parsed) not in (2, 3):
    hint = ("" if parser is not None else
            " Without batch_parser each batch must itself be (x, y); for "
            "other layouts pass e.g. batch_parser=lambda b: (b['imgs'], "
            "b['labels']).")
    raise TypeError("batch_parser must return (x, y) or (x, y, mask); got "
                    f"{_describe(parsed)}.{hint}")
  x, y = parsed[0], parsed[1]
  mask = parsed[2] if len(parsed) == 3 else None
  dims = {int(np.shape(l)[0]) if np.ndim(l) else None
          for l in jax.tree.leaves((x, y))}
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


def _dtype(a):
  return np.dtype(a.dtype) if hasattr(a, "dtype") else np.result_type(a)


def shapes(tree) -> str:
  """``tree``'s shapes and dtypes, for messages."""
  leaves = jax.tree.leaves(tree)
  text = [f"{np.shape(l)} {_dtype(l)}" for l in leaves]
  return text[0] if len(text) == 1 else "[" + ", ".join(text) + "]"


def check_features(x, y, index, first):
  """Refuses a batch whose per-example shapes differ from batch 0's.

  Returns:
    The per-example shapes of batch 0, ``(x, y)`` as strings.
  """
  per_example = tuple(str(jax.tree.map(lambda a: np.shape(a)[1:], t))
                      for t in (x, y))
  if first is not None and per_example != first:
    name = "x" if per_example[0] != first[0] else "y"
    raise ValueError(
        f"Batch {index} has {name} of per-example shape "
        f"{per_example[name == 'y']} where batch 0 has {first[name == 'y']}: "
        "every batch must have the same feature shapes (only the number of "
        "examples may differ).")
  return per_example if first is None else first


class HostBatch(NamedTuple):
  """One batch as this process holds it, padded, with example weights.

  ``padded`` picks the per-example (masked) program. It is decided from facts
  every process shares (a mask given, the padded size), never from the
  mask's values, so that all processes run the same collectives.
  """
  x: Any
  y: Any
  w: np.ndarray
  padded: bool


def to_host_batch(x, y, mask, n, *, local_data: int, weight_dtype):
  """Pads ``n`` examples to a multiple of ``local_data`` and weighs them."""
  padded_n = -(-n // local_data) * local_data
  w = np.zeros(padded_n, weight_dtype)
  w[:n] = 1 if mask is None else mask

  def pad(a):
    if padded_n == n:
      return a
    widths = [(0, padded_n - n)] + [(0, 0)] * (np.ndim(a) - 1)
    return np.pad(np.asarray(a), widths)

  x, y = jax.tree.map(pad, (x, y))
  return HostBatch(x, y, w, padded_n != n or mask is not None)


def signature(batch: HostBatch):
  """What must agree for batches to share one compiled program."""
  return (str(jax.tree.map(lambda a: (np.shape(a), _dtype(a)),
                           (batch.x, batch.y))), batch.padded)


class Segment(NamedTuple):
  """A run of consecutive equal-shaped batches, stacked on a leading axis.

  ``x``, ``y``, ``w`` have a leading axis of the run's length and are split
  over the data axis on their second; ``index`` holds the global batch
  indices (for the dropout keys).
  """
  x: Any
  y: Any
  w: jax.Array
  index: jax.Array


def place(batch: HostBatch, sharding: NamedSharding):
  """``(x, y, w)`` on the devices, each split over the data axis."""
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, a),
      (batch.x, batch.y, batch.w))


def stack(batches: list[HostBatch], mesh: Mesh, data_axis: str, *,
          max_length: int):
  """Stacks runs of equal batches, at most ``max_length`` each, and places them.

  Returns:
    ``(segments, padded)``: a tuple of :class:`Segment` and, for each, whether
    it needs the per-example program.
  """
  sharding = NamedSharding(mesh, P(None, data_axis))
  replicated = sharding_lib.replicated(mesh)
  segments, flags, start = [], [], 0
  while start < len(batches):
    key = signature(batches[start])
    end = start + 1
    while (end < len(batches) and end - start < max_length
           and signature(batches[end]) == key):
      end += 1
    run = batches[start:end]
    x, y, w = jax.tree.map(lambda *a: np.stack(a), *[(b.x, b.y, b.w)
                                                     for b in run])
    x, y, w = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, a),
        (x, y, w))
    index = jax.device_put(np.arange(start, end, dtype=np.int32), replicated)
    segments.append(Segment(x, y, w, index))
    flags.append(run[0].padded)
    start = end
  return tuple(segments), tuple(flags)


def nbytes(batch: HostBatch) -> int:
  return sum(np.asarray(a).nbytes for a in jax.tree.leaves(batch))


class Stream:
  """A pass of placed batches, each placed while the one before computes.

  A worker thread parses, pads and transfers batch ``b + 1`` (device
  transfers release the GIL) while the caller dispatches batch ``b``.
  """

  def __init__(self, host_batches: Iterator[HostBatch], sharding):
    self._batches = host_batches
    self._sharding = sharding
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

  def _next(self):
    batch = next(self._batches, None)
    return None if batch is None else (place(batch, self._sharding),
                                       batch.padded)

  def __iter__(self):
    try:
      ahead = self._pool.submit(self._next)
      while (item := ahead.result()) is not None:
        ahead = self._pool.submit(self._next)
        yield item
    finally:
      self._pool.shutdown(wait=True)
