r"""Lanczos against scipy's eigsh and the power method, on the digits CNN.

1. Hessian-vector products (full passes over the 1797 digits) needed for the
   top-5 eigenpairs to relative residual 1e-6: deeplanczos.lanczos,
   scipy.sparse.linalg.eigsh on a LinearOperator wrapping the same HVP, and the
   power method with deflation. float64, so that 1e-6 is reachable by all.
2. Time per Lanczos step against time per HVP: the reorthogonalization's
   overhead, for bases of 20 and 80 vectors.
3. Compile time of the Lanczos step for 20, 80 and 200 steps: the step is one
   function compiled once per basis size, never unrolled.

  python -m benchmarks.lanczos

Writes benchmarks/results/lanczos.md.
"""

import logging
import time

import jax

jax.config.update("jax_enable_x64", True)

from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from scipy.sparse import linalg as sparse_linalg  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos._src import basis as basis_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos._src import tree_math  # pylint: disable=g-import-not-at-top,wrong-import-position

K, TOL = 5, 1e-6


def cnn_operator():
  spec = experiment.base_config()
  spec.task = "cnn_digits"
  spec.model.channels = (16, 32)
  spec.model.hidden = 64
  task = experiment.build_task(spec)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                        experiment.train(task, spec).params)
  x = task.x.astype(np.float64)
  dataset = data_lib.batch_dataset(x, task.y, 256)
  return lambda: deeplanczos.HessianOperator(
      task.loss, params, dataset, batch_parser=data_lib.parse_batch)


def by_lanczos(make_op):
  op = make_op()
  start = time.perf_counter()
  r = deeplanczos.lanczos(op, K, tol=TOL, ncv=20, max_hvps=500,
                          show_pbar=False)
  seconds = time.perf_counter() - start
  assert np.all(r.residuals <= TOL * np.abs(r.eigenvalues)), r.residuals
  return r.eigenvalues, r.num_hvps, seconds


def by_eigsh(make_op):
  op = make_op()
  flat, unravel = ravel_pytree(op.template)
  matvec = lambda x: np.asarray(ravel_pytree(op.matvec(unravel(
      jnp.asarray(x))))[0])
  linear = sparse_linalg.LinearOperator((flat.size, flat.size),
                                        matvec=matvec, dtype=np.float64)
  start = time.perf_counter()
  w = sparse_linalg.eigsh(linear, K, which="LA", tol=TOL, ncv=20,
                          v0=np.asarray(ravel_pytree(op.random_vector(
                              jax.random.key(0)))[0]),
                          return_eigenvectors=False)
  return np.sort(w)[::-1], op.num_matvecs, time.perf_counter() - start


def by_power_deflation(make_op, limit=3000):
  """Power iteration on H minus the pairs already found (Hotelling)."""
  op = make_op()
  found, lams = [], []
  start = time.perf_counter()
  for i in range(K):
    v = op.random_vector(jax.random.key(100 + i))
    for _ in range(limit):
      hv = op.matvec(v)
      for lam, u in zip(lams, found):
        hv = tree_math.tree_axpy(-lam * tree_math.tree_vdot(u, v), u, hv)
      rayleigh = float(tree_math.tree_vdot(v, hv))
      residual = float(tree_math.tree_norm(
          tree_math.tree_axpy(-rayleigh, v, hv)))
      if residual <= TOL * abs(rayleigh):
        break
      v = tree_math.tree_scale(hv, 1.0 / tree_math.tree_norm(hv))
    found.append(v)
    lams.append(rayleigh)
  return np.array(lams), op.num_matvecs, time.perf_counter() - start


def step_overhead(make_op, ncv, steps=40):
  """Mean seconds per bare HVP and per Lanczos step, both after compilation.

  Both are means over ``steps`` sequential calls, each ending in a host read,
  so the two are timed alike.
  """
  op = make_op()
  deeplanczos.lanczos(op, 2, ncv=ncv, tol=1e-300, max_hvps=4, show_pbar=False)
  v = op.random_vector(jax.random.key(0))
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(op.matvec(v))
  hvp = (time.perf_counter() - start) / steps
  start = time.perf_counter()
  r = deeplanczos.lanczos(op, 2, ncv=ncv, tol=1e-300, show_pbar=False,
                                   max_hvps=steps)
  per_step = (time.perf_counter() - start) / r.num_hvps
  return hvp, per_step


def compile_seconds(make_op, steps):
  op = make_op()
  basis = basis_lib.zeros(op.template, steps + 1, op.shardings)
  v = op.random_vector(jax.random.key(0))
  start = time.perf_counter()
  basis_lib.orthogonalize.lower(basis, v, 1, packing=basis_lib.packing(
      op.template, op.shardings, basis)).compile()
  seconds = time.perf_counter() - start  # a basis size not compiled before
  compiled = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = lambda record: compiled.append(record.getMessage())
  logger = logging.getLogger("jax._src.dispatch")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      deeplanczos.lanczos(op, 2, ncv=steps, tol=1e-300, max_hvps=steps,
                          show_pbar=False)
  finally:
    logger.removeHandler(handler)
  compiles = sum(m.startswith("Finished XLA compilation of jit(orthogonalize)")
                 for m in compiled)
  return seconds, compiles


def main():
  make_op = cnn_operator()
  n = tree_math.tree_size(make_op().template)
  rows = []
  for steps in (20, 80, 200):
    seconds, compiles = compile_seconds(make_op, steps)
    rows.append([steps, f"{seconds:.2f}", compiles])
  compile_table = common.table(
      ["steps (basis size)", "compile s of the step", "compiles during run"],
      rows)
  rows, reference = [], None
  for name, fn in (("deeplanczos.lanczos (ncv=20)", by_lanczos),
                   ("scipy eigsh (ncv=20)", by_eigsh),
                   ("power method + deflation", by_power_deflation)):
    lam, hvps, seconds = fn(make_op)
    reference = lam if reference is None else reference
    err = np.max(np.abs(lam - reference) / np.abs(reference))
    rows.append([name, hvps, f"{seconds:.1f}",
                 ", ".join(f"{x:.6f}" for x in lam), f"{err:.1e}"])
  body = (f"Digits CNN ({n:,} parameters, trained 500 Adam steps), float64, "
          f"1797 examples in batches of 256; top-{K} to relative residual "
          f"{TOL:g}. Lanczos' count includes the {K} products of its explicit "
          "residual check.\n\n" + common.table(
              ["method", "HVPs", "seconds", "eigenvalues",
               "max rel. diff. to Lanczos"], rows))
  rows = []
  for ncv in (20, 80):
    hvp, per_step = step_overhead(make_op, ncv)
    rows.append([ncv, f"{hvp * 1e3:.1f}", f"{per_step * 1e3:.1f}",
                 f"{per_step / hvp:.3f}"])
  body += ("\n\nMean over 40 sequential calls, after compilation:\n\n" +
           common.table(["basis vectors (ncv)", "ms per HVP",
                         "ms per Lanczos step", "step / HVP"], rows))
  body += ("\n\nCompile time of the Lanczos step (orthogonalization against "
           "the basis) for a basis of each size, compiled fresh, and how many "
           "times it compiled again during a run of that many steps (XLA "
           "compiles, counted from JAX's log; 0: the run reused it):\n\n" +
           compile_table)
  common.write("lanczos", "Lanczos: HVPs to converge, step overhead, compile "
               "time", body)


if __name__ == "__main__":
  main()
