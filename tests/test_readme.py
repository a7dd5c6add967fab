"""The README's complete examples run as written and give the dense answer."""

import contextlib
import functools
import io
import re

import jax
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from tests import helpers

EXAMPLES = dict(re.findall(r"```python\n# Example: ([^\n]+)\n(.*?)```",
                           (helpers.ROOT / "README.md").read_text(),
                           re.DOTALL))


@functools.lru_cache(maxsize=None)
def run_example(name):
  namespace = {}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(EXAMPLES[name], f"README: {name}", "exec"), namespace)  # pylint: disable=exec-used
  return namespace, out.getvalue()


def dense_eigenvalues(namespace, params, batches):
  """Eigenvalues of the dataset loss's Hessian, dense, in float64."""
  x = np.concatenate([np.asarray(b[0]) for b in batches], dtype=np.float64)
  y = np.concatenate([np.asarray(b[1]) for b in batches])
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  flat, unravel = ravel_pytree(params)
  h = jax.jit(jax.hessian(lambda f: namespace["loss"](unravel(f), x, y)))(flat)
  return np.linalg.eigvalsh(np.asarray(h, np.float64))


def test_both_examples_are_there():
  assert sorted(EXAMPLES) == ["Flax Linen", "Flax NNX, with BatchNorm"]


def test_linen_example():
  ns, printed = run_example("Flax Linen")
  history = ns["History"]
  assert set(history) >= {"alpha", "eigenvalue", "iteration", "q"}
  batches = [ns["parser"](b) for b in ns["batch_iterable"]]
  w = dense_eigenvalues(ns, ns["P"], batches)
  top = w[np.argmax(np.abs(w))]
  np.testing.assert_allclose(history["eigenvalue"][-1], top, rtol=1e-5)
  assert f"top eigenvalue {history['eigenvalue'][-1]:.5f}" in printed


def test_nnx_example():
  ns, printed = run_example("Flax NNX, with BatchNorm")
  r = ns["r"]
  assert r.converged
  w = dense_eigenvalues(ns, ns["params"], ns["batches"])
  np.testing.assert_allclose(r.eigenvalues, w[::-1][:3], rtol=1e-5)
  assert "converged: True" in printed


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_quotes_what_the_example_prints(name):
  _, printed = run_example(name)
  readme = (helpers.ROOT / "README.md").read_text()
  first = printed.split("\n")[0]
  if name == "Flax Linen":
    assert f"It prints `{first}`" in readme
  else:
    values = re.findall(r"[-\d.]+", first.split("[")[1].split("]")[0])
    quoted = " ".join(f"{float(v):.6g}" for v in values)
    assert f"It prints `top-3 eigenvalues [{quoted}] converged: True`" in readme
