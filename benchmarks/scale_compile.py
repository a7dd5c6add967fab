r"""Llama-shaped 1B, 7B and 70B on TPU pods, measured by the TPU compiler.

Compiles (never runs) on this machine, for real TPU topologies, per chip:

- the library's pass: ``deeplanczos.plan``'s program, the one a
  ``HessianOperator`` runs for each streamed batch;
- the Lanczos state at ncv=20 (a 21-vector Krylov basis split over every
  chip, plus v and Hv), from the shardings' exact shard shapes;
- a plain ``jax.jit`` HVP, ``jvp(grad(loss))`` with the same shardings;
- the training gradient step (gradient and SGD update, parameters donated).

bf16 parameters and vectors, nn.scan + nn.remat over layers, 2048-token
sequences, one sequence per data row of the mesh, every parameter split over
all chips (the Transformer's tensor-parallel metadata on the model axis,
FSDP over the data axis for the rest), block inputs constrained to
P('data'). Columns: GiB per chip (arguments + outputs + temporaries, less
donated), all-gathers, all-reduces and reduce-scatters inside / outside the
compiled loops (the TPU compiler writes a reduce-scatter as an all-reduce and
a slice), flops per chip, and the roofline seconds of one Hessian-vector
product over 2^20 tokens (max of flops over the bf16 peak and bytes accessed
over HBM bandwidth, per batch, times the batches).

Needs the libtpu wheel matching jax (``pip install "jax[tpu]"``; no TPU is
used). Compiles take minutes each on 2 cores.

  python -m benchmarks.scale_compile [--only 7B]

Writes benchmarks/results/scale_compile.md.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos._src import plan as plan_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

LENGTH, TOKENS = 2048, 2**20
MODELS = {
    "1B": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8,
               mlp_dim=8192),
    "7B": dict(d_model=4096, num_layers=32, num_heads=32, mlp_dim=11008),
    "70B": dict(d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                mlp_dim=28672),
}
# (model, topology, data x model)
ROWS = [("1B", "v5e:8x8", (16, 4)), ("1B", "v5e:16x16", (32, 8)),
        ("7B", "v5e:8x8", (16, 4)), ("7B", "v5e:16x16", (32, 8)),
        ("70B", "v5p:4x8x8", (32, 8))]


def setup(name, topology, shape):
  mesh = deeplanczos.topology_mesh(topology, [("data", shape[0]),
                                              ("model", shape[1])])
  rows = NamedSharding(mesh, P("data"))
  model = models.Transformer(
      vocab_size=32000, max_len=LENGTH, scan_layers=True, remat=True,
      head_kernels=True, dtype=jnp.bfloat16, activation_sharding=rows,
      **MODELS[name])
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         jax.ShapeDtypeStruct((1, LENGTH), jnp.int32))
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                        flax.core.meta.unbox(boxed))
  shardings = deeplanczos.split_over_all_devices(
      shapes, deeplanczos.sharding_from_metadata(boxed, mesh))
  params = jax.tree.map(
      lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes,
      shardings)
  tokens = jax.ShapeDtypeStruct((shape[0], LENGTH), jnp.int32, sharding=rows)

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, x).astype(jnp.float32), y).mean()

  return mesh, loss, params, shardings, tokens


def row_of(name, cost, chip, batches):
  counts = cost.collectives
  seconds = batches * max(cost.flops / chip.flops,
                          cost.bytes_accessed / chip.bandwidth)
  return (name, f"{cost.bytes / 2**30:.2f}",
          "{}/{}".format(*counts["all-gather"]),
          "{}/{}".format(*counts["all-reduce"]),
          "{}/{}".format(*counts["reduce-scatter"]),
          f"{cost.flops / 1e12:.2f}", f"{seconds:.2f}")


def measure(name, topology, shape):
  mesh, loss, params, shardings, tokens = setup(name, topology, shape)
  chip = plan_lib.CHIPS[mesh.devices.flat[0].device_kind]
  batches = TOKENS // (shape[0] * LENGTH)
  n = sum(a.size for a in jax.tree.leaves(params))
  head = f"{name} ({n / 1e9:.2f}B) on {topology} ({shape[0]}x{shape[1]})"
  print(head, flush=True)
  out = []
  t = time.perf_counter()
  planned = deeplanczos.plan(loss, params, (tokens, tokens), mesh=mesh,
                             shardings=shardings, num_batches=batches,
                             method="lanczos", ncv=20)
  out.append(row_of("library pass", planned.programs[0], chip, batches))
  states = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    vectors = plan_lib.method_state("lanczos", params, shardings, ncv=20,
                                    num_probes=1, basis_dtype=dtype)
    states[dtype] = sum(vectors.values())
    out.append((f"+ Lanczos state, ncv=20, {jnp.dtype(dtype).name} basis",
                f"{(planned.programs[0].bytes + states[dtype]) / 2**30:.2f}",
                "", "", "", "", ""))
  print(f"  library {time.perf_counter() - t:.0f}s", flush=True)

  def plain(p, v, x, y):
    return jax.jvp(jax.grad(lambda q: loss(q, x, y)), (p,), (v,))[1]

  def train(p, x, y):
    g = jax.grad(lambda q: loss(q, x, y))(p)
    return jax.tree.map(lambda a, b: a - 1e-3 * b.astype(a.dtype), p, g)

  for label, fn, args, donate in (
      ("plain jit HVP", plain, (params, params, tokens, tokens), ()),
      ("training gradient step", train, (params, tokens, tokens), (0,))):
    t = time.perf_counter()
    compiled = jax.jit(fn, out_shardings=shardings,
                       donate_argnums=donate).lower(*args).compile()
    out.append(row_of(label, plan_lib.program_cost(label, compiled), chip,
                      batches))
    print(f"  {label} {time.perf_counter() - t:.0f}s", flush=True)
  lib, plain_bytes, grad = (float(out[i][1]) for i in (0, 3, 4))
  fits = []
  for dtype, state in states.items():
    # The pass's arguments already hold the parameters and v; add the basis
    # and Hv that the method keeps besides.
    peak = planned.programs[0].bytes + state
    fits.append(f"{jnp.dtype(dtype).name} basis "
                f"{peak / 2**30:.2f} GiB of {chip.memory / 2**30:.0f} "
                f"(margin {(chip.memory - peak) / 2**30:.2f} GiB)")
  return head, out, (f"library / plain {lib / plain_bytes:.2f}x, library / "
                     f"gradient step {lib / grad:.2f}x; pass + Lanczos "
                     f"state per chip: " + ", ".join(fits))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", default="", help="one model: 1B, 7B or 70B")
  args = parser.parse_args()
  lines = []
  for name, topology, shape in ROWS:
    if args.only and name != args.only:
      continue
    head, rows, summary = measure(name, topology, shape)
    lines += [f"**{head}**: {summary}.", "",
              "| program | GiB per chip | all-gathers in/out of loops | "
              "all-reduces in/out | reduce-scatters in/out | TFLOP per chip | "
              "roofline s per HVP over 2^20 tokens |",
              "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
  text = "\n".join(lines)
  print(text)
  common.write("scale_compile" + (f"_{args.only}" if args.only else ""),
               "Pod scale by the TPU compiler (jax " + jax.__version__ + ")",
               __doc__.split("\n\n")[1] + "\n\n" + text)


if __name__ == "__main__":
  main()
