r"""The Krylov basis's own products on a TPU chip, read from the TPU compiler.

Compiles (never runs) on this machine, for one v5e chip of a "v5e:2x2"
topology: a Lanczos basis of m + 1 float32 vectors of 2^20 parameters
(m = 20, the top 5's default ncv, and m = 40, the top 20's), the
reorthogonalization of one vector against it (two classical Gram-Schmidt
sweeps and the norm, ``basis.orthogonalize``), the thick restart's rotation
of the basis by a square matrix (``basis.rotate``) and the k Ritz vectors
(``basis.combine``). Each as the library compiles it (every product at
``Precision.HIGHEST``) and with JAX's default precision, which the library
used before: the compiler's estimated cycles (the sum of its kernels'
``estimated_cycles``), flops and bytes accessed, and the precision on the
matrix products of the optimized program. At the default the TPU compiler
takes a float32 product in one bfloat16 pass (8 significant bits).

Needs the libtpu wheel matching jax (``pip install "jax[tpu]"``; no TPU is
used).

  python -m benchmarks.tpu_basis

Writes benchmarks/results/tpu_basis.md.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos._src import basis as basis_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

N = 2**20


def _default_orthogonalize(basis, v, count):
  """``basis.orthogonalize`` at JAX's default precision."""
  mask = jnp.arange(basis.shape[0]) < count
  c1 = jnp.where(mask, jnp.tensordot(basis, v, axes=1), 0)
  v = v - jnp.tensordot(c1, basis, axes=1)
  c2 = jnp.where(mask, jnp.tensordot(basis, v, axes=1), 0)
  v = v - jnp.tensordot(c2, basis, axes=1)
  return v, c1 + c2, jnp.sqrt(jnp.vdot(v, v))


def _default_combination(basis, y):
  """``basis.rotate`` and ``basis.combine`` at JAX's default precision."""
  return jnp.tensordot(y.T, basis, axes=1)


def read(compiled):
  """``(estimated cycles, flops, bytes accessed, precisions)``."""
  text = compiled.as_text()
  cycles = sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"',
                                          text))
  products = [l for l in text.splitlines()
              if re.search(r" (convolution|dot)\(", l)]
  precisions = sorted({(re.search(r"operand_precision=\{(\w+)", l) or
                        [None, "default"])[1] for l in products}) or [
                            "none (multiply and reduce)"]
  cost = compiled.cost_analysis()
  return cycles, cost.get("flops", 0), cost.get("bytes accessed", 0), \
      precisions


def main():
  mesh = deeplanczos.topology_mesh("v5e:2x2", [("data", 4)])
  chip = NamedSharding(mesh, P())
  rows = []
  for m, k in ((20, 5), (40, 20)):
    basis = jax.ShapeDtypeStruct((m + 1, N), jnp.float32, sharding=chip)
    v = jax.ShapeDtypeStruct((N,), jnp.float32, sharding=chip)
    square = jax.ShapeDtypeStruct((m + 1, m + 1), jnp.float32, sharding=chip)
    ritz = jax.ShapeDtypeStruct((m + 1, k), jnp.float32, sharding=chip)
    programs = {
        "reorthogonalize": (
            lambda b, x: basis_lib.orthogonalize([b], [x], m),
            lambda b, x: _default_orthogonalize(b, x, m), (basis, v)),
        "restart's rotation": (
            lambda b, y: basis_lib.rotate([b], y), _default_combination,
            (basis, square)),
        f"{k} Ritz vectors": (
            lambda b, y: basis_lib.combine([b], y), _default_combination,
            (basis, ritz)),
    }
    for name, (library, default, args) in programs.items():
      for label, fn in (("JAX default", default), ("library", library)):
        cycles, flops, accessed, precisions = read(
            jax.jit(fn).lower(*args).compile())
        rows.append([f"{m + 1} x 2^20", name, label, f"{cycles:,}",
                     f"{flops / 1e9:.2f}", f"{accessed / 2**20:.0f}",
                     ", ".join(precisions)])
        print(json.dumps(rows[-1]))
  body = (__doc__.split("\n\n", 1)[1].split("Needs the libtpu")[0].strip()
          + "\n\n" + common.table(
              ["basis", "program", "precision", "estimated cycles",
               "GFLOP", "MiB accessed", "matrix products' precision"], rows))
  common.write("tpu_basis", "The Krylov basis's products on a TPU chip "
               f"(jax {jax.__version__})", body)


if __name__ == "__main__":
  main()
