r"""Where a Lanczos step's time goes, inside the compiled block of steps.

The model, weights, batches and cases of benchmarks/peers.py (the digits MLP,
3,466 parameters, 1797 examples in batches of 256; top 5 in float32 and top
20 in float64, from the all-ones vector, without the explicit residual
checks). Per step, medians of 7 warm calls: a Lanczos run in blocks (its
time over its steps); the operator's own whole-data pass alone in a compiled
loop of 50 (its scan over the batches rolled, as on GPUs and TPUs, and
unrolled, as on CPU); a closure's whole-data HVP in a loop of 50 (XLA folds
its forward pass into constants: matfree's product); matfree's
tridiagonalisation per product; and the stopping test's symmetric eigh of
the basis-sized matrix alone in a loop of 200, in each of the platform's
implementations. What a step costs beyond its pass and its eigh is the
reorthogonalization, the updates of ``T``, the loop's control and, on a GPU,
the host's launches after each of the loop's reads of its stopping flag.

  python -m benchmarks.lanczos_steps   (needs the bench extra and matfree)

Writes benchmarks/results/lanczos_steps.md (results/gpu/ on a GPU).
"""

import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import peers  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos._src import lanczos as lanczos_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos._src import operator as operator_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

LOOP = 50


def lanczos_step(task, params, k, dtype, target):
  """``(steps, seconds per step)`` of a Lanczos run in blocks."""
  op = peers.operator(task, params, dtype)
  ones = jax.tree.map(jnp.ones_like, op.template)

  def run():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", deeplanczos.ConvergenceWarning)
      return jax.block_until_ready(deeplanczos.lanczos(
          op, k, tol=target, ncv=lanczos_lib.default_ncv(k), v0=ones,
          show_pbar=False, check_residuals=False))
  steps = run().num_hvps
  return steps, common.median_seconds(run, repeats=7, warmup=1) / steps


def pass_in_loop(task, params, dtype, unrolled):
  """Seconds per pass of the operator's pass in a compiled loop."""
  op = peers.operator(task, params, dtype)
  pass_fn, data = op.pass_program()
  pass_fn = operator_lib.PassFn(pass_fn.programs, pass_fn.padded, tuple(
      len(s.index) if unrolled else 1 for s in data[0]))

  @jax.jit
  def run(p, v, data):
    def body(_, v):
      hv, _ = pass_fn(p, v, data)
      norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(hv)))
      return jax.tree.map(lambda x: x / norm, hv)
    return jax.lax.fori_loop(0, LOOP, body, v)
  v = jax.tree.map(lambda x: jnp.ones_like(x) / 100, op.template)
  return common.median_seconds(run, op.params, v, data, repeats=7) / LOOP


def closure_in_loop(task, params, dtype):
  """Seconds per product of a closure's whole-data HVP in a compiled loop."""
  flat, hvp = peers.flat_hvp(task, params, dtype)

  @jax.jit
  def run(v):
    def body(_, v):
      h = hvp(v)
      return h / jnp.linalg.norm(h)
    return jax.lax.fori_loop(0, LOOP, body, v)
  v = jnp.ones_like(flat)
  return common.median_seconds(run, v, repeats=7) / LOOP


def eigh_in_loop(size, dtype, implementation=None, count=200):
  """Seconds per ``eigh`` of a ``size``-square matrix in a compiled loop."""
  a = np.random.default_rng(0).normal(size=(size, size))
  a = jnp.asarray(a + a.T, dtype)

  @jax.jit
  def run(a):
    def body(_, c):
      v, w = jax.lax.linalg.eigh(a + c, implementation=implementation)
      return c + (w[-1] + v[0, 0]) * 1e-12
    return jax.lax.fori_loop(0, count, body, jnp.zeros((), a.dtype))
  return common.median_seconds(run, a, repeats=3) / count


def main():
  task, params = peers.problem()
  gpu = jax.devices()[0].platform == "gpu"
  implementations = {"default": None}
  if gpu:  # JAX picks cuSOLVER's Jacobi up to 32 rows, QR above
    implementations.update(
        jacobi=jax.lax.linalg.EighImplementation.JACOBI,
        qr=jax.lax.linalg.EighImplementation.QR)
  rows = []
  for k, dtype, target in peers.CASES:
    steps, step = lanczos_step(task, params, k, dtype, target)
    size = lanczos_lib.default_ncv(k)
    eighs = {name: eigh_in_loop(size, dtype, impl)
             for name, impl in implementations.items()}
    depth = peers.matfree_depth_for(k)
    _, _, matfree = peers.matfree_depth(task, params, k, dtype, depth)
    ms = lambda s: f"{s * 1e3:.3f}"
    rows.append([
        f"top {k} {np.dtype(dtype).name}", str(steps), ms(step),
        ms(pass_in_loop(task, params, dtype, unrolled=False)),
        ms(pass_in_loop(task, params, dtype, unrolled=True)),
        ms(closure_in_loop(task, params, dtype)), ms(matfree / depth),
        f"{size}: " + ", ".join(f"{name} {ms(s)}"
                                for name, s in eighs.items())])
  body = (__doc__.split("\n\n", 1)[1].split("  python -m")[0].strip()
          + "\n\n" + common.table(
              ["case", "Lanczos steps", "ms a step (blocks)",
               "pass in a loop, rolled", "unrolled",
               "closure HVP in a loop", "matfree ms a product",
               "eigh in a loop: rows: ms"], rows))
  common.write("lanczos_steps", "Where a Lanczos step's time goes", body)


if __name__ == "__main__":
  main()
