"""Pod-scale layout and the dry run, on 8 fake CPU devices.

The split layout (FSDP) against one device; models written as large models
are (nn.scan, nn.remat, DenseGeneral kernels with partitioning metadata);
``deeplanczos.plan`` against the compiled real run and a plain jit HVP.
"""

import flax
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import deeplanczos
from deeplanczos import data
from deeplanczos import models
from deeplanczos._src import batches as batches_lib
from deeplanczos._src import plan as plan_lib
from tests import helpers

LENGTH, VOCAB = 8, 16


def _transformer(mesh=None, num_layers=2, **options):
  rows = None if mesh is None else NamedSharding(mesh, P("data"))
  return models.Transformer(vocab_size=VOCAB, max_len=LENGTH, d_model=32,
                            num_heads=4, num_layers=num_layers, mlp_dim=64,
                            activation_sharding=rows, **options)


def _problem(model, mesh, *, fsdp=True):
  tokens = jnp.zeros((8, LENGTH), jnp.int32)
  boxed = model.init(jax.random.key(0), tokens)
  params = flax.core.meta.unbox(boxed)
  shardings = deeplanczos.sharding_from_metadata(boxed, mesh)
  if fsdp:
    shardings = deeplanczos.split_over_all_devices(params, shardings)
  x, y = data.synthetic_tokens(16, LENGTH, VOCAB)

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean()

  return loss, params, shardings, x, y


def _batches(x, y):
  return [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(y), 8)]


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(w))))
             for u, w in zip(jax.tree.leaves(jax.device_get(a)),
                             jax.tree.leaves(jax.device_get(b))))


def test_large_model_forms_on_fsdp_and_tensor_parallel_meshes():
  """nn.scan + nn.remat + DenseGeneral head kernels (GQA) on 8 devices."""
  options = dict(scan_layers=True, remat=True, head_kernels=True,
                 num_kv_heads=2)
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  loss, params, tensor_parallel, x, y = _problem(_transformer(**options),
                                                 mesh, fsdp=False)
  one = deeplanczos.HessianOperator(loss, params, _batches(x, y))
  v = jax.device_get(one.random_vector(jax.random.key(1)))
  want = one.matvec(v)

  # FSDP, activations constrained over the data axis: the split layout.
  constrained, _, fsdp, _, _ = _problem(_transformer(mesh, **options), mesh)
  op = deeplanczos.HessianOperator(constrained, params, _batches(x, y),
                                   shardings=fsdp)
  assert op.kernel.accumulate == "split"
  hv = op.matvec(op.check_vector(v))
  assert _max_diff(hv, want) < 1e-5
  assert jax.tree.leaves(hv)[0].sharding == jax.tree.leaves(op.shardings)[0]

  # Tensor parallel (parameters whole over the data axis): the replicated
  # layout by default, but flax's DenseGeneral cannot trace inside shard_map
  # (its init shape check applies the rank-3 partitioning to a flattened
  # kernel), so it gives way to the split layout with a warning.
  op = deeplanczos.HessianOperator(loss, params, _batches(x, y),
                                   shardings=tensor_parallel)
  assert op.kernel.accumulate == "replicated"
  with pytest.warns(UserWarning, match="accumulate='split'"):
    hv = op.matvec(op.check_vector(v))
  assert op.kernel.accumulate == "split"
  assert _max_diff(hv, want) < 1e-5


def _mlp(p, xb):
  return jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _cross_entropy(out, yb):
  return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()


@pytest.mark.parametrize("curvature,masked", [
    ("hessian", False), ("hessian", True), ("ggn", True), ("fisher", True)])
def test_split_equals_replicated_layout_and_the_dense_answer(curvature,
                                                             masked):
  """Both layouts, data kept on the devices and streamed, masks and all."""
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(8, 8)) / 3, "b1": rng.normal(size=8) / 3,
            "w2": rng.normal(size=(8, 4)) / 3, "b2": np.zeros(4)}
  shardings = {k: NamedSharding(mesh, P(*spec)) for k, spec in {
      "w1": ("data", "model"), "b1": ("data",), "w2": ("model", "data"),
      "b2": ()}.items()}
  x, y = rng.normal(size=(14, 8)), rng.integers(0, 4, size=14)
  mask = (np.arange(14) % 3 != 0).astype(np.float64) if masked else np.ones(14)
  # A short last batch: padded to the data axis, so the per-example program.
  batches = [(x[a:b], y[a:b], mask[a:b]) for a, b in ((0, 8), (8, 14))]
  loss = lambda p, xb, yb: _cross_entropy(_mlp(p, xb), yb)
  v = jax.tree.map(lambda a: rng.normal(size=a.shape), params)

  products = []
  for accumulate in ("replicated", "split"):
    for on_device in (True, False):
      op = deeplanczos.HessianOperator(
          loss, params, batches, shardings=shardings, accumulate=accumulate,
          data_on_device=on_device, curvature=curvature, model_fn=_mlp,
          output_loss=_cross_entropy, batch_parser=lambda b: b)
      products.append(op.matvec(op.check_vector(v)))
      assert op.num_examples == int(mask.sum())
      assert jax.tree.leaves(products[-1])[3].sharding == shardings["w2"]
  one = deeplanczos.HessianOperator(
      loss, params, batches, curvature=curvature, model_fn=_mlp,
      output_loss=_cross_entropy, batch_parser=lambda b: b)
  products.append(one.matvec(v))
  for other in products[1:]:
    assert _max_diff(products[0], other) < 1e-12
  if curvature == "hessian":
    keep = mask > 0
    h, unravel = helpers.dense_hessian(loss, params, x[keep], y[keep])
    assert _max_diff(products[0], unravel(h @ helpers.flat(v))) < 1e-12


def test_collectives_counts_loops():
  mesh = deeplanczos.make_mesh([("data", 8)])

  def f(a):
    def local(a):
      a = lax.all_gather(a, "data", tiled=True)[:1] + a
      return lax.fori_loop(
          0, 3, lambda i, b: lax.all_gather(b, "data", tiled=True)[:1] * 2,
          a)
    return jax.shard_map(local, mesh=mesh, in_specs=P("data"),
                         out_specs=P("data"))(a)

  compiled = jax.jit(f).lower(jnp.ones(8)).compile()
  assert plan_lib.collectives(compiled.as_text())["all-gather"] == (1, 1)


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=s),
                      tree, shardings)


def test_dry_run_bytes_equal_the_real_runs_and_gathers_sit_in_the_loop():
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  model = _transformer(mesh, num_layers=4, scan_layers=True, remat=True,
                       head_kernels=True)
  loss, params, shardings, x, y = _problem(model, mesh)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        params)
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((8, *a.shape[1:]),
                                                      a.dtype), (x, y))
  planned = deeplanczos.plan(loss, shapes, batch, mesh=mesh,
                             shardings=shardings, num_batches=2, ncv=10)
  assert planned.accumulate == "split"
  pass_cost, reorth = planned.programs
  assert reorth.name.startswith("reorthogonalize against the 11-vector")

  # The real run: a streaming operator's program for one batch, compiled for
  # the arrays it runs on.
  op = deeplanczos.HessianOperator(loss, params, _batches(x, y),
                                   shardings=shardings, data_on_device=False)
  v = op.random_vector(jax.random.key(1))
  weight_dtype = op._weight_dtype  # pylint: disable=protected-access
  acc, stats = op._programs.start(v, weight_dtype=weight_dtype)  # pylint: disable=protected-access
  host = batches_lib.to_host_batch(x[:8], y[:8], None, 8, local_data=4,
                                   weight_dtype=weight_dtype)
  xb, yb, wb = batches_lib.place(host, NamedSharding(mesh, P("data")))
  real = op._programs.batch_step.lower(  # pylint: disable=protected-access
      op.params, v, acc, stats, np.int32(0), xb, yb, wb, jax.random.key(0),
      padded=False).compile()
  assert plan_lib.program_cost("real", real).bytes == pass_cost.bytes

  # Parameters' gathers inside the layer loop, products reduce-scattered;
  # bytes within 1.2x of a plain jit HVP with the same shardings.
  gathers_in_loop, gathers_outside = pass_cost.collectives["all-gather"]
  assert gathers_in_loop > gathers_outside
  plain = jax.jit(
      lambda p, v, xb, yb: jax.jvp(jax.grad(lambda q: loss(q, xb, yb)), (p,),
                                   (v,))[1],
      out_shardings=shardings).lower(
          _abstract(shapes, shardings), _abstract(shapes, shardings),
          *jax.tree.map(lambda a: jax.ShapeDtypeStruct(
              a.shape, a.dtype, sharding=NamedSharding(mesh, P("data"))),
                        batch)).compile()
  assert pass_cost.bytes <= 1.2 * plan_lib.program_cost("plain", plain).bytes

  # The stored state: parameters split over 8 devices, an 11-vector basis.
  n = sum(a.size for a in jax.tree.leaves(params))
  assert planned.num_params == n
  assert planned.state["parameters"] == plan_lib.shard_bytes(shapes,
                                                             shardings)
  basis = [b for k, b in planned.state.items() if k.startswith("Krylov")]
  itemsize = jnp.result_type(*jax.tree.leaves(params)).itemsize
  assert basis and n * 11 * itemsize / 8 <= basis[0] <= (
      n * 11 * itemsize / 8 * 1.1)
  table = planned.table()
  assert "HVP of one batch" in table and "Krylov basis (11 vectors" in table


def test_plan_on_a_tpu_topology_without_a_tpu():
  pytest.importorskip("libtpu", reason="needs the libtpu wheel (jax[tpu])")
  mesh = deeplanczos.topology_mesh("v5e:2x2", [("data", 2), ("model", 2)])
  model = _transformer(mesh, scan_layers=True, head_kernels=True,
                       dtype=jnp.bfloat16)
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         jax.ShapeDtypeStruct((1, LENGTH), jnp.int32))
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                        flax.core.meta.unbox(boxed))
  loss = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, xb).astype(jnp.float32), yb).mean()
  token = jax.ShapeDtypeStruct((4, LENGTH), jnp.int32)
  planned = deeplanczos.plan(
      loss, shapes, (token, token), mesh=mesh,
      shardings=deeplanczos.split_over_all_devices(
          shapes, deeplanczos.sharding_from_metadata(boxed, mesh)))
  assert planned.device_kind == "TPU v5 lite"
  assert planned.fits() and planned.seconds_per_hvp > 0


def test_topology_mesh_names_what_it_needs():
  with pytest.raises(ValueError, match="v5e:8x8"):
    deeplanczos.topology_mesh("no-such-chip:1x1")


def test_bfloat16_parameters_end_to_end_against_the_dense_answer():
  """bf16 parameters and products, float32 basis and scalars, on FSDP."""
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(8, 16)) / 3, "b1": rng.normal(size=16) / 3,
            "w2": rng.normal(size=(16, 4)) / 3, "b2": np.zeros(4)}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
  x, y = rng.normal(size=(64, 8)), rng.integers(0, 4, size=64)
  loss = lambda p, xb, yb: _cross_entropy(
      _mlp(p, xb.astype(jnp.bfloat16)).astype(jnp.float32), yb)
  batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
  shardings = deeplanczos.infer_sharding(params, mesh, fsdp_axis="data",
                                         min_size=16)
  op = deeplanczos.HessianOperator(loss, params, batches, shardings=shardings)
  assert op.kernel.accumulate == "split"
  r = deeplanczos.lanczos(op, 3, tol=1e-2, show_pbar=False)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h, _ = helpers.dense_hessian(
      lambda p, xb, yb: _cross_entropy(_mlp(p, xb), yb), p64, x, y)
  top = np.sort(np.linalg.eigvalsh(h))[::-1][:3]
  assert r.converged
  np.testing.assert_allclose(r.eigenvalues, top, rtol=2e-2)
  assert {l.dtype for l in jax.tree.leaves(r.eigenvectors)} == {
      np.dtype("float32")}
  power = deeplanczos.power_iteration(op, num_iterations=40,
                                      show_pbar=False)
  np.testing.assert_allclose(power.eigenvalue, top[0], rtol=2e-2)
  assert {l.dtype for l in jax.tree.leaves(power.eigenvector)} == {
      jnp.dtype(jnp.bfloat16)}
  # Lanczos's blocks ran first: the power method took op.matvec's program.
  assert op.pass_programs() == {"lanczos", "matvec"}
  # The trace and density in their compiled loops on a fresh operator (bf16
  # products, float32 sketch and bases).
  fresh = deeplanczos.HessianOperator(loss, params, batches,
                                      shardings=shardings)
  trace = deeplanczos.hutchpp(fresh, num_hvps=60, show_pbar=False)
  assert fresh.pass_programs() == {"trace"}
  assert abs(trace.estimate - np.trace(h)) < (4 * trace.stderr
                                              + 2e-2 * abs(np.trace(h)))
  density = deeplanczos.spectral_density(fresh.with_params(params),
                                         num_probes=2, num_steps=20,
                                         show_pbar=False, probes_per_call=2)
  assert fresh.pass_programs() == {"trace", "slq"}
  np.testing.assert_allclose(np.nanmax(density.nodes), top[0], rtol=2e-2)


def test_layout_probe_traces_once_over_streamed_passes_and_operators():
  mesh = deeplanczos.make_mesh([("data", 8)])
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(8, 8)), "b1": np.zeros(8),
            "w2": rng.normal(size=(8, 4)), "b2": np.zeros(4)}
  x, y = rng.normal(size=(32, 8)), rng.integers(0, 4, size=32)
  traces = []

  def loss(p, xb, yb):
    traces.append(xb.shape)
    return _cross_entropy(_mlp(p, xb), yb)

  batches = [(x[:16], y[:16]), (x[16:], y[16:])]
  op = deeplanczos.HessianOperator(loss, params, batches, mesh=mesh,
                                   data_on_device=False)
  assert op.kernel.accumulate == "replicated"
  v = op.random_vector(jax.random.key(0))
  op.matvec(v)
  first = len(traces)
  # the per-device check (2 rows a device) and the compiled step: 2 traces
  assert first == 2, traces
  op.matvec(v)
  again = deeplanczos.HessianOperator(loss, params, batches, mesh=mesh,
                                      data_on_device=False)
  again.matvec(v)
  assert len(traces) == first


def test_plan_refuses_an_unknown_method_before_compiling():
  def loss(p, xb, yb):
    pytest.fail("nothing is traced for a bad method")

  spec = jax.ShapeDtypeStruct((4, 2), jnp.float32)
  with pytest.raises(ValueError, match="method must be one of .* 'lanczoz'"):
    deeplanczos.plan(loss, {"w": spec}, (spec, spec), method="lanczoz")
