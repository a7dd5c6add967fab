"""On 8 fake CPU devices: meshes give the one-device numbers, truly sharded."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import deeplanczos
from deeplanczos import models
from deeplanczos._src import basis as basis_lib
from deeplanczos._src import sharding as sharding_lib
from tests import helpers

MESHES = [(8, 1), (4, 2), (2, 4)]
RULE = functools.partial(deeplanczos.infer_sharding, min_size=1)


def wide_mlp_problem(n=61):
  """An MLP whose leaves the model axis can split, on n examples."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 8))
  y = rng.integers(0, 4, size=n)
  model = helpers.TinyMLP(hidden=16, out=4)
  params = model.init(jax.random.key(0), x[:1])

  def loss(p, xb, yb):
    logp = jax.nn.log_softmax(model.apply(p, xb))
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  return loss, params, x, y


def test_eight_devices_present():
  assert jax.device_count() == 8


@pytest.fixture(scope="module")
def one_device():
  loss, params, x, y = wide_mlp_problem()
  batches = helpers.batches_of(x, y, [16, 16, 16, 8, 5])
  v, hist = deeplanczos.PowerMethodIterate(loss, params, batches, 40,
                                           show_pbar=False)
  return helpers.flat(v), hist


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_matches_one_device_and_is_sharded(shape, one_device):
  v1, hist1 = one_device
  loss, params, x, y = wide_mlp_problem()
  # Last batches of 8 and 5 rows: the 5 is padded to 8 rows and masked.
  batches = helpers.batches_of(x, y, [16, 16, 16, 8, 5])
  mesh = deeplanczos.make_mesh([("data", shape[0]), ("model", shape[1])])
  shardings = RULE(params, mesh)
  sharded = sharding_lib.put(params, shardings)
  traces = []

  def counted(p, xb, yb):
    traces.append(jax.tree.leaves(xb)[0].shape)
    return loss(p, xb, yb)

  v0 = deeplanczos.InitPowerMethodVector(jax.random.key(0), sharded)
  v, hist = deeplanczos.PowerMethodIterate(counted, sharded, batches, 40,
                                           V0=v0, show_pbar=False)
  for key in ("eigenvalue", "alpha", "q"):
    np.testing.assert_allclose(hist[key], hist1[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(helpers.flat(v), v1, rtol=1e-5, atol=1e-7)
  # The vector keeps the parameters' shardings, and really is split.
  kernel = v["params"]["Dense_0"]["kernel"]  # (8, 16)
  assert kernel.sharding == shardings["params"]["Dense_0"]["kernel"]
  assert v0["params"]["Dense_0"]["kernel"].sharding == kernel.sharding
  assert kernel.addressable_shards[0].data.shape == (8, 16 // shape[1])
  assert len({s.device for s in kernel.addressable_shards}) == 8
  # Batch shapes 16, 8 and 5 (5 is padded to a multiple of the data axis and
  # masked): each checked once (eval_shape) and traced once, not once per
  # iteration; the padded batch traces the loss per example.
  assert len(traces) == 6, traces


def test_params_sharded_by_jit_out_shardings_are_kept():
  loss, params, x, y = wide_mlp_problem()
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  shardings = RULE(params, mesh)
  made = jax.jit(lambda p: p, out_shardings=shardings)(params)
  op = deeplanczos.HessianOperator(loss, made, [(x, y)])
  assert op.mesh == mesh
  assert jax.tree.leaves(op.shardings) == jax.tree.leaves(shardings)
  v = op.random_vector(jax.random.key(0))
  hv = op.matvec(v)
  assert all(a.sharding == s for a, s in
             zip(jax.tree.leaves(hv), jax.tree.leaves(shardings)))
  h, _ = helpers.dense_hessian(loss, params, x, y)
  np.testing.assert_allclose(helpers.flat(hv), h @ helpers.flat(v),
                             rtol=1e-10, atol=1e-12)


def test_infer_sharding_rule():
  mesh = deeplanczos.make_mesh([("data", 2), ("model", 4)])
  params = {"big": jnp.zeros((6, 64)), "odd": jnp.zeros((3, 5, 7)),
            "small": jnp.zeros((8,))}
  s = deeplanczos.infer_sharding(params, mesh, min_size=16)
  assert s["big"].spec == P(None, "model")
  assert s["odd"].spec == P()
  assert s["small"].spec == P()


def test_flax_partitioning_metadata():
  model = models.Transformer(vocab_size=16, max_len=8, d_model=32,
                             num_heads=4, num_layers=1, mlp_dim=64)
  tokens = jnp.zeros((2, 8), jnp.int32)
  boxed = model.init(jax.random.key(0), tokens)
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  _, params, shardings = sharding_lib.resolve_shardings(boxed, mesh=mesh)
  spec = nn.get_partition_spec(boxed)
  flat_specs = jax.tree.leaves(spec, is_leaf=lambda s: isinstance(s, P))
  assert [s.spec for s in jax.tree.leaves(shardings)] == flat_specs
  kernel = params["params"]["_Block_0"]["Dense_0"]["kernel"]  # (32, 96)
  assert kernel.addressable_shards[0].data.shape == (32, 48)
  assert not any(isinstance(l, flax.core.meta.AxisMetadata)
                 for l in jax.tree.leaves(params))


def test_transformer_on_mesh_matches_one_device():
  model = models.Transformer(vocab_size=16, max_len=8, d_model=32,
                             num_heads=4, num_layers=1, mlp_dim=64)
  x = np.random.default_rng(0).integers(0, 16, size=(24, 8))
  y = np.roll(x, -1, axis=1)
  boxed = model.init(jax.random.key(0), x[:1])
  params = flax.core.meta.unbox(boxed)

  def loss(p, xb, yb):
    logp = jax.nn.log_softmax(model.apply(p, xb))
    return -jnp.mean(jnp.take_along_axis(logp, yb[..., None], axis=-1))

  batches = helpers.batches_of(x, y, [8, 8, 8])
  _, h1 = deeplanczos.PowerMethodIterate(loss, params, batches, 15,
                                         show_pbar=False)
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  specs = nn.get_partition_spec(boxed)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda s: isinstance(s, P))
  v, h8 = deeplanczos.PowerMethodIterate(loss, params, batches, 15,
                                         show_pbar=False, mesh=mesh,
                                         shardings=shardings)
  np.testing.assert_allclose(h8["eigenvalue"], h1["eigenvalue"], rtol=1e-5)
  out = v["params"]["_Block_0"]["Dense_1"]["kernel"]  # ("model", None)
  assert out.sharding.spec == P("model", None)


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="3 devices are present"):
    deeplanczos.make_mesh([("data", 2), ("model", 2)], jax.devices()[:3])
  with pytest.raises(ValueError, match="divisible by 3"):
    deeplanczos.make_mesh([("data", -1), ("model", 3)])
  mesh = deeplanczos.make_mesh([("data", -1), ("model", 2)])
  assert dict(mesh.shape) == {"data": 4, "model": 2}


def test_mesh_without_data_axis():
  loss, params, x, y = wide_mlp_problem()
  mesh = deeplanczos.make_mesh([("batch", 8)])
  with pytest.raises(ValueError, match="data axis is 'data'"):
    deeplanczos.PowerMethodIterate(loss, params, [(x, y)], 2, mesh=mesh,
                                   show_pbar=False)


def test_lanczos_density_trace_on_mesh_match_one_device():
  loss, params, x, y = wide_mlp_problem()
  batches = helpers.batches_of(x, y, [16, 16, 16, 8, 5])
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  shardings = RULE(params, mesh)
  on_mesh = dict(mesh=mesh, shardings=shardings, show_pbar=False)
  ref = deeplanczos.lanczos(loss, params, batches, 5, tol=1e-9,
                            show_pbar=False)
  got = deeplanczos.lanczos(loss, params, batches, 5, tol=1e-9, **on_mesh)
  np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-6)
  assert got.num_hvps == ref.num_hvps
  kernel = got.eigenvectors["params"]["Dense_0"]["kernel"]  # (5, 8, 16)
  assert kernel.sharding.spec == P(None, None, "model")
  assert kernel.addressable_shards[0].data.shape == (5, 8, 8)
  for i in range(5):
    a = helpers.flat(jax.tree.map(lambda l, i=i: l[i], got.eigenvectors))
    b = helpers.flat(jax.tree.map(lambda l, i=i: l[i], ref.eigenvectors))
    assert abs(a @ b) > 1 - 1e-6
  sub = dict(subset="Dense_1", tol=1e-9)
  np.testing.assert_allclose(
      deeplanczos.lanczos(loss, params, batches, 2, **sub, **on_mesh).eigenvalues,
      deeplanczos.lanczos(loss, params, batches, 2, **sub,
                          show_pbar=False).eigenvalues, rtol=1e-6)
  d_ref = deeplanczos.spectral_density(loss, params, batches, num_probes=2,
                                       num_steps=12, show_pbar=False)
  d_got = deeplanczos.spectral_density(loss, params, batches, num_probes=2,
                                       num_steps=12, **on_mesh)
  np.testing.assert_allclose(d_got.nodes, d_ref.nodes, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(d_got.density, d_ref.density, rtol=1e-5,
                             atol=1e-8)
  t_ref = deeplanczos.hutchpp(loss, params, batches, num_hvps=12,
                              show_pbar=False)
  t_got = deeplanczos.hutchpp(loss, params, batches, num_hvps=12, **on_mesh)
  np.testing.assert_allclose(t_got.estimate, t_ref.estimate, rtol=1e-6)
  # Batched: the probes drawn, deflated and the sketch grown on the mesh.
  t_many = deeplanczos.hutchpp(loss, params, batches, num_hvps=12,
                               probes_per_call=3, **on_mesh)
  np.testing.assert_allclose(t_many.samples, t_ref.samples, rtol=1e-6)


def test_mesh_that_disagrees_with_shardings_is_refused():
  loss, params, x, y = wide_mlp_problem()
  shardings = RULE(params, deeplanczos.make_mesh([("data", 4), ("model", 2)]))
  other = deeplanczos.make_mesh([("data", 8), ("model", 1)])
  with pytest.raises(ValueError, match=r"mesh of shape \{'data': 4, 'model': 2\}"):
    deeplanczos.HessianOperator(loss, params, [(x, y)], mesh=other,
                                shardings=shardings)


@pytest.mark.parametrize("shape", MESHES)
def test_fsdp_matches_one_device(shape, one_device):
  _, hist1 = one_device
  loss, params, x, y = wide_mlp_problem()
  batches = helpers.batches_of(x, y, [16, 16, 16, 8, 5])
  mesh = deeplanczos.make_mesh([("data", shape[0]), ("model", shape[1])])
  shardings = deeplanczos.infer_sharding(params, mesh, fsdp_axis="data",
                                         min_size=1)
  sharded = sharding_lib.put(params, shardings)
  v0 = deeplanczos.InitPowerMethodVector(jax.random.key(0), sharded)
  v, hist = deeplanczos.PowerMethodIterate(loss, sharded, batches, 40, V0=v0,
                                           show_pbar=False)
  for key in ("eigenvalue", "alpha", "q"):
    np.testing.assert_allclose(hist[key], hist1[key], rtol=1e-5, err_msg=key)
  # Parameters and vectors split over all 8 devices, the data axis included.
  kernel = v["params"]["Dense_0"]["kernel"]  # (8, 16)
  assert kernel.sharding == shardings["params"]["Dense_0"]["kernel"]
  assert "data" in str(kernel.sharding.spec)
  assert kernel.addressable_shards[0].data.size == 8 * 16 // 8
  ref = deeplanczos.lanczos(loss, params, batches, 3, tol=1e-9,
                            show_pbar=False)
  got = deeplanczos.lanczos(loss, sharded, batches, 3, tol=1e-9,
                            show_pbar=False)
  np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-6)


@pytest.mark.parametrize("shape,fsdp", [((8, 1), False), ((4, 2), False),
                                        ((2, 4), True)])
def test_lanczos_compiles_its_block_program_once_on_a_mesh(shape, fsdp,
                                                           caplog):
  """Every block and the explicit checks run the program compiled for the
  first block: the last ``w`` comes back on the vectors' shardings, not the
  basis's split over every device."""
  loss, params, x, y = wide_mlp_problem()
  w = np.linalg.eigvalsh(helpers.dense_hessian(loss, params, x, y)[0])
  mesh = deeplanczos.make_mesh([("data", shape[0]), ("model", shape[1])])
  shardings = RULE(params, mesh, fsdp_axis="data" if fsdp else None)
  op = deeplanczos.HessianOperator(
      loss, sharding_lib.put(params, shardings),
      helpers.batches_of(x, y, [16, 16, 16, 8, 5]), mesh=mesh,
      shardings=shardings)
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level("WARNING", logger="jax"):
      # A tol of its own: no other test in the process compiled its program.
      r = deeplanczos.lanczos(op, 3, tol=3e-9, show_pbar=False)
  finally:
    jax.config.update("jax_log_compiles", False)
  compiled = [rec.getMessage() for rec in caplog.records
              if rec.getMessage().startswith("Compiling jit(_steps)")]
  assert len(compiled) == 1, compiled
  assert r.converged and r.krylov_hvps > 1  # blocks: one step, then more
  np.testing.assert_allclose(r.eigenvalues, w[::-1][:3], rtol=1e-6)


def per_device_bytes(tree):
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values())


@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (1, 8)])
def test_basis_is_split_over_all_devices(shape):
  params = {"a": jnp.zeros((64, 32)), "b": jnp.zeros((32,)),
            "c": jnp.zeros((16, 8))}
  mesh = deeplanczos.make_mesh([("data", shape[0]), ("model", shape[1])])
  shardings = RULE(params, mesh)  # split over the model axis only
  basis = basis_lib.zeros(params, 21, shardings)
  total = sum(a.nbytes for a in jax.tree.leaves(basis))
  assert per_device_bytes(basis) <= 1.1 * total / 8
  vector = sharding_lib.put(params, shardings)
  assert per_device_bytes(vector) == sum(
      a.nbytes for a in jax.tree.leaves(vector)) // shape[1]


def test_split_over_all_devices_adds_fsdp_to_tensor_parallel():
  model = models.Transformer(vocab_size=16, max_len=8, d_model=32,
                             num_heads=4, num_layers=1, mlp_dim=64)
  boxed = model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  tp = deeplanczos.sharding_from_metadata(boxed, mesh)
  params = flax.core.meta.unbox(boxed)
  both = deeplanczos.split_over_all_devices(params, tp)
  kernel = both["params"]["_Block_0"]["Dense_0"]["kernel"]  # (32, 96)
  # The metadata's split over the model axis stays; the data axis is added.
  assert kernel.spec[1][0] == "model" and "data" in str(kernel.spec)
  placed = sharding_lib.put(params, both)
  assert per_device_bytes(placed) <= 1.1 * sum(
      a.nbytes for a in jax.tree.leaves(placed)) / 8


def test_lanczos_blocks_on_an_fsdp_mesh_match_one_device():
  loss, params, x, y = wide_mlp_problem()
  batches = helpers.batches_of(x, y, [16, 16, 16, 8, 5])
  mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
  shardings = deeplanczos.infer_sharding(params, mesh, fsdp_axis="data",
                                         min_size=1)
  sharded = sharding_lib.put(params, shardings)
  ref = deeplanczos.lanczos(loss, params, batches, 3, tol=1e-9,
                            show_pbar=False)
  got = deeplanczos.lanczos(loss, sharded, batches, 3, tol=1e-9,
                            show_pbar=False, steps_per_call=4)
  assert got.converged
  np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-6)
  kernel = got.eigenvectors["params"]["Dense_0"]["kernel"]
  assert kernel.addressable_shards[0].data.size == kernel.size // 8
