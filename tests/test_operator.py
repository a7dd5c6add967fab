"""The operator's speed mechanics keep its answers: compile caching, data on
the devices, one reduction per pass, compiled power loops, warm starts."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deeplanczos
from deeplanczos import data as data_lib
from deeplanczos._src import hvp as hvp_lib
from deeplanczos._src import power as power_lib
from tests import helpers


def dense_top(loss, params, x, y):
  h, _ = helpers.dense_hessian(loss, params, x, y)
  w = np.linalg.eigvalsh(h)
  return w[np.argmax(np.abs(w))], h


def test_second_call_and_new_parameters_compile_nothing():
  base, params, x, y = helpers.mlp_problem()
  batches = helpers.batches_of(x, y, [25, 25, 10])
  traces = []

  def loss(p, xb, yb):
    traces.append(xb.shape)
    return base(p, xb, yb)

  deeplanczos.PowerMethodIterate(loss, params, batches, 3, show_pbar=False)
  first = len(traces)
  assert first == 4  # per batch shape: one shape check, one compiled step
  deeplanczos.PowerMethodIterate(loss, params, batches, 3, show_pbar=False)
  moved = jax.tree.map(lambda a: 1.5 * a, params)
  _, hist = deeplanczos.PowerMethodIterate(loss, moved, batches, 300,
                                           show_pbar=False)
  op = deeplanczos.HessianOperator(loss, params, batches)
  lam = deeplanczos.top_eigenvalue(op, params=moved,
                                   num_iterations=300).eigenvalue
  assert len(traces) == first
  top, _ = dense_top(base, moved, x, y)
  np.testing.assert_allclose([hist["eigenvalue"][-1], lam], top, rtol=1e-6)
  assert op.num_matvecs == 0  # with_params gave a new operator


def test_products_compile_once_however_the_vector_is_placed():
  base, params, x, y = helpers.mlp_problem()
  traces = []

  def loss(p, xb, yb):
    traces.append(xb.shape)
    return base(p, xb, yb)

  op = deeplanczos.HessianOperator(loss, params, [(x, y)])
  ones = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), params)
  want = helpers.flat(op.matvec(ones))  # numpy: never placed
  first = len(traces)
  # An array on the default device but not committed to it, one out of a
  # program, and Lanczos's own vectors (on its basis's layout) share the
  # program the numpy vector compiled.
  got = [op.matvec(jax.tree.map(jnp.asarray, ones)),
         op.matvec(jax.jit(lambda v: v)(ones))]
  r = deeplanczos.lanczos(op, 2, tol=1e-10, show_pbar=False,
                          steps_per_call=None)
  assert len(traces) == first and op.pass_programs() == {"matvec"}
  for hv in got:
    np.testing.assert_array_equal(helpers.flat(hv), want)
  h, _ = helpers.dense_hessian(base, params, x, y)
  np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(h)[::-1][:2],
                             rtol=1e-9)


@pytest.mark.parametrize("mesh_shape", [None, (8, 1), (4, 2)])
def test_data_on_device_equals_streaming_and_dense(mesh_shape):
  loss, params, x, y = helpers.mlp_problem(n=61)
  _, h = dense_top(loss, params, x, y)
  kwargs = {}
  if mesh_shape:
    mesh = deeplanczos.make_mesh([("data", mesh_shape[0]),
                                  ("model", mesh_shape[1])])
    kwargs = dict(mesh=mesh, shardings=deeplanczos.infer_sharding(
        params, mesh, min_size=1))
  # grain batches of 16 with the last (13) padded and masked, then a run of
  # more full batches than one program holds on CPU: several programs.
  data = data_lib.batch_dataset(x, y, 16)
  small = helpers.batches_of(x, y, [4] * 15 + [1])
  for batches, parser in ((data, data_lib.parse_batch), (small, None)):
    ops = [deeplanczos.HessianOperator(loss, params, batches,
                                       batch_parser=parser,
                                       data_on_device=mode, **kwargs)
           for mode in (True, False)]
    v = ops[0].random_vector(jax.random.key(0))
    hv = [helpers.flat(op.matvec(v)) for op in ops]
    assert [op.data_on_device for op in ops] == [True, False]
    np.testing.assert_allclose(hv[0], hv[1], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(hv[0], h @ helpers.flat(v), rtol=1e-10,
                               atol=1e-12)
    assert ops[0].num_examples == ops[1].num_examples == 61
    np.testing.assert_allclose(ops[0].loss_value, loss(params, x, y),
                               rtol=1e-12)


@pytest.mark.parametrize("curvature,on_mesh", [("hessian", False),
                                               ("fisher", False),
                                               ("hessian", True)])
def test_linearized_products_equal_the_plain_pass(curvature, on_mesh, caplog):
  loss, params, x, y = helpers.mlp_problem(n=61)
  batches = helpers.batches_of(x, y, [16, 16, 16, 13])
  kwargs = {}
  if on_mesh:
    mesh = deeplanczos.make_mesh([("data", 4), ("model", 2)])
    kwargs = dict(mesh=mesh, shardings=deeplanczos.infer_sharding(
        params, mesh, fsdp_axis="data", min_size=1))
  plain, linear = (deeplanczos.HessianOperator(loss, params, batches,
                                               curvature=curvature,
                                               linearize=flag, **kwargs)
                   for flag in (False, True))
  _, h = dense_top(loss, params, x, y)
  vectors = [plain.random_vector(jax.random.key(i)) for i in range(3)]
  for v in vectors:
    hv = linear.matvec(v)
    assert all(l.sharding.is_equivalent_to(s, l.ndim) for l, s in zip(
        jax.tree.leaves(hv), jax.tree.leaves(linear.shardings)))
    got = helpers.flat(hv)
    np.testing.assert_allclose(got, helpers.flat(plain.matvec(v)),
                               rtol=1e-12, atol=1e-14)
    if curvature == "hessian":
      np.testing.assert_allclose(got, h @ helpers.flat(v), rtol=1e-10,
                                 atol=1e-12)
  assert linear.num_matvecs == 3 and linear.num_examples == 61
  np.testing.assert_allclose(linear.loss_value, plain.loss_value, rtol=1e-14)
  # New parameters: linearized again there, compiling nothing.
  moved = jax.tree.map(lambda a: 1.1 * a, params)
  want = helpers.flat(plain.with_params(moved).matvec(vectors[0]))
  moved_linear = linear.with_params(moved)
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level("WARNING", logger="jax"):
      got = [helpers.flat(moved_linear.matvec(v)) for v in vectors[:2]]
  finally:
    jax.config.update("jax_log_compiles", False)
  assert not [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Compiling ")]
  np.testing.assert_allclose(got[0], want, rtol=1e-12, atol=1e-14)
  assert not np.allclose(got[0], helpers.flat(linear.matvec(vectors[0])))
  # The original operator keeps its own parameters' map.
  np.testing.assert_allclose(helpers.flat(linear.matvec(vectors[1])),
                             helpers.flat(plain.matvec(vectors[1])),
                             rtol=1e-12, atol=1e-14)


def test_linearized_non_finite_product_names_its_batch():
  loss, params, x, y = helpers.mlp_problem(n=40)
  op = deeplanczos.HessianOperator(loss, params,
                                   helpers.batches_of(x, y, [20, 20]),
                                   linearize=True)
  op.matvec(op.random_vector(jax.random.key(0)))  # linearized here
  bad = jax.tree.map(lambda a: jnp.full_like(a, jnp.inf), op.template)
  with pytest.raises(ValueError, match="Non-finite Hessian-vector product "
                     "at step 7 at batch 0"):
    op.matvec(bad, where="at step 7")
  with pytest.raises(TypeError, match="linearize must be True or False; "
                     "got 'yes'"):
    deeplanczos.HessianOperator(loss, params, [(x, y)], linearize="yes")


def count(text, op="all-reduce"):
  return sum(line.split("=")[1].strip().startswith(op) or
             f" {op}(" in line for line in text.splitlines()
             if "=" in line and op in line)


def test_one_reduction_per_pass_on_eight_devices():
  loss, params, x, y = helpers.mlp_problem(n=64)
  mesh = deeplanczos.make_mesh([("data", 8), ("model", 1)])
  batches = helpers.batches_of(x, y, [16, 16, 16, 16])
  op = deeplanczos.HessianOperator(loss, params, batches, mesh=mesh,
                                   data_on_device=False)
  v = op.random_vector(jax.random.key(0))
  programs = hvp_lib.programs(op.kernel)
  acc, stats = programs.start(v, weight_dtype=np.dtype("float64"))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  xb, yb, wb = (jax.device_put(a, split) for a in (x[:16], y[:16],
                                                   np.ones(16)))
  step = programs.batch_step.lower(
      op.params, v, acc, stats, 0, xb, yb, wb, jax.random.key(0),
      padded=False).compile().as_text()
  finish = programs.finish.lower(acc, stats, v).compile().as_text()
  assert count(step) == 0 and count(finish) >= 1
  on_device = deeplanczos.HessianOperator(loss, params, batches, mesh=mesh)
  fn, data = on_device.pass_program()
  whole = jax.jit(lambda p, u, d: fn(p, u, d)).lower(
      on_device.params, v, data).compile().as_text()
  # Four batches in one program, reduced as often as one batch would be.
  assert count(whole) == count(finish)
  one_device = deeplanczos.HessianOperator(loss, params, batches)
  want = helpers.flat(one_device.matvec(one_device.check_vector(
      jax.device_get(v))))
  for operator in (op, on_device):
    np.testing.assert_allclose(helpers.flat(operator.matvec(v)), want,
                               rtol=1e-10, atol=1e-13)


def test_power_loop_on_device_matches_one_iteration_per_call():
  loss, params, x, y = helpers.mlp_problem()
  batches = helpers.batches_of(x, y, [16, 16, 16, 12])
  traces = []

  def counted(p, xb, yb):
    traces.append(1)
    return loss(p, xb, yb)

  one = deeplanczos.power_iteration(counted, params, batches,
                                    num_iterations=500, tol=1e-9,
                                    show_pbar=False)
  many = deeplanczos.power_iteration(counted, params, batches,
                                     num_iterations=500, tol=1e-9,
                                     show_pbar=False, iterations_per_call=16)
  assert many.converged and one.converged
  assert len(many.seconds) < len(one.seconds) / 10  # host round trips
  assert abs(len(many.eigenvalues) - len(one.eigenvalues)) <= 1
  n = min(len(many.eigenvalues), len(one.eigenvalues))
  np.testing.assert_allclose(many.eigenvalues[:n], one.eigenvalues[:n],
                             rtol=1e-12)
  top, _ = dense_top(loss, params, x, y)
  np.testing.assert_allclose(many.eigenvalue, top, rtol=1e-6)
  assert many.num_hvps == len(many.eigenvalues)


def test_power_loop_shorter_last_block_compiles_nothing_new():
  loss, params, x, y = helpers.mlp_problem()
  batches = helpers.batches_of(x, y, [16, 16, 16, 12])
  op = deeplanczos.HessianOperator(loss, params, batches)
  full = deeplanczos.power_iteration(op, num_iterations=6,
                                     iterations_per_call=3, show_pbar=False)
  programs = power_lib._iterations._cache_size()  # pylint: disable=protected-access
  part = deeplanczos.power_iteration(op, num_iterations=7,  # 3, 3 and 1
                                     iterations_per_call=3, show_pbar=False)
  assert power_lib._iterations._cache_size() == programs  # pylint: disable=protected-access
  assert len(part.seconds) == 3 and part.num_hvps == 7
  np.testing.assert_allclose(part.eigenvalues[:6], full.eigenvalues,
                             rtol=1e-12)
  one = deeplanczos.power_iteration(loss, params, batches, num_iterations=7,
                                    show_pbar=False)
  np.testing.assert_allclose(part.eigenvalues, one.eigenvalues, rtol=1e-12)


def test_tracker_warm_start_from_the_last_eigenvector():
  loss, params, x, y = helpers.mlp_problem()
  op = deeplanczos.HessianOperator(loss, params, [(x, y)])
  first = deeplanczos.top_eigenvalue(op, num_iterations=300)
  assert isinstance(first, deeplanczos.PowerResult)
  lam, v = first.eigenvalue, first.eigenvector
  moved = jax.tree.map(lambda a: a * 1.02, params)
  top, h = dense_top(loss, moved, x, y)
  r = deeplanczos.top_eigenvalue(op, params=moved, v0=v, num_iterations=5)
  warm, v_warm = r.eigenvalue, r.eigenvector
  cold = deeplanczos.top_eigenvalue(op, params=moved,
                                    num_iterations=5).eigenvalue
  assert abs(warm - top) < 1e-3 * abs(cold - top)
  u = helpers.flat(v_warm)
  assert np.linalg.norm(h @ u - warm * u) < 1e-3 * abs(top)
  assert lam != warm


NAN_METHODS = {
    "power": lambda op: deeplanczos.power_iteration(op, num_iterations=3,
                                                    show_pbar=False),
    "power, 3 per call": lambda op: deeplanczos.power_iteration(
        op, num_iterations=3, iterations_per_call=3, show_pbar=False),
    "lanczos": lambda op: deeplanczos.lanczos(op, 2, show_pbar=False),
    "lanczos, 4 per call": lambda op: deeplanczos.lanczos(
        op, 2, show_pbar=False, steps_per_call=4),
    "density": lambda op: deeplanczos.spectral_density(
        op, num_probes=2, num_steps=3, show_pbar=False),
    "hutchpp": lambda op: deeplanczos.hutchpp(op, num_hvps=6,
                                              show_pbar=False),
    "hutchinson": lambda op: deeplanczos.hutchinson(op, num_probes=3,
                                                    show_pbar=False),
}


@pytest.mark.parametrize("method,where,data_on_device", [
    *((method, "data", True) for method in sorted(NAN_METHODS)),
    ("power", "data", False), ("lanczos", "data", False),
    ("power", "parameters", True), ("power, 3 per call", "parameters", True),
    ("hutchinson", "parameters", False)])
def test_non_finite_input_is_named_on_every_path(method, where,
                                                 data_on_device):
  loss, params, x, y = helpers.mlp_problem(dtype=np.float32)
  if where == "data":
    x = x.copy()
    x[25, 0] = np.nan  # in batch 1
  else:
    params = jax.tree.map(lambda a: a.at[0].set(np.inf), params)
  op = deeplanczos.HessianOperator(loss, params,
                                   helpers.batches_of(x, y, [20, 20, 20]),
                                   data_on_device=data_on_device)
  batch = 1 if where == "data" else 0
  with pytest.raises(ValueError, match=rf"^Non-finite Hessian-vector product "
                     rf".* at batch {batch}: the loss or its derivatives"):
    NAN_METHODS[method](op)


def test_float32_eigenvalue_near_1e20():
  loss, params, x, y = helpers.mlp_problem(dtype=np.float32)
  h, _ = helpers.dense_hessian(loss, jax.tree.map(
      lambda a: a.astype(np.float64), params), x.astype(np.float64), y)
  top = np.linalg.eigvalsh(h)[::-1][:2]
  big = lambda p, xb, yb: 1e20 * loss(p, xb, yb)
  data = helpers.batches_of(x, y, [20, 20, 20])
  r = deeplanczos.power_iteration(big, params, data, num_iterations=200,
                                  show_pbar=False)
  np.testing.assert_allclose(r.eigenvalue, 1e20 * top[0], rtol=1e-4)
  np.testing.assert_allclose(r.alpha[-1], (1e20 * top[0]) ** 2, rtol=1e-3)
  lz = deeplanczos.lanczos(big, params, data, 2, show_pbar=False)
  np.testing.assert_allclose(lz.eigenvalues, 1e20 * top, rtol=1e-4)


@pytest.mark.parametrize("params,batches,message", [
    ({"w": np.ones(3, np.int32)}, None,
     r"floating-point array; the one at \['w'\] is int32 of shape \(3,\)"),
    ({}, None, r"The parameters hold no arrays \(got dict \{\}\)"),
    (None, [(np.ones((4, 4)), np.zeros(4, int)), (np.ones((4, 3)),
                                                  np.zeros(4, int))],
     r"Batch 1 has x of per-example shape \(3,\) where batch 0 has \(4,\)"),
    (None, [(np.ones((4, 3)), np.zeros(4, int))],
     r"loss\(params, x, y\) fails on batch 0 \(x \(4, 3\) float64"),
])
def test_bad_parameters_and_batches_are_named(params, batches, message):
  loss, mlp_params, x, y = helpers.mlp_problem()
  params = mlp_params if params is None else params
  batches = [(x, y)] if batches is None else batches
  with pytest.raises((ValueError, TypeError), match=message):
    deeplanczos.power_iteration(loss, params, batches, num_iterations=2,
                                show_pbar=False)


@pytest.mark.parametrize("method", [
    "lanczos", "lanczos from v0", "density", "power"])
def test_a_first_call_compiles_the_start_beside_the_loop(caplog, method):
  """A method's first call compiles each program once: its compiled loop
  in the caller's thread, its start (and Lanczos's Ritz vectors') in a
  second one, at the same time."""
  loss, params, x, y = helpers.mlp_problem(d=3)  # shapes no other test has
  h, _ = helpers.dense_hessian(loss, params, x, y)
  w = np.linalg.eigvalsh(h)
  op = deeplanczos.HessianOperator(loss, params,
                                   helpers.batches_of(x, y, [20, 20, 20]))
  ones = jax.tree.map(np.ones_like, params)
  runs = {
      "lanczos": lambda: deeplanczos.lanczos(op, 3, tol=1e-10,
                                             show_pbar=False).eigenvalues,
      "lanczos from v0": lambda: deeplanczos.lanczos(
          op, 3, tol=1e-10, v0=ones, show_pbar=False).eigenvalues,
      "density": lambda: [np.nanmax(deeplanczos.spectral_density(
          op, num_probes=2, num_steps=len(w), show_pbar=False).nodes)],
      "power": lambda: [deeplanczos.power_iteration(
          op, num_iterations=500, tol=1e-13, show_pbar=False).eigenvalue],
  }
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level("WARNING", logger="jax"):
      got = runs[method]()
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [(r.getMessage().split(" with ")[0].split()[-1], r.getMessage(),
               r.threadName) for r in caplog.records
              if r.getMessage().startswith("Compiling ")]
  messages = [m for _, m, _ in compiles]
  assert len(messages) == len(set(messages)), messages  # nothing twice
  threads = {}
  for name, _, thread in compiles:
    threads.setdefault(name, []).append(thread)
  main = threading.current_thread().name
  loop = {"density": "jit(_tridiagonalize_loop)",
          "power": "jit(_iterations)"}.get(method, "jit(_steps)")
  assert threads[loop] == [main]
  beside = threads["jit(make)"] + threads.get("jit(_combination)", [])
  assert main not in beside, compiles
  top = sorted(w, key=abs)[::-1] if method == "power" else w[::-1]
  np.testing.assert_allclose(got[:3], top[:len(got[:3])], rtol=1e-7)


def test_a_second_call_of_every_method_compiles_nothing(caplog):
  loss, params, x, y = helpers.mlp_problem(dtype=np.float32)
  op = deeplanczos.HessianOperator(loss, params,
                                   helpers.batches_of(x, y, [20, 20, 20]))
  runs = {
      "power": lambda: deeplanczos.power_iteration(op, num_iterations=3,
                                                   show_pbar=False),
      "lanczos": lambda: deeplanczos.lanczos(op, 2, show_pbar=False),
      "lanczos blocks": lambda: deeplanczos.lanczos(op, 2, show_pbar=False,
                                                    steps_per_call=4),
      "density": lambda: deeplanczos.spectral_density(
          op, num_probes=2, num_steps=4, show_pbar=False),
      "hutchinson": lambda: deeplanczos.hutchinson(op, num_probes=3,
                                                   show_pbar=False),
      "hutchpp": lambda: deeplanczos.hutchpp(op, num_hvps=6, show_pbar=False),
  }
  for run in runs.values():
    run()
  jax.config.update("jax_log_compiles", True)
  try:
    for name, run in runs.items():
      caplog.clear()
      with caplog.at_level("WARNING", logger="jax"):
        run()
      compiled = [r.getMessage() for r in caplog.records
                  if r.getMessage().startswith("Compiling ")]
      assert not compiled, (name, compiled)
  finally:
    jax.config.update("jax_log_compiles", False)
