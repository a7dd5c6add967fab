"""The power method against dense Hessians and prescribed spectra."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deeplanczos
from deeplanczos import InitPowerMethodVector
from deeplanczos import PowerMethodIterate
from deeplanczos._src import tree_math
from tests import helpers


def dominant(h):
  w, v = np.linalg.eigh(h)
  i = np.argmax(np.abs(w))
  return w[i], v[:, i], w


def test_init_vector_shapes_norm_and_determinism():
  loss, params, x, y = helpers.mlp_problem()
  del loss, x, y
  v = InitPowerMethodVector(jax.random.key(3), params)
  assert jax.tree.structure(v) == jax.tree.structure(params)
  for a, p in zip(jax.tree.leaves(v), jax.tree.leaves(params)):
    assert a.shape == p.shape and a.dtype == p.dtype
  np.testing.assert_allclose(np.linalg.norm(helpers.flat(v)), 1.0, rtol=1e-12)
  again = InitPowerMethodVector(jax.random.key(3), params)
  other = InitPowerMethodVector(jax.random.key(4), params)
  np.testing.assert_array_equal(helpers.flat(v), helpers.flat(again))
  assert np.abs(helpers.flat(v) @ helpers.flat(other)) < 0.9


@pytest.mark.parametrize("kind", ["normal", "rademacher"])
def test_random_vectors_are_each_leaf_drawn_alone(kind):
  # Small replicated leaves are drawn in one program: each must still be
  # jax's own draw of that leaf with its key, on one device and on a mesh.
  from deeplanczos._src import operator as operator_lib  # pylint: disable=g-import-not-at-top
  sampler = {"normal": jax.random.normal,
             "rademacher": jax.random.rademacher}[kind]
  like = {"w": jnp.zeros((64, 32), jnp.float32), "b": jnp.zeros(32),
          "c": jnp.zeros((5, 3), jnp.float64), "h": jnp.zeros(7, jnp.bfloat16),
          "e": jnp.zeros((3, 3), jnp.float64), "big": jnp.zeros((300, 300)),
          "none": jnp.zeros(0)}
  mesh = deeplanczos.make_mesh([("data", 8)])
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  spread = {k: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data" if k == "w" else None)) for k in like}
  for impl in ("threefry2x32", "rbg"):
    key = jax.random.key(7, impl=impl)
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    alone = treedef.unflatten([sampler(k, l.shape, l.dtype)
                               for k, l in zip(keys, leaves)])
    for shardings in (jax.tree.map(lambda _: one, like), spread):
      v = operator_lib.random_vector_fn(like, shardings, kind=kind,
                                        normalize=False)(key)
      for name in like:
        assert v[name].dtype == like[name].dtype, name
        np.testing.assert_array_equal(v[name], alone[name], err_msg=name)
      assert v["w"].sharding == shardings["w"]


def test_mlp_matches_dense_hessian():
  loss, params, x, y = helpers.mlp_problem()
  h, unravel = helpers.dense_hessian(loss, params, x, y)
  lam, vec, spectrum = dominant(h)
  assert np.sort(np.abs(spectrum))[-2] < 0.9 * abs(lam)  # a usable gap
  v0 = InitPowerMethodVector(jax.random.key(0), params)
  batches = helpers.batches_of(x, y, [16, 16, 16, 12])
  v, hist = PowerMethodIterate(loss, params, batches, 300, V0=v0,
                               show_pbar=False)
  np.testing.assert_allclose(hist["eigenvalue"][-1], lam, rtol=1e-6)
  np.testing.assert_allclose(np.sqrt(hist["alpha"][-1]), abs(lam), rtol=1e-6)
  assert abs(helpers.flat(v) @ vec) > 0.999
  assert jax.tree.structure(v) == jax.tree.structure(params)
  assert set(hist) == {"alpha", "eigenvalue", "q", "iteration", "loss",
                       "seconds"}
  assert np.all(hist["seconds"] > 0)
  np.testing.assert_array_equal(hist["iteration"], np.arange(300))
  assert hist["q"][-1] > 1 - 1e-9
  np.testing.assert_allclose(hist["loss"][0], loss(params, x, y), rtol=1e-12)
  del unravel


def test_readme_usage_block():
  loss, params, x, y = helpers.mlp_problem()
  batch_iterable = [{"imgs": x[i:i + 20], "labels": y[i:i + 20]}
                    for i in range(0, len(x), 20)]
  parser = lambda batch: (batch["imgs"], batch["labels"])
  rng = jax.random.key(0)
  P = params  # pylint: disable=invalid-name
  V = InitPowerMethodVector(rng, P)  # pylint: disable=invalid-name
  num_iteraion = 300
  V, History = PowerMethodIterate(loss, P, batch_iterable, num_iteraion, V0=V,  # pylint: disable=invalid-name
                                  batch_parser=parser, show_pbar=True)
  lam, _, _ = dominant(helpers.dense_hessian(loss, params, x, y)[0])
  np.testing.assert_allclose(np.sqrt(History["alpha"][-1]), abs(lam),
                             rtol=1e-6)
  assert len(History["q"]) == len(History["iteration"]) == 300
  del V


def test_negative_dominant_eigenvalue_of_prescribed_quadratic():
  spectrum = [-5.0, 3.0, 2.0, 1.0, 0.5, -0.5, 0.1]
  loss, params, x, y, _ = helpers.quadratic_problem(spectrum)
  batches = helpers.batches_of(x, y, [3, 3, 1])
  _, hist = PowerMethodIterate(loss, params, batches, 200, show_pbar=False,
                               key=jax.random.key(1))
  np.testing.assert_allclose(hist["eigenvalue"][-1], -5.0, rtol=1e-10)
  np.testing.assert_allclose(hist["alpha"][-1], 25.0, rtol=1e-10)


def test_unequal_batches_are_weighted_by_size():
  spectrum = [4.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01]
  loss, params, x, y, h = helpers.quadratic_problem(spectrum, seed=3)
  batches = helpers.batches_of(x, y, [6, 1])
  # Averaging per-batch Hessians with equal weights would give another matrix.
  naive = 0.5 * (helpers.dense_hessian(loss, params, *batches[0])[0]
                 + helpers.dense_hessian(loss, params, *batches[1])[0])
  assert abs(dominant(naive)[0] - 4.0) > 0.1
  _, hist = PowerMethodIterate(loss, params, batches, 100, show_pbar=False)
  np.testing.assert_allclose(hist["eigenvalue"][-1], dominant(h)[0],
                             rtol=1e-10)


def test_tolerance_stops_early():
  loss, params, x, y, _ = helpers.quadratic_problem([5.0, 1, 1, 1, 1, 1, 1])
  _, hist = PowerMethodIterate(loss, params, [(x, y)], 500, tol=1e-12,
                               show_pbar=False)
  assert 2 <= len(hist["eigenvalue"]) < 500
  np.testing.assert_array_equal(hist["iteration"],
                                np.arange(len(hist["eigenvalue"])))
  np.testing.assert_allclose(hist["eigenvalue"][-1], 5.0, rtol=1e-10)


def test_batch_sources_callable_and_grain():
  loss, params, x, y = helpers.mlp_problem()
  lam = dominant(helpers.dense_hessian(loss, params, x, y)[0])[0]
  from_callable = lambda: iter(helpers.batches_of(x, y, [30, 30]))
  dataset = grain.MapDataset.source(np.arange(len(x))).batch(25).map(
      lambda idx: (x[idx], y[idx]))
  for source in (from_callable, dataset):
    _, hist = PowerMethodIterate(loss, params, source, 300, show_pbar=False)
    np.testing.assert_allclose(hist["eigenvalue"][-1], lam, rtol=1e-6)


def test_hvp_traced_once_per_batch_shape():
  base, params, x, y = helpers.mlp_problem()
  batches = helpers.batches_of(x, y, [25, 25, 10])
  counts = []
  for iterations in (1, 6):
    traces = []

    def loss(p, xb, yb, traces=traces):
      traces.append(xb.shape)
      return base(p, xb, yb)

    PowerMethodIterate(loss, params, batches, iterations, show_pbar=False)
    counts.append(sorted(traces))
  # One shape check and one trace of the step for each batch shape, however
  # many iterations run.
  assert counts[0] == counts[1] == [(10, 4), (10, 4), (25, 4), (25, 4)]


def test_float32_and_bfloat16():
  loss64, p64, x, y = helpers.mlp_problem()
  lam = dominant(helpers.dense_hessian(loss64, p64, x, y)[0])[0]
  for dtype, rtol in ((jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)):
    params = jax.tree.map(lambda a, d=dtype: a.astype(d), p64)
    def loss(p, xb, yb, d=dtype):
      return loss64(jax.tree.map(lambda a: a.astype(jnp.float32), p),
                    xb.astype(jnp.float32), yb).astype(jnp.float32)
    batches = helpers.batches_of(x.astype(np.float32), y, [30, 30])
    v, hist = PowerMethodIterate(loss, params, batches, 200, show_pbar=False)
    assert all(a.dtype == dtype for a in jax.tree.leaves(v))
    np.testing.assert_allclose(hist["eigenvalue"][-1], lam, rtol=rtol)


def test_dot_products_accumulate_in_float32_for_bfloat16():
  a = {"w": jnp.full((4096,), 1.0, jnp.bfloat16)}
  b = {"w": jnp.full((4096,), 1.0 + 2.0 ** -7, jnp.bfloat16)}
  out = tree_math.tree_vdot(a, b)
  assert out.dtype == jnp.float32
  assert float(out) == 4096 * (1 + 2.0 ** -7)


def test_show_pbar_false_prints_nothing_and_true_prints(capsys):
  loss, params, x, y = helpers.mlp_problem()
  PowerMethodIterate(loss, params, [(x, y)], 3, show_pbar=False)
  out = capsys.readouterr()
  assert out.out == "" and out.err == ""
  PowerMethodIterate(loss, params, [(x, y)], 3, show_pbar=True)
  assert "power method" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_a_bar_that_ends_early_ends_at_its_count(capsys, method):
  loss, params, x, y = helpers.mlp_problem()
  if method == "power":
    n = len(deeplanczos.power_iteration(
        loss, params, [(x, y)], num_iterations=1000, tol=1e-4,
        show_pbar=True).eigenvalues)
  else:
    n = deeplanczos.lanczos(loss, params, [(x, y)], 2, max_hvps=1000,
                            show_pbar=True).num_hvps - 2
  assert n < 100
  last = capsys.readouterr().err.strip().split("\r")[-1]
  assert "100%" in last and f" {n}/{n} " in last, last


def test_operator_repr_says_what_it_is():
  loss, params, x, y = helpers.mlp_problem()
  op = deeplanczos.HessianOperator(loss, params, [(x[:50], y[:50]),
                                                  (x[50:], y[50:])],
                                   curvature="fisher")
  assert repr(op) == (
      "HessianOperator(curvature='fisher', parameters=43 in 4 arrays "
      "(float64), mesh={'data': 1}, data_axis='data', accumulate='split', "
      "data not read yet, products=0)")
  op.matvec(op.random_vector(jax.random.key(0)))
  assert repr(op).endswith("data on the devices, 60 examples, products=1)")


class TestBadInput:

  def setup_method(self):
    self.loss, self.params, self.x, self.y = helpers.mlp_problem()
    self.batches = [(self.x, self.y)]

  def run(self, *args, **kwargs):
    kwargs.setdefault("show_pbar", False)
    return PowerMethodIterate(*args, **kwargs)

  def test_v0_structure(self):
    v0 = {"params": {"Dense_0": self.params["params"]["Dense_0"]}}
    with pytest.raises(ValueError, match="tree structure"):
      self.run(self.loss, self.params, self.batches, 2, V0=v0)

  def test_v0_shape(self):
    v0 = jax.tree.map(lambda a: a, self.params)
    v0["params"]["Dense_0"]["kernel"] = jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"shape \(4, 5\).*got shape \(4, 6\)"):
      self.run(self.loss, self.params, self.batches, 2, V0=v0)

  def test_v0_dtype(self):
    v0 = jax.tree.map(lambda a: a.astype(jnp.float32), self.params)
    with pytest.raises(ValueError, match="dtype float64.*dtype float32"):
      self.run(self.loss, self.params, self.batches, 2, V0=v0)

  def test_v0_zero(self):
    v0 = jax.tree.map(jnp.zeros_like, self.params)
    with pytest.raises(ValueError, match="non-zero"):
      self.run(self.loss, self.params, self.batches, 2, V0=v0)

  def test_empty_iterable(self):
    with pytest.raises(ValueError, match="gave no batches"):
      self.run(self.loss, self.params, [], 2)

  def test_generator_is_refused(self):
    gen = (b for b in self.batches)
    with pytest.raises(TypeError, match="one-shot iterator"):
      self.run(self.loss, self.params, gen, 2)

  def test_reiterable_empty_on_second_pass(self):
    class Once:
      def __init__(self, batches):
        self.batches = list(batches)
      def __iter__(self):
        out, self.batches = self.batches, []
        return iter(out)
    with pytest.raises(ValueError, match="Pass 2 over the data gave no batch"):
      self.run(self.loss, self.params, Once(self.batches), 3,
               data_on_device=False)

  def test_not_iterable(self):
    with pytest.raises(TypeError, match="re-iterable"):
      self.run(self.loss, self.params, 5, 2)

  def test_non_scalar_loss(self):
    loss = lambda p, x, y: jnp.sum(x, axis=1)
    with pytest.raises(ValueError, match=r"floating scalar.*\(60,\)"):
      self.run(loss, self.params, self.batches, 2)

  def test_parser_wrong_arity(self):
    with pytest.raises(TypeError, match="a tuple of 1 items"):
      self.run(self.loss, self.params, self.batches, 2,
               batch_parser=lambda b: (b[0],))
    with pytest.raises(TypeError, match="without batch_parser|Without"):
      self.run(self.loss, self.params, [{"x": self.x, "y": self.y}], 2)

  def test_mismatched_leading_dimensions(self):
    with pytest.raises(ValueError, match="leading batch dimension"):
      self.run(self.loss, self.params, [(self.x, self.y[:-1])], 2)

  def test_non_finite_hvp_names_iteration_and_batch(self):
    def loss(p, x, y):
      bad = jnp.any(x[:, 0] > 100.0)
      return jnp.where(bad, jnp.nan, self.loss(p, x, y))
    x_bad = self.x.copy()
    x_bad[35, 0] = 1e3
    batches = helpers.batches_of(x_bad, self.y, [20, 20, 20])
    with pytest.raises(ValueError, match="at iteration 0 at batch 1"):
      self.run(loss, self.params, batches, 2)

  def test_num_iteration(self):
    with pytest.raises(ValueError, match="positive integer"):
      self.run(self.loss, self.params, self.batches, 0)


def test_public_names():
  assert deeplanczos.PowerMethodIterate is PowerMethodIterate
  assert deeplanczos.InitPowerMethodVector is InitPowerMethodVector
