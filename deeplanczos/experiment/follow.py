"""Curvature along a training run, as a long-running job beside its trainer.

A trainer writes orbax checkpoints (a ``CheckpointManager`` directory of
numbered steps) and knows nothing of this job. :func:`follow` watches that
directory (``config.params.directory``): the steps already there first,
oldest first, then each new one. For each step it restores the parameters
onto the operator's shardings (each process its own shards) and runs the
methods of ``config.follow_methods`` on one operator moved to them, so
nothing is compiled again after the first step; power and Lanczos start from
the previous step's eigenvectors. A step done is one line of
``WORKDIR/curvature.jsonl``, TensorBoard scalars (and a histogram of the
spectral density) under ``WORKDIR/tensorboard``, and ``curvature.png``.

- Restart-safe: a follower started again on its workdir skips the steps
  in ``curvature.jsonl`` and resumes a half-done step from its methods'
  checkpoints (``WORKDIR/checkpoints/follow``); a SIGTERM mid-step saves
  there and stops, and a line torn by a kill is dropped, never read.
- Multi-host: process 0 decides what comes next (a step, waiting, the end)
  and broadcasts it, so every process evaluates the same step; a step that
  fails to load on any process is skipped by all.
- The trainer's retention: a step deleted before or while it is read is
  skipped with a warning. Orbax writes a step under a temporary name and
  renames it when complete, and only complete steps are listed.
- The end: once a step at or past ``config.follow_until`` is done, once the
  trainer's ``config.follow_marker`` file is there and every step is done,
  or after ``config.follow_timeout`` seconds without a new step; a summary
  goes to the log and ``WORKDIR/result.json``.

TensorBoard events are written with tensorboardX, which needs neither
TensorFlow nor torch (clu's and flax's writers go through TensorFlow).
"""

import dataclasses
import json
import math
import os
import shutil
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorboardX

import deeplanczos
from deeplanczos import checkpoint as checkpoint_lib
from deeplanczos._src import driver
from deeplanczos._src import files
from deeplanczos.experiment import build
from deeplanczos.experiment import methods as methods_lib
from deeplanczos.experiment import plots
from deeplanczos.experiment import workdir as workdir_lib
from deeplanczos.experiment.config import ConfigError

LOG = "curvature.jsonl"
FOLLOWABLE = ("power", "lanczos", "trace", "density")
_EVALUATE, _WAIT, _END = 0, 1, 2
ENDINGS = {1: "a step at or past config.follow_until is done",
           2: "the trainer's marker is there and every step is done",
           3: "no new step within config.follow_timeout"}


def follow_methods(config) -> list[str]:
  """``config.follow_methods`` (or ``config.method``) as a checked list."""
  text = config.follow_methods or config.method
  names = [m.strip() for m in text.split(",") if m.strip()]
  wrong = [m for m in names if m not in FOLLOWABLE]
  if not names or wrong or len(set(names)) != len(names):
    raise ConfigError(
        f"config.follow_methods must name methods of {list(FOLLOWABLE)}, "
        f"comma-separated, each once; got {text!r}.")
  return names


def check(config):
  """Raises ConfigError for a follow config that cannot run."""
  follow_methods(config)
  if not config.params.directory:
    raise ConfigError("config.follow needs config.params.directory: the "
                      "trainer's checkpoint directory to watch.")
  if (config.follow_every < 0 or config.follow_timeout <= 0 or
      config.follow_poll <= 0):
    raise ConfigError(
        "config.follow_every must be >= 0 and config.follow_timeout and "
        f"config.follow_poll > 0; got {config.follow_every}, "
        f"{config.follow_timeout} and {config.follow_poll}.")


def read_log(path: str) -> list[dict]:
  """The complete lines of ``curvature.jsonl``, oldest step first.

  A last line without its newline was torn by a kill while it was written;
  it is cut off the file (with a warning) and its step is done again.
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  if end < len(data):
    logging.warning("Dropping the incomplete last line of %s (%d bytes): its "
                    "step is evaluated again.", path, len(data) - end)
    with open(path, "r+b") as f:
      f.truncate(end)
  return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def _append(path: str, record: dict):
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


class _Watcher:
  """Process 0's view of the trainer's directory, and what to do next."""

  def __init__(self, config, done: list[int]):
    self.directory = config.params.directory
    self.config = config
    self.last = max(done, default=None)
    self.done = set(done)
    self.skipped = set()
    self.seen = set()
    self.since = time.monotonic()

  def _steps(self) -> list[int]:
    try:
      steps = deeplanczos.checkpoint_steps(self.directory)
    except FileNotFoundError:
      steps = []  # the trainer has not created it yet
    if set(steps) - self.seen:
      self.seen |= set(steps)
      self.since = time.monotonic()
    return steps

  def decide(self) -> tuple[int, int]:
    """``(_EVALUATE, step)``, ``(_WAIT, 0)`` or ``(_END, reason)``."""
    c = self.config
    steps = self._steps()
    if c.follow_until >= 0 and self.last is not None and (
        self.last >= c.follow_until):
      return _END, 1
    for step in steps:
      if step in self.done or step in self.skipped:
        continue
      if self.last is None or step >= self.last + max(c.follow_every, 1):
        return _EVALUATE, step
    if c.follow_until >= 0 and steps and steps[-1] >= c.follow_until:
      return _END, 1
    if os.path.exists(os.path.join(self.directory, c.follow_marker)):
      return _END, 2
    if time.monotonic() - self.since > c.follow_timeout:
      return _END, 3
    return _WAIT, 0


def _broadcast(values) -> tuple[int, ...]:
  """Process 0's integers, on every process."""
  values = np.asarray(values, np.int32)
  if jax.process_count() > 1:
    values = multihost_utils.broadcast_one_to_all(values)
  return tuple(int(v) for v in np.asarray(values))


def _all(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def _restore(config, like, step):
  """Step ``step``'s parameters, or None where any process failed to read it.

  A step that vanished (the trainer's retention) or does not load is
  skipped with a warning; parameters that disagree with the model in
  structure, shape or dtype are a ConfigError, as every step would fail.
  """
  c = config.params
  step_dir = os.path.join(c.directory, str(step))
  params, why = None, None
  try:
    params = deeplanczos.restore_params(c.directory, like, step=step,
                                        path=c.path, item=c.item or None)
  except Exception as e:  # pylint: disable=broad-except
    if not os.path.isdir(step_dir):
      why = "it was deleted (the trainer's retention?)"
    elif isinstance(e, ValueError):
      raise ConfigError(f"config.params, step {step}: {e}") from e
    else:
      why = f"it cannot be read ({type(e).__name__}: {str(e)[:300]})"
  if not _all(params is not None):
    logging.warning("Skipping step %d of %s: %s.", step, c.directory,
                    why or "another process could not read it")
    return None
  return params


def _figures(name: str, r: dict) -> dict:
  """The part of a method's result that a line of curvature.jsonl keeps."""
  keys = {"power": ("eigenvalue",),
          "lanczos": ("eigenvalues", "residuals", "converged"),
          "trace": ("estimate", "stderr", "estimator"),
          "density": ("nodes", "weights", "sigma")}[name]
  return {**{k: r[k] for k in keys}, "num_hvps": r["num_hvps"]}


class _Board:
  """TensorBoard scalars (and the density as a histogram), process 0."""

  def __init__(self, logdir: str, num_params: int):
    self.writer = tensorboardX.SummaryWriter(logdir)
    self.num_params = num_params

  def write(self, record: dict):
    step, add = record["step"], self.writer.add_scalar
    if record.get("loss") is not None:
      add("loss", record["loss"], step)
    if "power" in record:
      add("power/eigenvalue", record["power"]["eigenvalue"], step)
    if "lanczos" in record:
      for i, lam in enumerate(record["lanczos"]["eigenvalues"]):
        add(f"lanczos/eigenvalue_{i + 1}", lam, step)
    if "trace" in record:
      add("trace/estimate", record["trace"]["estimate"], step)
      add("trace/stderr", record["trace"]["stderr"], step)
    if "density" in record:
      self._density(record["density"], step)
    for name in FOLLOWABLE:
      if name in record:
        add(f"seconds/{name}", record[name]["seconds"], step)
    self.writer.flush()

  def _density(self, d: dict, step: int):
    """SLQ's nodes as a histogram: weights scaled to eigenvalue counts."""
    nodes = np.array(d["nodes"], dtype=float).ravel()
    weights = np.array(d["weights"], dtype=float).ravel()
    keep = np.isfinite(nodes) & np.isfinite(weights)
    nodes, weights = nodes[keep], weights[keep]
    if not len(nodes):
      return
    shape = np.shape(d["nodes"])
    probes = shape[0] if len(shape) == 2 else 1
    edges = np.linspace(nodes.min(), nodes.max() + 1e-12, 65)
    counts, _ = np.histogram(nodes, edges,
                             weights=weights * self.num_params / probes)
    centers = (edges[1:] + edges[:-1]) / 2
    self.writer.add_histogram_raw(
        "density/spectrum", min=float(nodes.min()), max=float(nodes.max()),
        num=float(counts.sum()), sum=float((counts * centers).sum()),
        sum_squares=float((counts * centers**2).sum()),
        bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
        global_step=step)

  def close(self):
    self.writer.close()


def _check_same_run(workdir, fingerprint, have_lines):
  """Refuses a workdir whose curvature.jsonl another config wrote."""
  path = os.path.join(workdir, "follow.json")
  if have_lines and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    changed = checkpoint_lib.differences(saved, fingerprint)
    if changed:
      raise ConfigError(
          f"{os.path.join(workdir, LOG)} was written by another follower; "
          "what changed: " + "; ".join(changed) + ". Use another workdir.")
  files.write_json(path, fingerprint, indent=2)


def follow(config, workdir: str, handle_sigterm: bool = False) -> dict:
  """Follows ``config.params.directory``; see the module's docstring.

  Args:
    config: a run's config with ``config.follow`` set.
    workdir: where curvature.jsonl, TensorBoard events, the plot, the
      methods' checkpoints and result.json go.
    handle_sigterm: a SIGTERM saves the running method's state (or stops
      waiting) and raises ``checkpoint.Preempted``; run again to resume.

  Returns:
    The summary that ``result.json`` holds (the other processes' lists only
    this run's steps, not those of curvature.jsonl's earlier runs).
  """
  check(config)
  with driver.SigtermGuard(handle_sigterm) as sigterm:
    mesh, task, shardings, dataset = build.prepare(config)
    lead = jax.process_index() == 0
    workdir_lib.make(workdir, lead)
    with workdir_lib.Lock(workdir, lead):
      follower = _Follower(config, workdir, task, (mesh, shardings, dataset),
                           sigterm, handle_sigterm)
      try:
        reason = follower.loop()
      finally:
        follower.close()
  return follower.summary(reason)


class _Follower:
  """One follow job's state: the operator, warm starts, lines, counts."""

  def __init__(self, config, workdir, task, placement, sigterm,
               handle_sigterm):
    self.config, self.workdir, self.task = config, workdir, task
    self.mesh, self.shardings, self.dataset = placement
    self.sigterm, self.handle_sigterm = sigterm, handle_sigterm
    self.lead = jax.process_index() == 0
    self.methods = follow_methods(config)
    self.fingerprint = build.jsonable(
        workdir_lib.fingerprint(config, task.params, self.mesh))
    self.records = read_log(os.path.join(workdir, LOG)) if self.lead else []
    if self.lead:
      _check_same_run(workdir, self.fingerprint, bool(self.records))
    self.watcher = _Watcher(config, [r["step"] for r in self.records])
    self.like = build.restore_target(task, self.shardings)
    self.board = (_Board(os.path.join(workdir, "tensorboard"),
                         sum(math.prod(l.shape)
                             for l in jax.tree.leaves(self.like)))
                  if self.lead else None)
    self.op, self.warm, self.skipped, self.hvps = None, {}, [], 0

  def close(self):
    if self.board is not None:
      self.board.close()

  def loop(self) -> int:
    """Steps until the end; returns the reason's key in :data:`ENDINGS`."""
    c = self.config
    logging.info("Following %s: %s at every step%s.", c.params.directory,
                 ", ".join(self.methods),
                 f" (resuming after step {self.watcher.last})"
                 if self.records else "")
    while True:
      if self.sigterm.anywhere():
        raise checkpoint_lib.Preempted(None, "while waiting for a step")
      kind, value = _broadcast(self.watcher.decide() if self.lead else (0, 0))
      if kind == _END:
        return value
      if kind == _WAIT:
        deadline = time.monotonic() + c.follow_poll
        while time.monotonic() < deadline and not self.sigterm.received:
          time.sleep(min(0.1, c.follow_poll))
        continue
      params = _restore(c, self.like, value)
      if params is None:
        self.watcher.skipped.add(value)
        self.skipped.append(value)
        continue
      self._step(value, params)

  def _step(self, step, params):
    """One step: the operator moved there, every method, the outputs."""
    if self.op is None:
      self.op = build.operator(
          self.config, dataclasses.replace(self.task, params=params),
          self.mesh, self.shardings, self.dataset)
    else:
      self.op = self.op.with_params(params)
    record = self._evaluate(step)
    self.records.append(record)
    if self.lead:
      _append(os.path.join(self.workdir, LOG), record)
      self.board.write(record)
      plots.curvature(self.records,
                      os.path.join(self.workdir, "curvature.png"),
                      matrix=build.MATRICES[self.config.curvature],
                      learning_rate=self.config.follow_learning_rate)
      shutil.rmtree(os.path.join(self.workdir, "checkpoints", "follow"),
                    ignore_errors=True)
      logging.info("Step %d: %s (%.1f s).", step, _line(record),
                   record["seconds"])
    self.watcher.done.add(step)
    self.watcher.last = step

  def _evaluate(self, step) -> dict:
    """Every method at one step: a line of curvature.jsonl."""
    tick = time.perf_counter()
    record = {"step": step}
    for name in self.methods:
      checkpointer = checkpoint_lib.Checkpointer(
          os.path.join(self.workdir, "checkpoints", "follow", f"step_{step}",
                       name),
          every=self.config.checkpoint_every,
          handle_sigterm=self.handle_sigterm,
          fingerprint={**self.fingerprint, "step": step, "method": name})
      start = time.perf_counter()
      warm = ({"v0": self.warm.get(name)} if name in ("power", "lanczos")
              else {})
      try:
        r = methods_lib.METHODS[name].run(
            self.op, self.config, self.task, show_pbar=False,
            checkpointer=checkpointer, **warm)
      except checkpoint_lib.Mismatch as e:
        raise ConfigError(str(e)) from e
      finally:
        checkpointer.close()
      if "eigenpairs" in r:
        self.warm[name] = jax.tree.map(lambda a: a.sum(0), r["eigenpairs"][1])
      self.hvps += r["num_hvps"]
      record[name] = {**_figures(name, r),
                      "seconds": time.perf_counter() - start}
    record["loss"] = self.op.loss_value
    record["seconds"] = time.perf_counter() - tick
    return build.jsonable(record)

  def summary(self, reason) -> dict:
    """The job's summary: logged and written to result.json (process 0)."""
    c, op = self.config, self.op
    steps = [r["step"] for r in self.records]
    result = build.jsonable({
        "method": "follow", "task": c.task, "methods": self.methods,
        "directory": c.params.directory, "steps": steps,
        "skipped": self.skipped, "ended_by": ENDINGS[reason],
        "mesh": dict(op.mesh.shape) if op else None,
        "accumulate": op.kernel.accumulate if op else None,
        "num_hvps": self.hvps, "config": c.to_dict()})
    tops = [r["power"]["eigenvalue"] if "power" in r else
            r["lanczos"]["eigenvalues"][0] for r in self.records
            if "power" in r or "lanczos" in r]
    if self.lead:
      files.write_json(os.path.join(self.workdir, "result.json"), result,
                       indent=2)
      logging.info(
          "Followed %s: %d steps done%s, %d skipped; ended: %s.%s Results in "
          "%s.", c.params.directory, len(steps),
          f" ({steps[0]}..{steps[-1]})" if steps else "", len(self.skipped),
          ENDINGS[reason],
          f" Top eigenvalue {tops[0]:.6g} -> {tops[-1]:.6g}." if tops else "",
          self.workdir)
    return result


def _line(record: dict) -> str:
  parts = []
  if "power" in record:
    parts.append(f"top eigenvalue {record['power']['eigenvalue']:.6g}")
  if "lanczos" in record:
    parts.append("eigenvalues " + ", ".join(
        f"{v:.6g}" for v in record["lanczos"]["eigenvalues"]))
  if "trace" in record:
    t = record["trace"]
    parts.append(f"trace {t['estimate']:.6g} +- {t['stderr']:.2g}")
  if "density" in record:
    nodes = np.array(record["density"]["nodes"], dtype=float)
    parts.append(f"spectrum in [{np.nanmin(nodes):.4g}, "
                 f"{np.nanmax(nodes):.4g}]")
  return "; ".join(parts)
