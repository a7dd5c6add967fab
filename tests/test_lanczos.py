"""Lanczos, SLQ density and trace estimators against dense answers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deeplanczos
from deeplanczos._src import basis as basis_lib
from deeplanczos._src import density as density_lib
from deeplanczos._src import lanczos as lanczos_lib
from deeplanczos._src import operator as operator_lib
from deeplanczos._src import plan as plan_lib
from deeplanczos._src import trace as trace_lib
from tests import helpers


@pytest.fixture(scope="module")
def mlp():
  loss, params, x, y = helpers.mlp_problem()
  h, _ = helpers.dense_hessian(loss, params, x, y)
  w, u = np.linalg.eigh(h)
  return loss, params, helpers.batches_of(x, y, [16, 16, 16, 12]), h, w, u


def one_device():
  """A mesh of one device: every small leaf whole there, so the compiled
  loops pack them all (``basis.Packing``)."""
  return {"mesh": deeplanczos.make_mesh([("data", -1), ("model", 1)],
                                        jax.devices()[:1])}


def unstack(vectors, k):
  return [helpers.flat(jax.tree.map(lambda a, i=i: a[i], vectors))
          for i in range(k)]


@pytest.mark.parametrize("which,k", [("LA", 5), ("SA", 3), ("LM", 3)])
def test_mlp_eigenpairs_match_dense(mlp, which, k):
  loss, params, batches, h, w, u = mlp
  r = deeplanczos.lanczos(loss, params, batches, k, which=which, tol=1e-10,
                          show_pbar=False)
  idx = lanczos_lib.order(w, which)[:k]
  assert r.converged
  np.testing.assert_allclose(r.eigenvalues, w[idx], rtol=1e-6)
  for i, v in enumerate(unstack(r.eigenvectors, k)):
    assert abs(v @ u[:, idx[i]]) > 0.999
    true_residual = np.linalg.norm(h @ v - r.eigenvalues[i] * v)
    assert true_residual <= 1e-10 * abs(r.eigenvalues[i]) + 1e-12
    np.testing.assert_allclose(r.residuals[i], true_residual, atol=1e-13)
    np.testing.assert_allclose(r.residual_estimates[i], true_residual,
                               atol=1e-11)
  assert r.num_hvps < len(w)  # fewer products than a dense Hessian needs
  assert r.ritz_history.shape == (r.num_hvps - k, k)
  np.testing.assert_allclose(r.gap_ratio, w[idx[0]] / w[idx[1]], rtol=1e-6)
  np.testing.assert_allclose(r.loss, loss(params, *helpers.batches_of(
      np.concatenate([b[0] for b in batches]),
      np.concatenate([b[1] for b in batches]), [60])[0]), rtol=1e-12)


def test_repeated_eigenvalues_found_through_breakdown():
  spectrum = [5, 5, 5, 3, 2, 2, 1, 0.5, 0.5, 0.1, -1, -1]
  loss, params, x, y, h = helpers.quadratic_problem(
      spectrum, shapes=((4,), (2, 4)))
  r = deeplanczos.lanczos(loss, params, [(x, y)], 5, tol=1e-10,
                          show_pbar=False)
  np.testing.assert_allclose(r.eigenvalues, [5, 5, 5, 3, 2], rtol=1e-10)
  vs = np.stack(unstack(r.eigenvectors, 5))
  np.testing.assert_allclose(vs @ vs.T, np.eye(5), atol=1e-10)
  np.testing.assert_allclose(vs @ h @ vs.T, np.diag(r.eigenvalues),
                             atol=1e-9)


def test_clustered_eigenvalues_with_restarts():
  rng = np.random.default_rng(0)
  spectrum = np.concatenate([[10.0, 9.999, 9.998, 5.0],
                             rng.uniform(-2, 4, size=56)])
  loss, params, x, y, _ = helpers.quadratic_problem(
      spectrum, shapes=((10,), (5, 10)))
  r = deeplanczos.lanczos(loss, params, helpers.batches_of(x, y, [25, 25, 10]),
                          4, ncv=10, tol=1e-9, max_hvps=2000, show_pbar=False)
  assert r.converged and r.num_hvps > 10  # restarted, kept 10 vectors
  np.testing.assert_allclose(r.eigenvalues, [10.0, 9.999, 9.998, 5.0],
                             rtol=1e-9)


def test_early_breakdown():
  spectrum = [4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.125]
  loss, params, x, y, h = helpers.quadratic_problem(spectrum)
  w, u = np.linalg.eigh(h)
  op = deeplanczos.HessianOperator(loss, params, [(x, y)])
  _, unravel = jax.flatten_util.ravel_pytree(params)
  v0 = unravel(u[:, -1] + u[:, -3])  # in the span of two eigenvectors
  d = deeplanczos.tridiagonalize(op, v0, 6)
  assert d.num_steps == 2
  np.testing.assert_allclose(np.linalg.eigvalsh(d.tridiagonal), [2.0, 4.0],
                             rtol=1e-12)
  r = deeplanczos.lanczos(loss, params, [(x, y)], 4, v0=v0, tol=1e-10,
                          show_pbar=False)
  np.testing.assert_allclose(r.eigenvalues, [4.0, 3.0, 2.0, 1.0], rtol=1e-10)


def test_lanczos_identities_without_restart(mlp):
  loss, params, batches, h, _, _ = mlp
  op = deeplanczos.HessianOperator(loss, params, batches)
  steps = 10
  d = deeplanczos.tridiagonalize(op, op.random_vector(jax.random.key(2)),
                                 steps)
  q = np.stack([helpers.flat(jax.tree.map(lambda a, i=i: a[i], d.basis))
                for i in range(steps)], axis=1)
  t = d.tridiagonal
  np.testing.assert_allclose(q.T @ q, np.eye(steps), atol=1e-12)
  assert np.all(np.triu(t, 2) == 0) and np.all(np.tril(t, -2) == 0)
  e = np.zeros(steps)
  e[-1] = 1
  np.testing.assert_allclose(h @ q, q @ t + np.outer(helpers.flat(d.residual),
                                                     e), atol=1e-10)


def test_slq_density_integrates_to_one_and_matches_histogram(mlp):
  loss, params, batches, _, w, _ = mlp
  r = deeplanczos.spectral_density(loss, params, batches, num_probes=10,
                                   num_steps=len(w), key=jax.random.key(1),
                                   show_pbar=False)
  dx = r.grid[1] - r.grid[0]
  np.testing.assert_allclose(r.density.sum() * dx, 1.0, rtol=1e-6)
  np.testing.assert_allclose(r.weights.sum(axis=1), 1.0, rtol=1e-10)
  dense = density_lib.gaussian_density(w[None], np.full((1, len(w)),
                                                        1 / len(w)),
                                       r.grid, r.sigma)
  # Probe noise: 10 probes of a 43-dimensional space.
  assert np.abs(dense - r.density).sum() * dx < 0.25
  # Each probe's quadrature has the exact first moment v^T H v.
  mean = (r.grid * r.density).sum() * dx
  np.testing.assert_allclose(mean, w.mean(), atol=3 * w.std() / np.sqrt(10))
  # A probe's Krylov space holds one direction per distinct eigenvalue, so
  # it breaks down (exactly) before len(w) steps: the network's Hessian has
  # repeated zero eigenvalues.
  assert r.num_hvps <= 10 * len(w)


def test_slq_few_steps_keeps_extremes(mlp):
  loss, params, batches, _, w, _ = mlp
  r = deeplanczos.spectral_density(loss, params, batches, num_probes=2,
                                   num_steps=12, show_pbar=False)
  assert np.nanmax(r.nodes) == pytest.approx(w.max(), rel=1e-3)
  assert r.grid[0] < w.min() and r.grid[-1] > w.max()


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_within_four_standard_errors(mlp, method):
  loss, params, batches, h, _, _ = mlp
  if method == "hutchinson":
    r = deeplanczos.hutchinson(loss, params, batches, num_probes=40,
                               show_pbar=False)
  else:
    r = deeplanczos.hutchpp(loss, params, batches, num_hvps=45,
                            show_pbar=False)
  assert 0 < r.stderr < abs(np.trace(h))
  assert abs(r.estimate - np.trace(h)) < 4 * r.stderr
  assert r.num_hvps == (40 if method == "hutchinson" else 45)


@pytest.mark.parametrize("options", [
    {}, {"probes_per_call": 2}, {"data_on_device": False}])
def test_hutchpp_exact_for_low_rank(options):
  # H S has rank 2 of the 3 sketch vectors: the third is dropped, in the
  # compiled loop, in batched passes and a product at a time.
  spectrum = [6.0, 3.0, 0, 0, 0, 0, 0]
  loss, params, x, y, _ = helpers.quadratic_problem(spectrum)
  r = deeplanczos.hutchpp(loss, params, [(x, y)], num_hvps=9,
                          show_pbar=False, **options)
  assert r.num_hvps == 3 + 2 + 3  # sketch, the rank's exact terms, probes
  np.testing.assert_allclose(r.estimate, 9.0, rtol=1e-10)
  np.testing.assert_allclose(r.samples, 0.0, atol=1e-10)


def test_per_layer_operator(mlp):
  loss, params, batches, h, _, _ = mlp
  paths = [deeplanczos.path_str(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(params)]
  sizes = [a.size for a in jax.tree.leaves(params)]
  offsets = np.cumsum([0] + sizes)
  chosen = [i for i, p in enumerate(paths) if "Dense_1" in p]
  idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in chosen])
  block = h[np.ix_(idx, idx)]
  wb = np.linalg.eigvalsh(block)
  r = deeplanczos.lanczos(loss, params, batches, 3, subset="Dense_1",
                          tol=1e-10, show_pbar=False)
  np.testing.assert_allclose(r.eigenvalues, wb[::-1][:3], rtol=1e-6)
  assert {a.shape for a in jax.tree.leaves(r.eigenvectors)} == {(3, 3),
                                                                 (3, 5, 3)}
  assert all("Dense_1" in deeplanczos.path_str(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(r.eigenvectors))
  _, hist = deeplanczos.PowerMethodIterate(loss, params, batches, 200,
                                           subset="Dense_1", show_pbar=False)
  np.testing.assert_allclose(hist["eigenvalue"][-1],
                             wb[np.argmax(np.abs(wb))], rtol=1e-6)
  t = deeplanczos.hutchpp(loss, params, batches, subset="Dense_1",
                          num_hvps=30, show_pbar=False)
  assert abs(t.estimate - np.trace(block)) < 4 * t.stderr + 1e-9
  with pytest.raises(ValueError, match="selects no parameter"):
    deeplanczos.lanczos(loss, params, batches, 3, subset="conv",
                        show_pbar=False)


@pytest.mark.parametrize("steps_per_call", [None, "auto"])
def test_compiled_once_however_many_steps(mlp, steps_per_call):
  base, params, batches, _, _, _ = mlp
  counts = []
  for max_hvps in (8, 40):
    traces = []

    def loss(p, x, y, traces=traces):
      traces.append(x.shape)
      return base(p, x, y)

    programs = (basis_lib.orthogonalize, lanczos_lib._steps)  # pylint: disable=protected-access
    before = [p._cache_size() for p in programs]  # pylint: disable=protected-access
    deeplanczos.lanczos(loss, params, batches, 3, ncv=7, tol=1e-14,
                        max_hvps=max_hvps, show_pbar=False,
                        steps_per_call=steps_per_call)
    counts.append((len(traces), *[p._cache_size() - b  # pylint: disable=protected-access
                                  for p, b in zip(programs, before)]))
  # 40 products, with restarts, trace and compile no more than 8 did (each
  # run's loss is new): the blocks of steps are one program for every
  # length.
  assert counts[1][0] == counts[0][0] == 4
  assert counts[1][1] == 0 and counts[1][2] == counts[0][2]
  assert (counts[0][2] > 0) == (steps_per_call == "auto")


def test_bad_arguments(mlp):
  loss, params, batches, _, w, _ = mlp
  run = lambda **kw: deeplanczos.lanczos(loss, params, batches,
                                         show_pbar=False, **kw)
  with pytest.raises(ValueError, match="which must be one of"):
    run(k=2, which="BE")
  with pytest.raises(ValueError, match="k must be an integer from 1"):
    run(k=0)
  with pytest.raises(ValueError, match=f"number of parameters \\({len(w)}\\)"):
    run(k=len(w) + 1)
  with pytest.raises(ValueError, match="ncv must be an integer larger"):
    run(k=5, ncv=5)
  with pytest.raises(ValueError, match="num_steps must be a positive"):
    deeplanczos.spectral_density(loss, params, batches, num_steps=0)
  with pytest.raises(ValueError, match="num_hvps must be an integer of at least 3"):
    deeplanczos.hutchpp(loss, params, batches, num_hvps=2)


def test_counts_are_per_run_on_a_reused_operator(mlp):
  loss, params, batches, _, w, _ = mlp
  op = deeplanczos.HessianOperator(loss, params, batches)
  first = deeplanczos.lanczos(op, 2, max_hvps=6, tol=1e-14, show_pbar=False)
  again = deeplanczos.lanczos(op, 2, max_hvps=6, tol=1e-14, show_pbar=False)
  assert first.num_hvps == again.num_hvps == 6 + 2  # + explicit residuals
  np.testing.assert_allclose(again.eigenvalues, first.eigenvalues)
  d = deeplanczos.spectral_density(op, num_probes=1, num_steps=3,
                                   show_pbar=False)
  assert d.num_hvps == 3 and op.num_matvecs == 19
  del w


def lanczos_setup(spectrum, steps, size, which="LA", k=2):
  """A quadratic with a known Hessian and ``steps`` plain Lanczos steps."""
  loss, params, x, y, h = helpers.quadratic_problem(
      spectrum, shapes=((4,), (2, 4)))
  op = deeplanczos.HessianOperator(loss, params, [(x, y)])
  d = deeplanczos.tridiagonalize(op, op.random_vector(jax.random.key(3)),
                                 steps)
  basis = basis_lib.zeros(op.template, size + 1, op.shardings)
  for i in range(steps):
    basis = basis_lib.put(basis, i, basis_lib.get(d.basis, i))
  dtype = jax.numpy.float64
  opts = lanczos_lib._Options(k=k, which=which, tol=1e-8, size=size,  # pylint: disable=protected-access
                              dimension=len(spectrum),
                              tiny=100 * float(jax.numpy.finfo(dtype).eps))
  return op, h, d, basis, opts


def test_thick_restart_keeps_ritz_pairs_and_the_arrow():
  spectrum = [9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, -1.0, -3.0]
  size = 6
  op, h, d, basis, opts = lanczos_setup(spectrum, size, size)
  t = np.asarray(d.tridiagonal)
  beta = float(np.linalg.norm(helpers.flat(d.residual)))
  w = basis_lib.scale(d.residual, 1.0 / beta)
  new_basis, new_t, kept = lanczos_lib.thick_restart(
      basis, t, size - 1, beta, w, beta, opts)
  theta = np.linalg.eigvalsh(t)
  assert kept == max(2, min(size - 1, 2 + (size - 2) // 2))  # l = 4
  np.testing.assert_allclose(np.diag(new_t)[:kept],
                             np.sort(theta)[::-1][:kept], rtol=1e-12)
  q = np.stack([helpers.flat(basis_lib.get(new_basis, i))
                for i in range(kept + 1)], axis=1)
  np.testing.assert_allclose(q.T @ q, np.eye(kept + 1), atol=1e-12)
  # H y_i = theta_i y_i + T[i, l] q_l for every kept Ritz vector y_i.
  for i in range(kept):
    np.testing.assert_allclose(
        h @ q[:, i], new_t[i, i] * q[:, i] + new_t[i, kept] * q[:, kept],
        atol=1e-10)
  assert np.all(new_t[kept + 1:] == 0)
  del op


def test_breakdown_continues_orthogonal_to_the_basis():
  spectrum = [4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, -0.1, -0.2, -0.3, -1]
  op, _, d, basis, _ = lanczos_setup(spectrum, 3, 5)
  del d
  key = jax.random.key(11)
  w, next_key = lanczos_lib.continue_after_breakdown(op, basis, 3, key)
  q = np.stack([helpers.flat(basis_lib.get(basis, i)) for i in range(3)])
  v = helpers.flat(w)
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-12)
  np.testing.assert_allclose(q @ v, 0.0, atol=1e-12)
  other, _ = lanczos_lib.continue_after_breakdown(op, basis, 3, next_key)
  assert abs(helpers.flat(other) @ v) < 0.99  # a fresh direction each time
  assert not np.array_equal(jax.random.key_data(next_key),
                            jax.random.key_data(key))


def test_converged_means_the_explicit_residuals_meet_tol(mlp):
  """The recurrence converges, but ``H v`` at the end is 10% off (streamed
  data: every product goes through ``op.matvec``)."""
  loss, params, batches, _, _, _ = mlp
  op = deeplanczos.HessianOperator(loss, params, batches, data_on_device=False)
  exact = op.matvec

  def skewed(v, *, where=""):
    hv = exact(v, where=where)
    return hv if "eigenpair" not in where else jax.tree.map(
        lambda a: 1.1 * a, hv)

  op.matvec = skewed
  with pytest.warns(deeplanczos.ConvergenceWarning,
                    match=r"pairs 0 \(eigenvalue .*relative residual 0.1\)"):
    r = deeplanczos.lanczos(op, 3, tol=1e-6, show_pbar=False)
  assert not r.converged
  np.testing.assert_allclose(r.residuals / np.abs(r.eigenvalues), 0.1,
                             rtol=1e-6)
  assert np.all(r.residual_estimates <= 1e-6 * np.abs(r.eigenvalues))


def test_a_short_budget_returns_only_the_pairs_found(mlp):
  loss, params, batches, h, _, _ = mlp
  with pytest.warns(deeplanczos.ConvergenceWarning,
                    match="found 2 of the 3 pairs asked for"):
    r = deeplanczos.lanczos(loss, params, batches, 3, max_hvps=2,
                            show_pbar=False)
  assert not r.converged
  assert len(r.eigenvalues) == len(r.residuals) == 2
  vectors = unstack(r.eigenvectors, 2)
  assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(r.eigenvectors))
  for lam, v, res in zip(r.eigenvalues, vectors, r.residuals):
    np.testing.assert_allclose(np.linalg.norm(v), 1, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(h @ v - lam * v), res,
                               rtol=1e-8)


def test_tol_zero_is_the_working_precision_and_counts_add_up():
  spectrum = np.linspace(1.0, 10.0, 12) ** 2
  loss, params, x, y, h = helpers.quadratic_problem(
      spectrum, shapes=((4,), (2, 4)))
  r = deeplanczos.lanczos(loss, params, [(x, y)], 3, tol=0, show_pbar=False)
  assert r.converged
  np.testing.assert_allclose(r.eigenvalues, spectrum[::-1][:3], rtol=1e-13)
  assert np.all(r.residuals <= 10 * np.finfo(np.float64).eps * spectrum[-1])
  assert r.residual_hvps == 3 and r.num_hvps == r.krylov_hvps + 3
  assert r.krylov_hvps == len(r.ritz_history)
  # Without the checks: the same Krylov space, k products fewer, the
  # recurrence's estimates as residuals, and the same pairs.
  estimated = deeplanczos.lanczos(loss, params, [(x, y)], 3, tol=0,
                                  show_pbar=False, check_residuals=False)
  assert estimated.krylov_hvps == estimated.num_hvps == r.krylov_hvps
  assert estimated.residual_hvps == 0 and estimated.converged
  np.testing.assert_array_equal(estimated.residuals, r.residual_estimates)
  np.testing.assert_array_equal(estimated.eigenvalues, r.eigenvalues)
  vs = np.stack([helpers.flat(v) for v in unstack(estimated.eigenvectors, 3)])
  np.testing.assert_allclose(np.linalg.norm(h @ vs.T - vs.T * spectrum[::-1][:3],
                                            axis=0), 0, atol=1e-11)
  with pytest.raises(ValueError, match="tol must be a non-negative number"):
    deeplanczos.lanczos(loss, params, [(x, y)], 3, tol=-1.0)


@pytest.mark.parametrize("which,steps_per_call", [
    ("LA", "auto"), ("SA", 3), ("LM", 1)])
def test_steps_in_compiled_blocks_match_step_by_step(mlp, which,
                                                     steps_per_call):
  loss, params, batches, h, w, u = mlp
  # Streamed data runs one step at a time, deciding on the host after each.
  one = deeplanczos.lanczos(loss, params, batches, 4, ncv=9, tol=1e-10,
                            which=which, max_hvps=400, show_pbar=False,
                            data_on_device=False)
  op = deeplanczos.HessianOperator(loss, params, batches)
  r = deeplanczos.lanczos(op, 4, ncv=9, tol=1e-10, which=which, max_hvps=400,
                          show_pbar=False, steps_per_call=steps_per_call)
  assert op.data_on_device and r.converged
  idx = lanczos_lib.order(w, which)[:4]
  np.testing.assert_allclose(r.eigenvalues, w[idx], rtol=1e-9)
  np.testing.assert_allclose(r.eigenvalues, one.eigenvalues, rtol=1e-12)
  for i, v in enumerate(unstack(r.eigenvectors, 4)):
    assert np.linalg.norm(h @ v - r.eigenvalues[i] * v) <= 1e-9 * w[-1]
  # The blocks stop themselves at the step that converged: the same
  # products, restarts and Ritz values as step by step.
  assert r.krylov_hvps == one.krylov_hvps
  np.testing.assert_allclose(r.ritz_history, one.ritz_history, rtol=1e-9)
  # The explicit checks, in the block program's check mode, are the
  # products that op.matvec takes.
  assert r.residual_hvps == one.residual_hvps == 4
  np.testing.assert_allclose(r.residuals, one.residuals, rtol=1e-3,
                             atol=1e-13)
  del u


def test_convolutions_on_cpu_run_a_step_per_program():
  """XLA:CPU runs loop bodies without its fast convolutions, so there
  ``steps_per_call='auto'`` (the default) keeps to single steps on the
  operator's pass."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 6, 6, 1))
  y = rng.normal(size=(24,))
  params = {"w": rng.normal(size=(3, 3, 1, 2)) / 3, "v": rng.normal(size=2)}

  def loss(p, x, y):
    z = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.numpy.mean((jax.numpy.tanh(z).mean((1, 2)) @ p["v"] - y) ** 2)
  batches = helpers.batches_of(x, y, [8, 8, 8])
  h, _ = helpers.dense_hessian(loss, params, x, y)
  w = np.linalg.eigvalsh(h)
  op = deeplanczos.HessianOperator(loss, params, batches)
  before = lanczos_lib._steps._cache_size()  # pylint: disable=protected-access
  r = deeplanczos.lanczos(op, 3, tol=1e-10, show_pbar=False)
  assert op.data_on_device and not op.loops_run_fast()
  np.testing.assert_allclose(r.eigenvalues, w[::-1][:3], rtol=1e-9)
  assert r.krylov_hvps == deeplanczos.lanczos(
      loss, params, batches, 3, tol=1e-10, show_pbar=False,
      data_on_device=False).krylov_hvps
  assert lanczos_lib._steps._cache_size() == before  # pylint: disable=protected-access
  dense = deeplanczos.HessianOperator(*helpers.mlp_problem()[:2],
                                      [helpers.mlp_problem()[2:]])
  assert dense.loops_run_fast()
  streamed = deeplanczos.HessianOperator(loss, params, batches,
                                         data_on_device=False)
  assert not streamed.loops_run_fast()


def test_auto_keeps_to_the_operators_compiled_pass(mlp, monkeypatch):
  """Once ``op.matvec`` has compiled the pass, 'auto' runs a step at a time
  on it: a block program would compile the pass again."""
  loss, params, batches, _, w, _ = mlp
  calls = []
  monkeypatch.setattr(lanczos_lib, "_steps", helpers.counting(
      lanczos_lib._steps, calls))  # pylint: disable=protected-access
  run = lambda op: deeplanczos.lanczos(op, 3, ncv=8, tol=1e-10,
                                       show_pbar=False)
  fresh = deeplanczos.HessianOperator(loss, params, batches)
  blocks = run(fresh)
  assert calls and "matvec" not in fresh.pass_programs()
  calls.clear()
  op = deeplanczos.HessianOperator(loss, params, batches)
  op.matvec(op.random_vector(jax.random.key(0)))
  assert "matvec" in op.pass_programs() and "matvec" in op.with_params(
      params).pass_programs()
  again = run(op.with_params(params))
  assert not calls
  assert again.krylov_hvps == blocks.krylov_hvps
  np.testing.assert_allclose(again.eigenvalues, w[::-1][:3], rtol=1e-9)


def test_methods_on_one_operator_compile_the_pass_at_most_twice(
    mlp, monkeypatch):
  """The first method runs its own compiled loop; the others then share
  op.matvec's program (each loop holds its own copy of the pass)."""
  from deeplanczos._src import power as power_lib  # pylint: disable=g-import-not-at-top
  loss, params, batches, h, w, _ = mlp
  calls = []
  for module, name in ((lanczos_lib, "_steps"),
                       (lanczos_lib, "_tridiagonalize_loop"),
                       (trace_lib, "_products_loop"),
                       (power_lib, "_iterations")):
    monkeypatch.setattr(module, name,
                        helpers.counting(getattr(module, name), calls, name))
  op = deeplanczos.HessianOperator(loss, params, batches)
  for round_ in range(2):
    calls.clear()
    t = deeplanczos.hutchinson(op, num_probes=20, show_pbar=False)
    assert set(calls) == {"_products_loop"}, round_
    calls.clear()
    r = deeplanczos.lanczos(op, 2, tol=1e-10, show_pbar=False)
    d = deeplanczos.spectral_density(op, num_probes=2, num_steps=len(w),
                                     show_pbar=False)
    p = deeplanczos.power_iteration(op, num_iterations=300, tol=1e-12,
                                    show_pbar=False)
    assert not calls, round_
    assert op.pass_programs() == {"trace", "matvec"}
    assert abs(t.estimate - np.trace(h)) < 4 * t.stderr
    np.testing.assert_allclose(r.eigenvalues, w[::-1][:2], rtol=1e-9)
    assert np.nanmax(d.nodes) == pytest.approx(w.max(), rel=1e-9)
    assert p.eigenvalue == pytest.approx(w[np.argmax(np.abs(w))], rel=1e-6)


def test_packed_blocks_on_one_device_match_step_by_step(mlp):
  loss, params, batches, h, w, _ = mlp
  op = deeplanczos.HessianOperator(loss, params, batches, **one_device())
  # On one device every leaf is small and whole: one packed group.
  packing = basis_lib.packing(op.template, op.shardings, basis_lib.zeros(
      op.template, 10, op.shardings))
  assert [sorted(g) for g in packing.groups] == [
      list(range(len(jax.tree.leaves(params))))]
  one = deeplanczos.lanczos(loss, params, batches, 4, ncv=9, tol=1e-10,
                            max_hvps=400, show_pbar=False,
                            data_on_device=False, **one_device())
  for steps in (3, "auto"):
    r = deeplanczos.lanczos(op, 4, ncv=9, tol=1e-10, max_hvps=400,
                            show_pbar=False, steps_per_call=steps)
    assert r.converged and r.krylov_hvps == one.krylov_hvps > 9  # restarts
    np.testing.assert_allclose(r.eigenvalues, w[::-1][:4], rtol=1e-9)
    np.testing.assert_allclose(r.ritz_history, one.ritz_history, rtol=1e-9)
    for i, v in enumerate(unstack(r.eigenvectors, 4)):
      assert np.linalg.norm(h @ v - r.eigenvalues[i] * v) <= 1e-9 * w[-1]
  # The random start, drawn in the start program, is op.random_vector's.
  given = deeplanczos.lanczos(op, 4, ncv=9, tol=1e-10, max_hvps=400,
                              show_pbar=False,
                              v0=op.random_vector(jax.random.key(0)))
  np.testing.assert_allclose(given.ritz_history, one.ritz_history, rtol=1e-9)


def test_packing_leaves_split_leaves_alone():
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh,
                                     jax.sharding.PartitionSpec("model"))
  template = {"a": np.zeros((3, 5)), "b": np.zeros(6, np.float32),
              "c": np.zeros(8), "d": np.zeros(7), "e": np.zeros(3, np.float32)}
  shardings = {"a": rep, "b": rep, "c": split, "d": rep, "e": rep}
  layout = [jax.ShapeDtypeStruct((4, *t.shape), t.dtype, sharding=rep)
            for t in jax.tree.leaves(template)]
  layout[2] = jax.ShapeDtypeStruct((4, 8), np.float64, sharding=split)
  packing = basis_lib.packing(template, shardings, layout)
  # Leaves in order a, b, c, d, e: c is split over the model axis.
  assert packing.groups == ((0, 3), (1, 4))
  rng = np.random.default_rng(0)
  stack = jax.tree.map(lambda t: rng.normal(size=(4, *t.shape)).astype(
      t.dtype), template)
  groups, others = packing.pack(stack, lead=1)
  assert [g.shape for g in groups] == [(4, 22), (4, 9)]
  assert len(others) == 1 and others[0] is stack["c"]
  back = packing.unpack((groups, others), lead=1)
  jax.tree.map(np.testing.assert_array_equal, back, stack)


def test_head_is_the_first_slots_bit_for_bit():
  """``basis.head`` takes slots by a product with the identity: exact in
  every dtype, at every magnitude, and on a split leaf."""
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  split = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, "model"))
  rng = np.random.default_rng(0)
  basis = {"a": jnp.asarray(rng.normal(size=(9, 4, 3)) * 1e-30, jnp.float32),
           "b": jnp.asarray(rng.normal(size=(9, 5)) * 1e30),
           "c": jnp.asarray(rng.normal(size=(9, 6)), jnp.bfloat16),
           "d": jax.device_put(rng.normal(size=(9, 8)).astype(np.float32),
                               split)}
  head = basis_lib.head(basis, 4)
  for name, leaf in basis.items():
    assert head[name].dtype == leaf.dtype
    np.testing.assert_array_equal(np.asarray(head[name], np.float64),
                                  np.asarray(leaf[:4], np.float64))


def test_blocks_through_breakdown_and_repeated_eigenvalues():
  spectrum = [5, 5, 5, 3, 2, 2, 1, 0.5, 0.5, 0.1, -1, -1]
  loss, params, x, y, h = helpers.quadratic_problem(
      spectrum, shapes=((4,), (2, 4)))
  r = deeplanczos.lanczos(loss, params, [(x, y)], 5, tol=1e-10,
                          show_pbar=False, steps_per_call=4)
  np.testing.assert_allclose(r.eigenvalues, [5, 5, 5, 3, 2], rtol=1e-10)
  vs = np.stack(unstack(r.eigenvectors, 5))
  np.testing.assert_allclose(vs @ vs.T, np.eye(5), atol=1e-10)
  np.testing.assert_allclose(vs @ h @ vs.T, np.diag(r.eigenvalues),
                             atol=1e-9)
  with pytest.raises(ValueError, match="steps_per_call must be None, 'auto'"):
    deeplanczos.lanczos(loss, params, [(x, y)], 2, steps_per_call=0)


@pytest.mark.parametrize("estimator,budget,rtol", [
    (deeplanczos.hutchinson, {"num_probes": 7}, 1e-12),
    (deeplanczos.hutchpp, {"num_hvps": 15}, 1e-10)])
def test_trace_in_batched_passes_matches_one_product_at_a_time(
    mlp, estimator, budget, rtol):
  loss, params, batches, h, _, _ = mlp
  op = deeplanczos.HessianOperator(loss, params, batches)
  one = estimator(op, show_pbar=False, **budget)
  many = estimator(op, probes_per_call=4, show_pbar=False, **budget)
  np.testing.assert_allclose(many.samples, one.samples, rtol=rtol)
  np.testing.assert_allclose(many.estimate, one.estimate, rtol=rtol)
  assert many.num_hvps == one.num_hvps == next(iter(budget.values()))
  # Each sample is z^T H z for a Rademacher z of the dense Hessian's size.
  assert abs(many.estimate - np.trace(h)) < 4 * many.stderr + 1e-9


@pytest.mark.parametrize("estimator,budget", [
    (deeplanczos.hutchinson, {"num_probes": 9}),
    (deeplanczos.hutchpp, {"num_hvps": 24})])
@pytest.mark.parametrize("on", [{}, one_device()])
def test_trace_in_compiled_loop_matches_streamed(mlp, monkeypatch, estimator,
                                                 budget, on):
  loss, params, batches, h, _, _ = mlp
  calls, ranks = [], []
  loop = trace_lib._products_loop  # pylint: disable=protected-access

  def counted(*args, **kwargs):
    calls.append(1)
    out = loop(*args, **kwargs)
    ranks.append(int(out[1]))
    return out
  monkeypatch.setattr(trace_lib, "_products_loop", counted)
  # Streamed: a product and a host read at a time.
  one = estimator(loss, params, batches, show_pbar=False,
                  data_on_device=False, **budget, **on)
  assert not calls
  op = deeplanczos.HessianOperator(loss, params, batches, **on)
  # On the devices the products of each phase run in compiled blocks: one
  # product, then blocks of about a second (here the rest of the phase);
  # a second call starts with full blocks (the step time remembered).
  for _ in range(2):
    many = estimator(op, show_pbar=False, **budget)
    assert calls and many.num_hvps == one.num_hvps
    np.testing.assert_allclose(many.samples, one.samples, rtol=1e-10)
    np.testing.assert_allclose(many.estimate, one.estimate, rtol=1e-10)
    assert abs(many.estimate - np.trace(h)) < 4 * many.stderr
    calls.clear()
  # Hutch++ with a sketch of smaller rank than asked (H S has rank 2): the
  # loop keeps nothing of the third and fourth sketch products.
  if estimator is deeplanczos.hutchpp:
    loss, params, x, y, _ = helpers.quadratic_problem(
        [6.0, 3.0, 0, 0, 0, 0, 0])
    ranks.clear()
    r = deeplanczos.hutchpp(loss, params, [(x, y)], num_hvps=12,
                            show_pbar=False)
    assert max(ranks) == 2
    np.testing.assert_allclose(r.estimate, 9.0, rtol=1e-10)
    np.testing.assert_allclose(r.samples, 0.0, atol=1e-10)


def test_matvecs_of_streamed_data_are_one_pass_each(mlp):
  loss, params, batches, h, _, _ = mlp
  streamed = deeplanczos.HessianOperator(loss, params, batches,
                                         data_on_device=False)
  vs = jax.tree.map(lambda a: np.stack([a, 2 * a]), params)
  hv = streamed.matvecs(vs)
  assert streamed.num_matvecs == 2
  np.testing.assert_allclose(helpers.flat(jax.tree.map(lambda a: a[1], hv)),
                             2 * h @ helpers.flat(params), rtol=1e-10)


@pytest.mark.parametrize("on", [{}, one_device()])
def test_slq_in_batched_passes_matches_one_probe_at_a_time(mlp, on):
  loss, params, batches, _, w, _ = mlp
  # Streamed: one probe at a time, a product and a host read a step.
  one = deeplanczos.spectral_density(loss, params, batches, num_probes=5,
                                     num_steps=len(w), key=jax.random.key(1),
                                     show_pbar=False, data_on_device=False,
                                     **on)
  op = deeplanczos.HessianOperator(loss, params, batches, **on)
  assert op.loops_run_fast()
  # On the devices every probe's steps are one compiled loop: one probe at a
  # time, and 3 at a time (a batch of 3 and one of 2) where the probes break
  # down (the Hessian has repeated eigenvalues) at steps of their own.
  for probes_per_call in (1, 3):
    many = deeplanczos.spectral_density(op, num_probes=5, num_steps=len(w),
                                        key=jax.random.key(1),
                                        show_pbar=False,
                                        probes_per_call=probes_per_call)
    np.testing.assert_array_equal(np.isnan(many.nodes), np.isnan(one.nodes))
    np.testing.assert_allclose(many.nodes, one.nodes, atol=1e-9)
    np.testing.assert_allclose(many.weights, one.weights, atol=1e-9)
    np.testing.assert_allclose(many.density, one.density, rtol=1e-8,
                               atol=1e-10)
    # Each probe's nodes lie in the dense spectrum; its largest is the top.
    assert np.nanmax(many.nodes) == pytest.approx(w.max(), rel=1e-9)


def test_auto_probes_per_call_takes_what_memory_holds(mlp, monkeypatch):
  """'auto' fills half the free memory: the compiler's bytes for its count
  of probes (and their bases) fit, those for one more do not (to 5%)."""
  loss, params, batches, _, w, _ = mlp
  op = deeplanczos.HessianOperator(loss, params, batches)
  steps = len(w)
  whole = helpers.flat(params).nbytes
  kept = 3 * plan_lib.shard_bytes(op.template, op.shardings) + (
      steps + 1) * whole // op.mesh.size

  @functools.cache
  def need(count):  # what the compiler says ``count`` probes take
    return op.batched_pass_bytes(count) + count * kept

  for fits in (1, 3, 6):
    free = 2 * need(fits)
    monkeypatch.setattr(plan_lib, "free_device_bytes", lambda f=free: f)
    count = deeplanczos.probes_per_call(op, 10, basis_vectors=steps + 1)
    assert need(count) <= 1.05 * free / 2 and need(count + 1) > 0.95 * free / 2
    assert abs(count - fits) <= 1
  # The methods take 'auto'; the answer is the one-at-a-time one.
  auto = deeplanczos.spectral_density(op, num_probes=4, num_steps=steps,
                                      show_pbar=False, probes_per_call="auto")
  one = deeplanczos.spectral_density(op, num_probes=4, num_steps=steps,
                                     show_pbar=False)
  np.testing.assert_allclose(auto.nodes, one.nodes, atol=1e-9)
  with pytest.raises(ValueError, match="positive integer or 'auto'"):
    deeplanczos.hutchinson(op, probes_per_call="many")
  # Moved to other parameters, the operator compiles no pass to size again.
  moved = op.with_params(params)
  monkeypatch.setattr(operator_lib, "_many", None)
  assert moved.batched_pass_bytes(2) == op.batched_pass_bytes(2)
