r"""deeplanczos against PyHessian: the same MLP, weights and batches, on CPU.

A 64-64-10 ReLU MLP is trained on digits with deeplanczos' recipe, its weights
copied into an identical torch model, and both libraries run the power method
over the 1797 digits in the same batches of 256 (the last of 5 weighted by
size in both), float32. Times are medians over the iterations after the
first (deeplanczos' History['seconds']; PyHessian's timed one by one). Both
answers are compared with the dominant eigenvalue of the dense float64
Hessian (its columns H e_i, then scipy's eigsh on the dense matrix). It also
reports each library's first-call (compile and set-up) and warm-call
overheads.

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
from scipy.sparse import linalg as sparse_linalg

import optax

from benchmarks import common
import deeplanczos
from deeplanczos import experiment
from deeplanczos import models

ITERATIONS = 60


def trained_mlp():
  config = experiment.base_config()
  config.model.features = (64, 64)
  task = experiment.tasks.mlp_digits(config)
  return task, experiment.train(task, config).params


def to_torch(params):
  p = params["params"]
  model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 10))
  with torch.no_grad():
    for layer, name in ((model[1], "Dense_0"), (model[3], "Dense_1"),
                        (model[5], "Dense_2")):
      layer.weight.copy_(torch.from_numpy(np.asarray(p[name]["kernel"]).T))
      layer.bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"])))
  return model


def dense_top(task, params):
  """The dominant eigenvalue of the dense float64 Hessian."""
  x64 = jnp.asarray(task.x, jnp.float64)
  flat, unravel = ravel_pytree(jax.tree.map(
      lambda a: jnp.asarray(a, jnp.float64), params))
  model_loss = lambda f: optax.softmax_cross_entropy_with_integer_labels(
      models.MLP((64, 64)).apply(unravel(f), x64), task.y).mean()
  hvp = jax.jit(jax.vmap(lambda e: jax.jvp(jax.grad(model_loss), (flat,),
                                            (e,))[1]))
  eye = np.eye(flat.size)
  h = np.concatenate([np.asarray(hvp(eye[i:i + 512]))
                      for i in range(0, flat.size, 512)])
  (w,) = sparse_linalg.eigsh(h, 1, which="LM", return_eigenvectors=False)
  return w


def ours(task, params, batches, **options):
  """Per-iteration, first-call and warm-call seconds of deeplanczos."""
  start = time.perf_counter()
  _, hist = deeplanczos.PowerMethodIterate(task.loss, params, batches,
                                           ITERATIONS, show_pbar=False,
                                           **options)
  first_call = time.perf_counter() - start
  per_iteration = float(np.median(hist["seconds"][1:]))
  warm = []
  for _ in range(5):
    start = time.perf_counter()
    deeplanczos.PowerMethodIterate(task.loss, params, batches, 1,
                                   show_pbar=False, **options)
    warm.append(time.perf_counter() - start)
  return (hist["eigenvalue"][-1], per_iteration,
          first_call - ITERATIONS * per_iteration,
          float(np.median(warm)) - per_iteration)


def ours_in_one_loop(task, params, batches):
  """deeplanczos with all iterations in one compiled loop (one host read)."""
  run = lambda n: deeplanczos.power_iteration(
      task.loss, params, batches, num_iterations=n, iterations_per_call=n,
      show_pbar=False)
  start = time.perf_counter()
  run(ITERATIONS)
  first_call = time.perf_counter() - start
  start = time.perf_counter()
  r = run(ITERATIONS)
  per_iteration = (time.perf_counter() - start) / ITERATIONS
  warm = []
  for _ in range(5):
    start = time.perf_counter()
    run(1)
    warm.append(time.perf_counter() - start)
  return (r.eigenvalue, per_iteration, first_call - ITERATIONS * per_iteration,
          float(np.median(warm)) - per_iteration)


def theirs(params, batches):
  """The same three figures for PyHessian."""
  torch.manual_seed(0)
  torch.set_num_threads(2)
  model = to_torch(params).eval()
  device = common.torch_device()
  model = model.to(device)
  loader = [(torch.from_numpy(x).to(device),
             torch.from_numpy(y).long().to(device)) for x, y in batches]
  times = []

  def timed(product):
    def run(v):
      start = time.perf_counter()
      out = product(v)
      times.append(time.perf_counter() - start)
      return out
    return run

  start = time.perf_counter()
  h = pyhessian_hessian(model, torch.nn.CrossEntropyLoss(),
                        dataloader=loader, cuda=device == "cuda")
  h.dataloader_hv_product = timed(h.dataloader_hv_product)
  (lam,), _ = h.eigenvalues(maxIter=ITERATIONS, tol=0.0)
  first_call = time.perf_counter() - start
  per_iteration = float(np.median(times[1:]))
  warm = []
  for _ in range(5):
    start = time.perf_counter()
    h = pyhessian_hessian(model, torch.nn.CrossEntropyLoss(),
                          dataloader=loader, cuda=device == "cuda")
    h.eigenvalues(maxIter=1, tol=0.0)
    warm.append(time.perf_counter() - start)
  return (lam, per_iteration, first_call - ITERATIONS * per_iteration,
          float(np.median(warm)) - per_iteration)


def main():
  task, params = trained_mlp()
  batches = [(task.x[i:i + 256], task.y[i:i + 256])
             for i in range(0, len(task.y), 256)]
  reference = dense_top(task, params)
  results = {
      "deeplanczos (data on device)": ours(task, params, batches),
      "deeplanczos (streamed)": ours(task, params, batches,
                                     data_on_device=False),
      "deeplanczos (on device, 60 iterations per call)": ours_in_one_loop(
          task, params, batches),
      "PyHessian 0.1": theirs(params, batches),
  }
  pyh = results["PyHessian 0.1"][1]
  rows = [[name, f"{it * 1e3:.2f}", f"{pyh / it:.1f}x", f"{first:.3f}",
           f"{warm * 1e3:.1f}", f"{lam:.6f}",
           f"{abs(lam - reference) / abs(reference):.1e}"]
          for name, (lam, it, first, warm) in results.items()]
  n = sum(a.size for a in jax.tree.leaves(params))
  common.write(
      "pyhessian", "deeplanczos against PyHessian (same MLP, weights, batches)",
      f"MLP 64-64-10 ({n:,} parameters) trained on digits; 1797 examples in "
      f"batches of 256 (the last of 5 weighted by size in both); "
      f"{ITERATIONS} power iterations, float32; dense float64 answer "
      f"{reference:.6f}. PyHessian 0.1 on torch {torch.__version__} "
      f"({common.torch_device()}), 2 threads.\n\n" + common.table(
          ["library", "ms per full-data iteration", "speed-up over PyHessian",
           "first call: compile and set-up s", "warm call overhead ms",
           "eigenvalue", "rel. error to dense"], rows) +
      "\n\nPer iteration: the median over iterations after the first. First "
      "call: a fresh call's wall time less its iterations (deeplanczos "
      "compiles here; a second call with the same loss and shapes compiles "
      "nothing; the 60-iterations-per-call row times a second call of all "
      "60, which reads the host once). Warm call overhead: the median wall time of a later "
      "1-iteration call less one iteration (building the operator, placing "
      "the data, the start vector; PyHessian: building its hessian object).")


if __name__ == "__main__":
  main()
