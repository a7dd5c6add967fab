"""Gauss-Newton and empirical Fisher operators against dense float64 ones."""

import re

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

import deeplanczos
from deeplanczos import data as data_lib
from tests import helpers


def mlp():
  loss, params, x, y = helpers.mlp_problem()
  model = helpers.TinyMLP()
  model_fn = model.apply

  def output_loss(logits, yb):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  return loss, params, x, y, model_fn, output_loss


def dense_ggn(model_fn, output_loss, params, x, y):
  flat, unravel = ravel_pytree(params)
  jac = jax.jacobian(lambda f: model_fn(unravel(f), x))(flat)  # (n, c, P)
  h_out = jax.vmap(jax.hessian(lambda o, t: output_loss(o[None], t[None])))(
      model_fn(params, x), y)  # (n, c, c)
  return np.asarray(jnp.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(y))


def dense_fisher(loss, params, x, y):
  flat, unravel = ravel_pytree(params)
  g = jax.vmap(lambda xi, yi: jax.grad(
      lambda f: loss(unravel(f), xi[None], yi[None]))(flat))(x, y)
  return np.asarray(g.T @ g / len(y))


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_matches_dense_on_masked_and_full_batches(curvature):
  loss, params, x, y, model_fn, output_loss = mlp()
  want = (dense_ggn(model_fn, output_loss, params, x, y) if curvature == "ggn"
          else dense_fisher(loss, params, x, y))
  options = dict(curvature=curvature, model_fn=model_fn,
                 output_loss=output_loss)
  full = helpers.batches_of(x, y, [20, 20, 20])
  masked = data_lib.batch_dataset(x, y, 16)  # last batch padded and masked
  for data, parser in ((full, None), (masked, data_lib.parse_batch)):
    op = deeplanczos.HessianOperator(loss, params, data, batch_parser=parser,
                                     **options)
    v = op.random_vector(jax.random.key(1))
    np.testing.assert_allclose(helpers.flat(op.matvec(v)),
                               want @ helpers.flat(v), rtol=1e-9, atol=1e-12)
  # Every method runs on it: Lanczos' top eigenvalues are the dense ones.
  r = deeplanczos.lanczos(loss, params, full, 3, tol=1e-10, show_pbar=False,
                          **options)
  np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(want)[::-1][:3],
                             rtol=1e-7)


def test_ggn_is_positive_semidefinite_where_the_hessian_is_not():
  loss, params, x, y, model_fn, output_loss = mlp()
  h, _ = helpers.dense_hessian(loss, params, x, y)
  assert np.linalg.eigvalsh(h)[0] < -1e-4  # the Hessian has negative curvature
  r = deeplanczos.lanczos(loss, params, [(x, y)], 2, which="SA", tol=1e-8,
                          show_pbar=False, curvature="ggn", model_fn=model_fn,
                          output_loss=output_loss)
  assert np.all(r.eigenvalues > -1e-10)


def test_ggn_equals_hessian_for_a_linear_model_with_squared_loss():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 5))
  y = rng.normal(size=(40, 3))
  params = {"w": jnp.asarray(rng.normal(size=(5, 3))),
            "b": jnp.asarray(rng.normal(size=3))}
  model_fn = lambda p, xb: xb @ p["w"] + p["b"]
  output_loss = lambda out, yb: 0.5 * jnp.mean(jnp.sum((out - yb) ** 2, -1))
  loss = lambda p, xb, yb: output_loss(model_fn(p, xb), yb)
  data = helpers.batches_of(x, y, [16, 16, 8])
  hessian = deeplanczos.HessianOperator(loss, params, data)
  ggn = deeplanczos.HessianOperator(loss, params, data, curvature="ggn",
                                    model_fn=model_fn, output_loss=output_loss)
  v = hessian.random_vector(jax.random.key(0))
  h, _ = helpers.dense_hessian(loss, params, x, y)
  np.testing.assert_allclose(helpers.flat(ggn.matvec(v)),
                             helpers.flat(hessian.matvec(v)), rtol=1e-12)
  np.testing.assert_allclose(helpers.flat(ggn.matvec(v)),
                             h @ helpers.flat(v), rtol=1e-12)


def _dot_precisions(op):
  """The precision of every dot in the operator's compiled pass."""
  pass_fn, data = op.pass_program()
  v = op.random_vector(jax.random.key(0))
  text = jax.jit(lambda *a: pass_fn(*a)).lower(op.params, v, data).as_text()
  dots = re.findall(r"stablehlo\.dot_general[^\n]*", text)
  assert dots
  return {(re.search(r"precision = \[(\w+), ", d) or [None, "DEFAULT"])[1]
          for d in dots}


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_precision_reaches_every_product(curvature):
  """JAX's default rounds float32 products on TPUs (bfloat16) and recent
  GPUs (TensorFloat32: an H200 put top-5 eigenvalues 3.5e-4 off the dense
  answer). The operator's pass carries its precision on every dot, the
  JVP's and the transposes' too; XLA:CPU computes float32 either way, so
  the program is read, not run, and the answers agree."""
  loss, params, x, y = helpers.mlp_problem(dtype=jnp.float32)
  model_fn = helpers.TinyMLP(dtype=jnp.float32).apply
  _, _, _, _, _, output_loss = mlp()
  options = dict(curvature=curvature, model_fn=model_fn,
                 output_loss=output_loss)
  ops = {p: deeplanczos.HessianOperator(loss, params, [(x, y)], precision=p,
                                        **options)
         for p in ("highest", "tensorfloat32", None)}
  assert _dot_precisions(ops["highest"]) == {"HIGHEST"}
  assert _dot_precisions(ops["tensorfloat32"]) == {"HIGH"}
  assert _dot_precisions(ops[None]) == {"DEFAULT"}
  v = ops[None].random_vector(jax.random.key(1))
  np.testing.assert_allclose(helpers.flat(ops["highest"].matvec(v)),
                             helpers.flat(ops[None].matvec(v)), rtol=1e-6)


def test_methods_take_their_own_products_in_float32(tmp_path):
  """The methods' own products (reorthogonalization, basis rotations, Ritz
  vectors, inner products) ask for full float32 whatever the operator's
  precision: at JAX's default the TPU compiler rotates a basis in one
  bfloat16 pass. Every program the methods lower on an operator whose pass
  has no matrix product (a diagonal quadratic, shapes no other test
  compiles) is read for its dots."""
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=7), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
  x = rng.uniform(1, 2, size=(12, 7)).astype(np.float32)
  y = rng.uniform(1, 2, size=12).astype(np.float32)
  scale = jnp.arange(1.0, 16.0, dtype=jnp.float32).reshape(3, 5)

  def loss(p, xb, yb):
    return 0.5 * (jnp.mean(yb * jnp.sum(xb * p["a"] ** 2, axis=1))
                  + jnp.sum(scale * p["b"] ** 2))

  calls = [
      lambda op: deeplanczos.lanczos(op, 2, show_pbar=False),
      lambda op: deeplanczos.lanczos(op, 2, show_pbar=False,
                                     steps_per_call=None, ncv=6),
      lambda op: deeplanczos.spectral_density(op, num_probes=2, num_steps=5,
                                              show_pbar=False),
      lambda op: deeplanczos.spectral_density(op, num_probes=2, num_steps=5,
                                              show_pbar=False,
                                              probes_per_call=2),
      lambda op: deeplanczos.hutchinson(op, num_probes=4, show_pbar=False),
      lambda op: deeplanczos.hutchpp(op, num_hvps=6, show_pbar=False),
      lambda op: deeplanczos.power_iteration(op, num_iterations=3,
                                             show_pbar=False),
  ]
  previous = jax.config.read("jax_dump_ir_to")
  jax.config.update("jax_dump_ir_to", str(tmp_path))
  try:
    for call in calls:
      call(deeplanczos.HessianOperator(loss, params, [(x[:6], y[:6]), (x[6:], y[6:])],
                                       precision=None))
  finally:
    jax.config.update("jax_dump_ir_to", previous)
  dots = [d for f in tmp_path.glob("*.mlir")
          for d in re.findall(r"stablehlo\.dot_general[^\n]*", f.read_text())]
  assert len(dots) > 10
  assert {(re.search(r"precision = \[(\w+), ", d) or [None, "DEFAULT"])[1]
          for d in dots} == {"HIGHEST"}


def test_bad_curvature_options():
  loss, params, x, y, model_fn, _ = mlp()
  with pytest.raises(ValueError, match="precision must be None or"):
    deeplanczos.HessianOperator(loss, params, [(x, y)], precision="float31")
  with pytest.raises(ValueError, match="curvature must be one of"):
    deeplanczos.HessianOperator(loss, params, [(x, y)], curvature="gauss")
  with pytest.raises(TypeError, match="needs model_fn"):
    deeplanczos.HessianOperator(loss, params, [(x, y)], curvature="ggn",
                                model_fn=model_fn)
