"""The launcher's plots: one PNG per method, from its result dict.

Each names the matrix it shows (``result['matrix']``: the Hessian, the
Gauss-Newton matrix or the empirical Fisher) and is written to a temporary
file renamed into place, so a full disk never leaves half a PNG.
"""

import os

import numpy as np


def _figure(ncols=1):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4), squeeze=False)
  return plt, fig, axes[0]


def _save(plt, fig, path):
  fig.tight_layout()
  directory, name = os.path.split(path)
  temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp.png")
  try:
    fig.savefig(temporary, dpi=100)
    os.replace(temporary, path)
  finally:
    plt.close(fig)
    if os.path.exists(temporary):
      os.remove(temporary)


def power(result, path):
  plt, fig, (a, b) = _figure(2)
  h = result["history"]
  a.plot(h["iteration"], h["eigenvalue"], marker=".")
  a.set(xlabel="iteration", ylabel="eigenvalue estimate <v, Hv>",
        title=f"{result['matrix']}: dominant eigenvalue "
        f"{result['eigenvalue']:.6g}")
  b.semilogy(h["iteration"], np.maximum(1 - np.asarray(h["q"]), 1e-16),
             marker=".")
  b.set(xlabel="iteration", ylabel="1 - q = 1 - |<v_k, v_k+1>|",
        title="eigenvector convergence")
  _save(plt, fig, path)


def lanczos(result, path):
  plt, fig, (a, b) = _figure(2)
  ritz = np.array(result["ritz_history"], dtype=float)
  steps = np.arange(1, len(ritz) + 1)
  for i in range(ritz.shape[1]):
    a.plot(steps, ritz[:, i], label=f"{i + 1}")
  a.set(xlabel="matrix-vector products", ylabel="Ritz value",
        title=f"{result['matrix']}: Ritz values of the wanted eigenvalues")
  a.legend(fontsize="small")
  lam = np.abs(np.array(result["eigenvalues"], dtype=float))
  pairs = np.arange(1, len(lam) + 1)
  b.semilogy(pairs, result["relative_residuals"], "o", label="explicit")
  b.semilogy(pairs, np.maximum(np.array(result["residual_estimates"],
                                        dtype=float) / lam, 1e-20), "x",
             label="recurrence estimate")
  b.set(xlabel="eigenpair", ylabel="||Hv - lambda v|| / |lambda|",
        title="relative residuals", xticks=pairs)
  b.legend(fontsize="small")
  _save(plt, fig, path)


def density(result, path):
  plt, fig, (a,) = _figure()
  density = np.asarray(result["density"], dtype=float)
  a.semilogy(result["grid"], np.maximum(density, 1e-12))
  a.set(xlabel="eigenvalue", ylabel="density (log scale)",
        ylim=(max(density.max() * 1e-8, 1e-12), density.max() * 2),
        title=(f"{result['matrix']} spectral density (SLQ, "
               f"sigma={result['sigma']:.2g})"))
  _save(plt, fig, path)


def trace(result, path):
  plt, fig, (a,) = _figure()
  samples = np.asarray(result["samples"], dtype=float)
  offset = result["estimate"] - samples.mean()
  n = np.arange(1, len(samples) + 1)
  running = offset + np.cumsum(samples) / n
  spread = np.array([samples[:i].std(ddof=1) / np.sqrt(i) if i > 1 else 0
                     for i in n])
  a.plot(n, running, label="estimate")
  a.fill_between(n, running - 2 * spread, running + 2 * spread, alpha=0.3,
                 label="+- 2 standard errors")
  a.set(xlabel="random probes", ylabel="trace estimate",
        title=f"{result['matrix']} trace, {result['estimator']}: "
        f"{result['estimate']:.6g} +- {result['stderr']:.2g}")
  a.legend()
  _save(plt, fig, path)


def sharpness(result, path):
  plt, fig, (a,) = _figure()
  a.plot(result["steps"], result["sharpness"], marker=".",
         label=f"top {result['matrix']} eigenvalue")
  a.axhline(result["threshold"], color="k", linestyle="--",
            label=f"2 / learning rate = {result['threshold']:.3g}")
  a.set(xlabel="gradient descent step", ylabel="sharpness",
        title="sharpness during training")
  b = a.twinx()
  b.semilogy(result["steps"], result["loss"], color="tab:orange", alpha=0.6,
             label="loss")
  b.set_ylabel("dataset loss")
  lines = a.get_legend_handles_labels()
  more = b.get_legend_handles_labels()
  a.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small")
  _save(plt, fig, path)


def curvature(records, path, *, matrix="Hessian", learning_rate=0.0):
  """A followed run: each method's figures against the training step.

  Args:
    records: ``curvature.jsonl``'s lines, oldest step first.
    path: the PNG to write.
    matrix: the matrix's name, for the titles.
    learning_rate: the trainer's step size; when given, the top eigenvalue's
      panel shows the gradient-descent stability limit ``2 / lr``.
  """
  panels = [m for m in ("eigenvalues", "trace", "density")
            if any(_curvature_series(r, m) for r in records)]
  plt, fig, axes = _figure(max(1, len(panels)))
  for a, panel in zip(axes, panels):
    rows = [(r["step"], _curvature_series(r, panel)) for r in records]
    rows = [(s, v) for s, v in rows if v]
    if panel == "eigenvalues":
      for name in ("lanczos", "power"):
        points = [(s, v[name]) for s, v in rows if name in v]
        if not points:
          continue
        steps = [s for s, _ in points]
        values = np.array([np.atleast_1d(v) for _, v in points], dtype=float)
        for i in range(values.shape[1]):
          a.plot(steps, values[:, i], marker="." if name == "power" else None,
                 label=f"{name} {i + 1}" if values.shape[1] > 1 else name)
      if learning_rate:
        a.axhline(2 / learning_rate, color="k", linestyle="--",
                  label=f"2 / lr = {2 / learning_rate:.3g}")
      a.set(xlabel="training step", ylabel="eigenvalue",
            title=f"top {matrix} eigenvalues")
      a.legend(fontsize="small")
    elif panel == "trace":
      steps = [s for s, _ in rows]
      value = np.array([v["estimate"] for _, v in rows], dtype=float)
      error = np.array([v["stderr"] for _, v in rows], dtype=float)
      a.errorbar(steps, value, yerr=2 * error, marker=".", capsize=2)
      a.set(xlabel="training step", ylabel="trace (+- 2 standard errors)",
            title=f"{matrix} trace")
    else:
      for s, v in rows:
        nodes = np.array(v["nodes"], dtype=float).ravel()
        weights = np.array(v["weights"], dtype=float).ravel()
        keep = np.isfinite(nodes) & np.isfinite(weights) & (weights > 0)
        a.scatter(np.full(keep.sum(), s), nodes[keep],
                  s=2 + 200 * weights[keep] / max(weights[keep].max(), 1e-30),
                  alpha=0.3, color="tab:blue")
      a.set(xlabel="training step", ylabel="eigenvalue (SLQ nodes, size: "
            "weight)", title=f"{matrix} spectrum")
  _save(plt, fig, path)


def _curvature_series(record, panel):
  """One line's figures for a panel of :func:`curvature`, or None."""
  if panel == "eigenvalues":
    found = {}
    if "power" in record:
      found["power"] = record["power"]["eigenvalue"]
    if "lanczos" in record:
      found["lanczos"] = record["lanczos"]["eigenvalues"]
    return found or None
  return record.get(panel)
