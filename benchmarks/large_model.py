r"""A large model on 8 fake devices: top-3 Lanczos eigenpairs with FSDP.

A decoder-only Transformer of about 63M parameters (8 layers, d_model 768,
12 heads, MLP 3072, vocabulary 8192), generated in code at its random
initialization, on synthetic token sequences. Parameters, vectors and the
Krylov basis are split over all 8 fake CPU devices (mesh data=4, model=2;
the model axis from the Transformer's partitioning metadata, FSDP over the
data axis by `infer_sharding(..., fsdp_axis='data')` for the rest). Reports
seconds per HVP, per-device bytes, and the peak host memory of the process
(all 8 fake devices live in it). On an accelerator, the same on its
devices (one GPU: a mesh of one).

  python -m benchmarks.large_model

Writes benchmarks/results/large_model.md.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import resource  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import models  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB, LENGTH, SEQUENCES, BATCH = 8192, 32, 16, 8


def main():
  model = models.Transformer(vocab_size=VOCAB, max_len=LENGTH, d_model=768,
                             num_heads=12, num_layers=8, mlp_dim=3072)
  count = jax.device_count()  # 8 fake CPU devices, or an accelerator's
  model_axis = 2 if count % 2 == 0 else 1
  mesh = deeplanczos.make_mesh([("data", count // model_axis),
                                ("model", model_axis)])
  tokens = jnp.zeros((1, LENGTH), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
  # The Transformer's tensor-parallel layout from its partitioning metadata,
  # then every leaf also split over the axes it leaves unused (FSDP).
  shapes = flax.core.meta.unbox(boxed)
  shardings = deeplanczos.split_over_all_devices(
      shapes, deeplanczos.sharding_from_metadata(boxed, mesh))
  params = jax.jit(lambda k: flax.core.meta.unbox(model.init(k, tokens)),
                   out_shardings=shardings)(jax.random.key(0))
  n = sum(a.size for a in jax.tree.leaves(params))
  x, y = data.synthetic_tokens(SEQUENCES, LENGTH, VOCAB)
  batches = [(x[i:i + BATCH], y[i:i + BATCH])
             for i in range(0, SEQUENCES, BATCH)]

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean()

  op = deeplanczos.HessianOperator(loss, params, batches)
  v = op.random_vector(jax.random.key(1))
  start = time.perf_counter()
  jax.block_until_ready(op.matvec(v))
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(op.matvec(v))
  per_hvp = (time.perf_counter() - start) / 3
  start = time.perf_counter()
  r = deeplanczos.lanczos(op, 3, ncv=12, tol=1e-3, max_hvps=90,
                          show_pbar=False)
  lanczos_s = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
  split = sum(a.size for a in jax.tree.leaves(params)
              if len(a.sharding.device_set) == count and
              a.addressable_shards[0].data.size * count == a.size)
  rows = [
      ["parameters", f"{n:,} ({n * 4 / 2**30:.2f} GiB in float32)"],
      ["mesh", f"data={count // model_axis} (FSDP), model={model_axis} "
               "(tensor parallel)"],
      [f"parameters split {count} ways", f"{split / n:.4f} of them"],
      ["per-device parameters + one vector",
       f"{common.per_device_bytes((params, v)) / 2**20:.0f} MiB of "
       f"{2 * n * 4 / 2**20:.0f} MiB"],
      ["data", f"{SEQUENCES} sequences of {LENGTH} tokens, global batches of "
               f"{BATCH} ({SEQUENCES * LENGTH} tokens a pass)"],
      ["first HVP (compile + run)", f"{first:.1f} s"],
      ["seconds per HVP (full pass)", f"{per_hvp:.3g} s"],
      ["Lanczos top-3 (ncv=12, tol 1e-3, at most 90 HVPs)",
       f"{r.num_hvps} HVPs in {lanczos_s:.0f} s; eigenvalues "
       f"{', '.join(f'{e:.4g}' for e in r.eigenvalues)}; relative residuals "
       f"{', '.join(f'{e:.1e}' for e in r.residuals / abs(r.eigenvalues))}"
       f"; converged: {r.converged}"],
      ["peak host memory (whole process)", f"{peak:.1f} GiB"],
  ]
  where = ("8 fake devices" if jax.default_backend() == "cpu" else
           f"{count} {jax.devices()[0].device_kind}")
  common.write("large_model", f"A 63M-parameter Transformer on {where}",
               common.table(["", ""], rows))


if __name__ == "__main__":
  main()
