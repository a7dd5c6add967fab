r"""Top eigenpairs against every peer: the same model, weights and batches.

The digits ReLU MLP (64-32-32-10: configs/mlp_digits.py with features
(32, 32), 3,466 parameters), trained by the launcher's recipe, its
weights copied into an identical torch model; 1797 examples in batches of
256 (the last of 8 has 5). The loss is the mean cross-entropy over all 1797
examples, weighted by example in every tool (hessian-eigenthings averages
per-batch losses with equal weights, so its batches get a loss scaled by
their share of the examples).

For the top 5 (largest algebraic) in float32 and the top 20 in float64, each
tool runs to its documented tolerance settings chosen so that its
eigenvalues land within 1e-6 (float32: 1e-5) of the dense float64 answer
where it can: deeplanczos.lanczos (its default, compiled blocks of steps
that stop at the converged step; that without the k explicit residual
checks, trusting the recurrence's estimates as eigsh does; and a step at a
time on the operator's compiled pass), scipy's eigsh on a jitted JAX HVP,
matfree's tridiagonalisation (Krylov depth fixed, one compiled program),
curvlinops + eigsh, hessian-eigenthings' Lanczos, and PyHessian's power
iteration with deflation. Then the same for a small digits CNN (2,458
parameters, so that its dense Hessian stays cheap) with the tools in JAX.
deeplanczos, eigsh, curvlinops + eigsh and matfree start from the same
vector, all ones (the count of products depends on the start: a table
after each case gives deeplanczos's and eigsh's from 5 random starts).
Reported: HVPs (full passes over the data), the median of 5 warm calls and
its ratio to the HVPs' time at the bare jitted HVP's speed (closing over
the parameters and batches, and taking them as arguments), the first call
(with compilation or set-up; the first deeplanczos row also pays for what
the later ones share, such as the start basis's program), and the
largest relative eigenvalue error and relative residual
||H v - lambda v|| / |lambda| against the dense float64 Hessian.

Timings on 2 shared cores: OMP_WAIT_POLICY=PASSIVE for torch and
OPENBLAS_NUM_THREADS=1 for the small dense eigh, set below before numpy and
torch start; without them the numbers are noise. Where JAX runs on a GPU,
the torch tools run on it too (their models and batches on cuda).

  python -m benchmarks.peers      (needs the bench extra and the peers:
  pip install curvlinops-for-pytorch hessian-eigenthings matfree)

Writes benchmarks/results/peers.md.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import statistics  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position
import warnings  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_enable_x64", True)

from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from scipy.sparse import linalg as sparse_linalg  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import deeplanczos  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from deeplanczos._src import lanczos as lanczos_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

FEATURES = (32, 32)
CNN_CHANNELS, CNN_HIDDEN = (8, 16), 16
BATCH = 256
CASES = ((5, np.float32, 1e-5), (20, np.float64, 1e-6))  # k, dtype, target


def matfree_depth_for(k):
  """matfree's fixed Krylov depth for ``k`` pairs (no stopping test)."""
  return 3 * k if k > 5 else 30


def problem(name="mlp"):
  """The task (its ``model_fn`` the model's apply) and trained parameters."""
  config = experiment.base_config()
  if name == "cnn":
    config.task = "cnn_digits"
    config.model.channels = CNN_CHANNELS
    config.model.hidden = CNN_HIDDEN
  else:
    config.model.features = FEATURES
  task = experiment.build_task(config)
  params = experiment.train(task, config).params
  return task, params


def jax_loss(task, dtype):
  def loss(params, x, y):
    logits = task.model_fn(params, x.astype(dtype))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def dense(task, params, chunk=128):
  """The dense float64 Hessian of the whole-data loss, and its eigh: its
  columns are whole-data HVPs with unit vectors, ``chunk`` at a time (all at
  once, as ``jax.hessian``, a CNN's activations would take tens of GiB)."""
  p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
  flat, unravel = ravel_pytree(p64)
  loss = jax_loss(task, jnp.float64)
  x = jnp.asarray(task.x, jnp.float64)
  grad = jax.grad(lambda f: loss(unravel(f), x, task.y))
  columns = jax.jit(jax.vmap(lambda v: jax.jvp(grad, (flat,), (v,))[1]))
  eye = np.eye(flat.size)
  h = np.concatenate([np.asarray(columns(eye[i:i + chunk]))
                      for i in range(0, flat.size, chunk)])
  h = (h + h.T) / 2
  w, _ = np.linalg.eigh(h)
  return h, w


def errors(h, w, k, values, vectors):
  """Largest relative eigenvalue error and relative residual, in float64."""
  values = np.sort(np.asarray(values, np.float64))[::-1][:k]
  true = w[::-1][:k]
  err = np.max(np.abs(values - true) / np.abs(true)) if len(values) == k else (
      np.inf)
  vecs = np.asarray(vectors, np.float64)
  lam = vecs @ h @ vecs.T  # Rayleigh quotients on the diagonal
  res = max(np.linalg.norm(h @ v - lam[i, i] * v) / abs(lam[i, i])
            for i, v in enumerate(vecs))
  return err, res


def timed(run, repeats=5):
  """The first call's output and seconds, and the median of ``repeats`` warm
  calls' seconds (of 2 where the first call took over 10 s)."""
  start = time.perf_counter()
  out = run()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats if first < 10 else 2):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return out, first, statistics.median(times)


def batches_of(task, dtype):
  return [(task.x[i:i + BATCH].astype(dtype), task.y[i:i + BATCH])
          for i in range(0, len(task.y), BATCH)]


def operator(task, params, dtype, linearize=False):
  p = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  return deeplanczos.HessianOperator(jax_loss(task, dtype), p,
                                     batches_of(task, dtype),
                                     linearize=linearize)


def lanczos(op, k, target, **options):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", deeplanczos.ConvergenceWarning)
    return deeplanczos.lanczos(op, k, tol=target,
                               ncv=lanczos_lib.default_ncv(k),
                               show_pbar=False, **options)


def ours(task, params, k, dtype, target, linearize=False, **options):
  """deeplanczos.lanczos from the all-ones vector, as eigsh and matfree."""
  op = operator(task, params, dtype, linearize)
  ones = jax.tree.map(jnp.ones_like, op.template)
  run = lambda: jax.block_until_ready(lanczos(op, k, target, v0=ones,
                                              **options))
  r, first, warm = timed(run)
  # Flattened for the error check outside the timing (eigsh's and matfree's
  # vectors are flat already).
  vecs = [ravel_pytree(jax.tree.map(lambda a, i=i: a[i], r.eigenvectors))[0]
          for i in range(len(r.eigenvalues))]
  return (r.eigenvalues, np.stack(vecs), r.num_hvps), first, warm


def flat_hvp(task, params, dtype, arguments=False):
  """A jitted whole-data HVP on the flat parameter vector, as a user writes:
  closing over the parameters and the batches (XLA folds what depends on
  them alone, the forward pass, into constants at compile time), or with
  ``arguments`` taking them as arguments, as a library that moves to new
  parameters without compiling again must."""
  flat, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, dtype),
                                            params))
  loss = jax_loss(task, dtype)
  batches = batches_of(task, dtype)
  n = len(task.y)

  def whole(flat, v, batches):
    out = jnp.zeros_like(v)
    for x, y in batches:
      g = lambda f, x=x, y=y: jax.grad(lambda f: loss(unravel(f), x, y))(f)
      out = out + len(y) / n * jax.jvp(g, (flat,), (v,))[1]
    return out
  if arguments:
    placed = jax.device_put(batches)
    return flat, functools.partial(jax.jit(whole), flat, batches=placed)
  return flat, jax.jit(lambda v: whole(flat, v, batches))


def bare_hvp_seconds(task, params, dtype, repeats=50, arguments=False):
  """The median of ``repeats`` calls of the jitted whole-data HVP."""
  flat, hvp = flat_hvp(task, params, dtype, arguments)
  v = jnp.ones_like(flat)
  jax.block_until_ready(hvp(v))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(hvp(v))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def eigsh_solve(hvp, n, k, dtype, target, v0):
  """scipy's eigsh on the jitted ``hvp`` from ``v0``: ``(w, v, HVPs)``."""
  count = [0]

  def matvec(v):
    count[0] += 1
    return np.asarray(hvp(jnp.asarray(v, dtype)), np.float64)
  op = sparse_linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
  w, v = sparse_linalg.eigsh(op, k, which="LA", tol=target,
                             ncv=lanczos_lib.default_ncv(k), v0=v0)
  return w, v.T, count[0]


def eigsh_on_jax(task, params, k, dtype, target):
  """eigsh from the all-ones vector."""
  flat, hvp = flat_hvp(task, params, dtype)
  return timed(lambda: eigsh_solve(hvp, flat.size, k, dtype, target,
                                   np.ones(flat.size)))


def start_spread(task, params, k, dtype, target, seeds=range(1, 6)):
  """The Krylov HVPs of deeplanczos (without its residual checks) and of
  eigsh from random normal start vectors, one run each: how much of a
  difference in counts the start vector alone makes."""
  op = operator(task, params, dtype)
  flat, hvp = flat_hvp(task, params, dtype)
  counts = {"deeplanczos.lanczos": [], "scipy eigsh": []}
  for seed in seeds:
    counts["deeplanczos.lanczos"].append(lanczos(
        op, k, target, key=jax.random.key(seed),
        check_residuals=False).krylov_hvps)
    v0 = np.random.default_rng(seed).standard_normal(flat.size)
    counts["scipy eigsh"].append(
        eigsh_solve(hvp, flat.size, k, dtype, target, v0)[2])
  return counts


def matfree_depth(task, params, k, dtype, depth):
  from matfree import decomp  # pylint: disable=g-import-not-at-top
  flat, hvp = flat_hvp(task, params, dtype)
  tridiag = decomp.tridiag_sym(depth, reortho="full", custom_vjp=False)

  @jax.jit
  def eig(v0):
    q, t, _, _ = tridiag(hvp, v0)
    theta, s = jnp.linalg.eigh(t)
    q = q if q.shape[0] == flat.size else q.T
    return theta, (q @ s).T

  v0 = jnp.full(flat.size, 1 / np.sqrt(flat.size), dtype)

  def run():
    theta, vecs = jax.block_until_ready(eig(v0))
    order = np.argsort(-np.asarray(theta))[:k]
    return np.asarray(theta)[order], np.asarray(vecs)[order], depth
  return timed(run)


def torch_model(params, dtype):
  p = params["params"]
  layers = [torch.nn.Linear(64, FEATURES[0]), torch.nn.ReLU(),
            torch.nn.Linear(FEATURES[0], FEATURES[1]), torch.nn.ReLU(),
            torch.nn.Linear(FEATURES[1], 10)]
  model = torch.nn.Sequential(torch.nn.Flatten(), *layers).to(
      torch.float64 if dtype == np.float64 else torch.float32)
  model = model.to(common.torch_device())
  with torch.no_grad():
    for layer, name in zip(layers[::2], ("Dense_0", "Dense_1", "Dense_2")):
      layer.weight.copy_(torch.from_numpy(
          np.asarray(p[name]["kernel"], dtype).T.copy()))
      layer.bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"], dtype)))
  return model


def torch_batches(task, dtype):
  device = common.torch_device()
  return [(torch.from_numpy(x).to(device),
           torch.from_numpy(np.asarray(y)).long().to(device))
          for x, y in batches_of(task, dtype)]


def torch_vectors(vectors, model):
  """Torch eigenvectors (lists of per-parameter tensors) as flat numpy rows,
  reordered to flax's (kernel = weight^T) raveled layout."""
  rows = []
  for vec in vectors:
    parts = dict(zip([n for n, _ in model.named_parameters()], vec))
    leaves = {}
    for i, name in ((1, "Dense_0"), (3, "Dense_1"), (5, "Dense_2")):
      leaves[name] = {"bias": parts[f"{i}.bias"].detach().cpu().numpy(),
                      "kernel": parts[f"{i}.weight"].detach().cpu().numpy().T}
    rows.append(np.asarray(ravel_pytree({"params": leaves})[0]))
  return np.stack(rows)


def curvlinops_eigsh(task, params, k, dtype, target):
  from curvlinops import HessianLinearOperator  # pylint: disable=g-import-not-at-top
  model = torch_model(params, dtype)
  data = torch_batches(task, dtype)
  loss = torch.nn.CrossEntropyLoss()
  count = [0]

  def run():
    count[0] = 0
    op = HessianLinearOperator(model, loss, list(model.parameters()), data)
    scipy_op = op.to_scipy() if hasattr(op, "to_scipy") else op
    matvec = scipy_op.matvec

    def counted(v):
      count[0] += 1
      return np.asarray(matvec(v.astype(dtype)), np.float64)
    wrapped = sparse_linalg.LinearOperator(scipy_op.shape, matvec=counted,
                                           dtype=np.float64)
    w, v = sparse_linalg.eigsh(wrapped, k, which="LA", tol=target,
                               v0=np.ones(scipy_op.shape[0]),
                               ncv=lanczos_lib.default_ncv(k))
    return w, v.T, count[0]
  (w, v, n), first, warm = timed(run)
  return (w, _torch_flat_to_flax(v, model), n), first, warm


def _torch_flat_to_flax(rows, model):
  shapes = [p.shape for p in model.parameters()]
  out = []
  for row in rows:
    parts, start = [], 0
    for s in shapes:
      size = int(np.prod(s))
      parts.append(torch.from_numpy(row[start:start + size].reshape(s)))
      start += size
    out.append(parts)
  return torch_vectors(out, model)


def eigenthings(task, params, k, dtype, steps):
  import hessian_eigenthings as he  # pylint: disable=g-import-not-at-top
  model = torch_model(params, dtype)
  n = len(task.y)
  data = torch_batches(task, dtype)

  def weighted(outputs, targets):  # its batches are averaged equally
    return torch.nn.functional.cross_entropy(outputs, targets) * (
        len(targets) * len(data) / n)

  def run():
    op = he.HessianOperator(model, data, he.supervised_loss(weighted))
    r = he.lanczos(op, k=k, max_iter=steps, which="LA", seed=0)
    vectors = r.eigenvectors.detach().cpu().numpy()
    return r.eigenvalues.detach().cpu().numpy(), vectors, r.iterations
  (w, v, hvps), first, warm = timed(run)
  return (w, _torch_flat_to_flax(v, model), hvps), first, warm


def pyhessian_deflation(task, params, k, dtype, target):
  from pyhessian import hessian  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_model(params, dtype).eval()
  data = torch_batches(task, dtype)
  count = [0]

  def run():
    count[0] = 0
    h = hessian(model, torch.nn.CrossEntropyLoss(), dataloader=data,
                cuda=common.torch_device() == "cuda")
    product = h.dataloader_hv_product

    def counted(v):
      count[0] += 1
      return product(v)
    h.dataloader_hv_product = counted
    values, vectors = h.eigenvalues(maxIter=1000, tol=target, top_n=k)
    return values, torch_vectors(vectors, model), count[0]
  return timed(run)


def section(task, params, reference, k, dtype, target, tools):
  """One case's table: every tool's row, and the bare HVP's times;
  ``reference`` is :func:`dense`'s."""
  h, w = reference
  rows = []
  bare = bare_hvp_seconds(task, params, dtype)
  taking = bare_hvp_seconds(task, params, dtype, arguments=True)
  for name, run in tools.items():
    try:
      (values, vectors, hvps), first, warm = run()
      err, res = errors(h, w, k, values, vectors)
      rows.append([name, hvps, f"{warm:.3f}", f"{warm / (hvps * bare):.2f}",
                   f"{warm / (hvps * taking):.2f}", f"{first:.2f}",
                   f"{err:.1e}", f"{res:.1e}"])
    except Exception as e:  # pylint: disable=broad-except
      rows.append([name, "-", "-", "-", "-", "-", f"failed: "
                   f"{type(e).__name__}: {str(e)[:80]}", "-"])
    print(rows[-1], flush=True)
  spread = start_spread(task, params, k, dtype, target)
  print(spread, flush=True)
  return (
      f"Top {k}, {np.dtype(dtype).name}, tolerances for a {target:g} "
      f"relative error; the bare HVP (the jitted whole-data HVP that eigsh "
      f"and matfree call, closing over the parameters and batches) takes "
      f"{bare * 1e3:.3f} ms, {taking * 1e3:.3f} ms with the parameters and "
      "batches as arguments (XLA cannot fold the forward pass into "
      "constants; deeplanczos takes them so, to move to new parameters "
      "without compiling again):\n\n" + common.table(
          ["tool", "HVPs", "warm s (median of 5; of 2 over 10 s)",
           "warm / (HVPs x bare HVP)", "warm / (HVPs x bare HVP, arguments)",
           "first call s", "max eigenvalue error", "max relative residual"],
          rows) + "\n\nThe start vector's share: HVPs from 5 random normal "
      "start vectors (seeds 1-5), one run each; deeplanczos's Krylov "
      "products (without its residual checks, as eigsh has none):\n\n" +
      common.table(["tool", "HVPs (median)", "HVPs (each start)"], [
          [name, f"{statistics.median(c):g}", ", ".join(map(str, c))]
          for name, c in spread.items()]))


def jax_tools(task, params, k, dtype, target):
  """The rows of the tools in JAX: deeplanczos's three, eigsh, matfree."""
  depth = matfree_depth_for(k)
  return {
      "deeplanczos.lanczos": lambda: ours(task, params, k, dtype, target),
      "deeplanczos.lanczos, check_residuals=False": lambda: ours(
          task, params, k, dtype, target, check_residuals=False),
      "deeplanczos.lanczos, steps_per_call=None (a step at a time)": (
          lambda: ours(task, params, k, dtype, target, steps_per_call=None)),
      "scipy eigsh on a jitted JAX HVP": lambda: eigsh_on_jax(
          task, params, k, dtype, target),
      f"matfree 0.6.3 tridiag_sym, depth {depth}": (
          lambda: matfree_depth(task, params, k, dtype, depth)),
  }


def main():
  torch.set_num_threads(2)
  task, params = problem()
  reference = dense(task, params)
  n = ravel_pytree(params)[0].size
  sections = []
  for k, dtype, target in CASES:
    tools = jax_tools(task, params, k, dtype, target)
    tools.update({
        "curvlinops + eigsh": lambda: curvlinops_eigsh(task, params, k, dtype,
                                                       target),
        f"hessian-eigenthings 1.0.0a5 ({6 * k} steps)": lambda: eigenthings(
            task, params, k, dtype, 6 * k),
        "PyHessian (power iteration with deflation)": (
            lambda: pyhessian_deflation(task, params, k, dtype, target)),
    })
    sections.append(section(task, params, reference, k, dtype, target,
                            tools))
  cnn, cnn_params = problem("cnn")
  m = ravel_pytree(cnn_params)[0].size
  reference = dense(cnn, cnn_params)
  cnn_sections = []
  for k, dtype, target in CASES:
    tools = jax_tools(cnn, cnn_params, k, dtype, target)
    tools.update({
        "deeplanczos.lanczos, linearize=True": lambda: ours(
            cnn, cnn_params, k, dtype, target, linearize=True),
        "deeplanczos.lanczos, linearize=True, check_residuals=False": (
            lambda: ours(cnn, cnn_params, k, dtype, target, linearize=True,
                         check_residuals=False)),
    })
    cnn_sections.append(section(cnn, cnn_params, reference, k, dtype,
                                target, tools))
  common.write(
      "peers", "Top eigenpairs against every peer (same model, weights, "
      "batches)",
      f"Digits MLP 64-32-32-10 ({n:,} parameters), 1797 examples in batches "
      f"of {BATCH}, mean cross-entropy weighted by example; errors against "
      "the dense float64 Hessian's eigh. torch "
      f"{torch.__version__} on {common.torch_device()} with 2 threads, "
      "OMP_WAIT_POLICY=PASSIVE, "
      "OPENBLAS_NUM_THREADS=1.\n\n" + "\n\n".join(sections) +
      f"\n\n### Digits CNN\n\nThe digits CNN (configs' cnn_digits with "
      f"channels {CNN_CHANNELS}, hidden {CNN_HIDDEN}: {m:,} parameters), "
      "trained by the same recipe, the same batches and loss; the tools in "
      "JAX only (the torch peers ran 15-60x slower than the bare HVP on the "
      "MLP). On CPU, deeplanczos runs it a step at a time by default: "
      "XLA:CPU runs a compiled loop's convolutions without its fast "
      "kernels. With the operator's linearize=True each of those products "
      "applies the pass's linear map at the parameters (linearized once, "
      "in the first call).\n\n" + "\n\n".join(cnn_sections))


if __name__ == "__main__":
  main()
