r"""Per-device memory of parameters plus power-method vector, by model axis.

On 8 fake CPU devices, the Transformer's parameters and a vector with their
shardings are placed on meshes with model = 1, 2, 4, 8 (data = the rest), and
the bytes each device holds are read from the arrays' addressable shards.

  python -m benchmarks.memory

Writes benchmarks/results/memory.md.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import collections  # pylint: disable=g-import-not-at-top,wrong-import-position

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import models  # pylint: disable=g-import-not-at-top,wrong-import-position


def per_device_bytes(trees):
  held = collections.Counter()
  for leaf in jax.tree.leaves(trees):
    for shard in leaf.addressable_shards:
      held[shard.device.id] += shard.data.nbytes
  return max(held.values())


def main():
  model = models.Transformer(vocab_size=512, max_len=64, d_model=256,
                             num_heads=8, num_layers=4, mlp_dim=1024)
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         jnp.zeros((1, 64), jnp.int32))
  rows = []
  total = None
  for m in (1, 2, 4, 8):
    mesh = deeplanczos.make_mesh([("data", 8 // m), ("model", m)])
    shardings = deeplanczos.infer_sharding(flax.core.meta.unbox(boxed), mesh)
    params = jax.jit(lambda k: flax.core.meta.unbox(model.init(
        k, jnp.zeros((1, 64), jnp.int32))), out_shardings=shardings)(
            jax.random.key(0))
    vector = deeplanczos.InitPowerMethodVector(jax.random.key(1), params)
    assert jax.tree.leaves(vector)[0].sharding == jax.tree.leaves(params)[0].sharding
    if total is None:
      total = sum(a.nbytes for a in jax.tree.leaves((params, vector)))
    held = per_device_bytes((params, vector))
    rows.append([f"data={8 // m}, model={m}", f"{held / 2**20:.2f}",
                 f"{total / 2**20:.2f}", f"{held / total:.3f}",
                 f"{1 / m:.3f}"])
  n = sum(a.size for a in jax.tree.leaves(params))
  header = ["mesh", "per-device MiB", "one-device total MiB",
            "per-device / total", "1 / model"]
  common.write(
      "memory", "Per-device memory: parameters + power-method vector",
      f"Transformer (4 layers, d_model 256, vocab 512), {n:,} float32 "
      "parameters, default sharding rule (leaves under 1024 elements "
      "replicated).\n\n" + common.table(header, rows))


if __name__ == "__main__":
  main()
