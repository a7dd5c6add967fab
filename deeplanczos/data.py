"""Data for Hessian passes: bundled digits, synthetic tokens, grain pipelines.

A Hessian pass needs the same batches every time, and on several hosts each
process needs its own slice of every global batch. :func:`batch_dataset`
builds a deterministic grain ``MapDataset`` whose element ``b`` is this
process's rows of global batch ``b`` (examples ``b*B`` to ``(b+1)*B - 1``),
padded to a fixed size, with a 0/1 ``mask`` for the last, partial batch
(``None`` for full batches), so every process yields the same
number of equally-sized batches and the global batches do not depend on the
number of processes.
"""

import grain
import jax
import numpy as np


def load_digits():
  """scikit-learn's bundled 8x8 digits: ``x`` (1797, 8, 8, 1) in [0, 1], ``y``."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  return x, digits.target.astype(np.int32)


def synthetic_tokens(num_sequences: int, seq_len: int, vocab_size: int,
                     seed: int = 0):
  """Sequences ``t_{i+1} = (t_i + s) mod V`` with a per-sequence stride ``s``.

  Returns ``(inputs, targets)``: tokens ``[:, :-1]`` and ``[:, 1:]``. The
  stride is read off the first two tokens, so a model must attend to learn it.
  """
  rng = np.random.default_rng(seed)
  start = rng.integers(0, vocab_size, size=(num_sequences, 1))
  stride = rng.integers(1, 4, size=(num_sequences, 1))
  tokens = (start + stride * np.arange(seq_len + 1)) % vocab_size
  return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)


class _LocalBatch:
  """Global batch ``b`` -> this process's padded slice of it, with a mask."""

  def __init__(self, x, y, global_batch_size, process_index, process_count):
    self.x, self.y = x, y
    self.size = global_batch_size // process_count
    self.offset = process_index * self.size
    self.global_batch_size = global_batch_size

  def __call__(self, b):
    n = len(self.y)
    start = b * self.global_batch_size + self.offset
    rows = np.arange(start, start + self.size)
    real = rows < min(n, (b + 1) * self.global_batch_size)
    rows = np.where(real, rows, 0)
    # Every process knows whether global batch b is full, so all of them
    # agree on whether a mask (and so the masked HVP program) is needed.
    full = (b + 1) * self.global_batch_size <= n
    return {"x": self.x[rows], "y": self.y[rows],
            "mask": None if full else real.astype(np.float32)}


def batch_dataset(x, y, global_batch_size: int, *, process_index=None,
                  process_count=None) -> grain.MapDataset:
  """A deterministic grain pipeline of this process's slices of global batches.

  Args:
    x: inputs, leading dimension = examples (the same arrays on every host).
    y: targets, same leading dimension.
    global_batch_size: examples per global batch; divisible by the process
      count. The last batch is padded and masked, never dropped.
    process_index: this process (default ``jax.process_index()``).
    process_count: the number of processes (default ``jax.process_count()``).

  Returns:
    A ``grain.MapDataset`` of ``{'x', 'y', 'mask'}`` dicts; pass it as
    ``batch_iterable`` with :func:`parse_batch` as the parser.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if len(x) != len(y):
    raise ValueError(f"x and y must have as many examples; got {len(x)} and "
                     f"{len(y)}.")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"The global batch size must be a positive multiple of the process "
        f"count {process_count}; got {global_batch_size}.")
  if len(y) == 0:
    raise ValueError("The dataset has no examples.")
  num_batches = -(-len(y) // global_batch_size)
  local = _LocalBatch(x, y, global_batch_size, process_index, process_count)
  return grain.MapDataset.range(num_batches).map(local)


def parse_batch(batch):
  """The parser for :func:`batch_dataset`'s elements: ``(x, y, mask)``."""
  return batch["x"], batch["y"], batch["mask"]
