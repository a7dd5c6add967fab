r"""deeplanczos against PyHessian: the same MLP, weights and batches, on CPU.

A 64-32-10 ReLU MLP is trained on digits with deeplanczos' recipe, its weights
copied into an identical torch model, and both libraries run the power method
over the 1797 digits in the same batches of 256 (the last of 5 weighted by
size in both), float32. Times are medians over the iterations after the
first (deeplanczos' History['seconds']; PyHessian's timed one by one). Both
answers are compared with the dominant eigenvalue of the dense float64
Hessian (jax.hessian + eigh).

Needs the bench extra: pip install torch pyhessian (CPU torch).

  python -m benchmarks.pyhessian_compare

Writes benchmarks/results/pyhessian.md.
"""

import time

import jax

jax.config.update("jax_enable_x64", True)  # for the dense reference only

from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import torch
from pyhessian import hessian as pyhessian_hessian

import optax

from benchmarks import common
import deeplanczos
from deeplanczos import experiment
from deeplanczos import models

ITERATIONS = 60


def trained_mlp():
  config = experiment.base_config()
  config.model.features = (32,)
  task = experiment.tasks.mlp_digits(config)
  return task, experiment.train(task, config).params


def to_torch(params):
  p = params["params"]
  model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 10))
  with torch.no_grad():
    for layer, name in ((model[1], "Dense_0"), (model[3], "Dense_1")):
      layer.weight.copy_(torch.from_numpy(np.asarray(p[name]["kernel"]).T))
      layer.bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
  return model


def dense_top(task, params):
  x64 = jnp.asarray(task.x, jnp.float64)
  flat, unravel = ravel_pytree(jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float64), params))
  model_loss = lambda f: optax.softmax_cross_entropy_with_integer_labels(
      models.MLP((32,)).apply(unravel(f), x64), task.y).mean()
  h = jax.jit(jax.hessian(model_loss))(flat)
  w = np.linalg.eigvalsh(np.asarray(h, np.float64))
  return w[np.argmax(np.abs(w))]


def main():
  task, params = trained_mlp()
  batches = [(task.x[i:i + 256], task.y[i:i + 256])
             for i in range(0, len(task.y), 256)]
  reference = dense_top(task, params)

  _, hist = deeplanczos.PowerMethodIterate(task.loss, params, batches,
                                           ITERATIONS, show_pbar=False)
  lam_ours = hist["eigenvalue"][-1]
  ours_s = float(np.median(hist["seconds"][1:]))

  torch.manual_seed(0)
  torch.set_num_threads(2)
  model = to_torch(params).eval()
  loader = [(torch.from_numpy(x), torch.from_numpy(y).long())
            for x, y in batches]
  h = pyhessian_hessian(model, torch.nn.CrossEntropyLoss(), dataloader=loader,
                        cuda=False)
  times = []
  product = h.dataloader_hv_product

  def timed(v):
    start = time.perf_counter()
    out = product(v)
    times.append(time.perf_counter() - start)
    return out

  h.dataloader_hv_product = timed
  (lam_theirs,), _ = h.eigenvalues(maxIter=ITERATIONS, tol=0.0)
  theirs_s = float(np.median(times[1:]))

  n = sum(a.size for a in jax.tree.leaves(params))
  rows = [["deeplanczos.PowerMethodIterate", f"{ours_s * 1e3:.1f}",
           f"{lam_ours:.6f}", f"{abs(lam_ours - reference) / abs(reference):.1e}"],
          ["PyHessian hessian.eigenvalues", f"{theirs_s * 1e3:.1f}",
           f"{lam_theirs:.6f}",
           f"{abs(lam_theirs - reference) / abs(reference):.1e}"]]
  common.write(
      "pyhessian", "deeplanczos against PyHessian (same MLP, weights, batches)",
      f"MLP 64-32-10 ({n:,} parameters) trained on digits; 1797 examples in "
      f"batches of 256; {ITERATIONS} power iterations, float32; dense "
      f"float64 answer {reference:.6f}. PyHessian 0.1 on torch "
      f"{torch.__version__}.\n\n" + common.table(
          ["library", "ms per full-data iteration", "eigenvalue",
           "rel. error to dense"], rows) +
      f"\n\ndeeplanczos is {theirs_s / ours_s:.1f}x faster per iteration here.")


if __name__ == "__main__":
  main()
