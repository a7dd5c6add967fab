"""The config schema: every key a run reads, with its default."""

import difflib
import os
import re

import ml_collections


class ConfigError(ValueError):
  """A config, workdir or task that cannot run; nothing has been written."""


def base_config() -> ml_collections.ConfigDict:
  """The keys every config has, with their defaults; configs override them."""
  c = ml_collections.ConfigDict()
  c.task = "mlp_digits"  # a name in tasks.TASKS, or a user's 'module:function'
  c.method = "power"  # a name in methods.METHODS
  c.seed = 0
  c.model = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict()
  # Deterministic training at start-up, so the Hessian is a trained net's.
  # launch/train.py (the example trainer of a followed run) runs the same loop
  # and saves orbax checkpoints every `checkpoint_every` steps, keeping the
  # newest `keep` (0: all); the optimizer is 'adam' or 'sgd'.
  c.train = ml_collections.ConfigDict(
      {"steps": 500, "batch_size": 128, "learning_rate": 1e-3,
       "optimizer": "adam", "checkpoint_every": 10, "keep": 0})
  # Or the parameters of a training run's orbax checkpoint (a CheckpointManager
  # directory): its step (-1: the latest), the item holding them ("": the
  # only one) and their path in the saved tree. The task still builds the
  # model (the shapes); config.train is then skipped.
  c.params = ml_collections.ConfigDict(
      {"directory": "", "step": -1, "item": "", "path": "params"})
  c.batch_size = 256  # global batch of a Hessian pass
  c.num_iterations = 30
  c.tol = 0.0  # stop early at this relative change; 0 runs every iteration
  c.subset = ""  # a regular expression on parameter paths; "" for all
  # The matrix: 'hessian', 'ggn' (Gauss-Newton) or 'fisher' (empirical).
  c.curvature = "hessian"
  # float32 matrix products in the loss: 'highest' (float32 everywhere), or
  # "" for JAX's default (bfloat16 on TPUs, TensorFloat32 on recent GPUs).
  c.precision = "highest"
  # Products by the pass's linear map at the parameters (data on the devices,
  # a product at a time): faster, a second compile and the activations' memory.
  c.linearize = False
  # steps_per_call: Lanczos steps in one compiled block (0: 'auto', about a
  # second each; -1: one step at a time on the operator's own pass);
  # check_residuals: one more product per pair, what `converged` rests on.
  c.lanczos = ml_collections.ConfigDict(
      {"k": 5, "which": "LA", "ncv": 0, "tol": 1e-6, "max_hvps": 300,
       "steps_per_call": 0, "check_residuals": True})
  # probes_per_call: probes in one batched pass (0: as many as memory holds).
  c.density = ml_collections.ConfigDict(
      {"num_probes": 4, "num_steps": 40, "grid_size": 1000, "sigma": 0.0,
       "probes_per_call": 1})
  c.trace = ml_collections.ConfigDict({"estimator": "hutch++", "num_hvps": 60})
  # Full-batch gradient descent, the top eigenvalue every `every` steps.
  c.sharpness = ml_collections.ConfigDict(
      {"steps": 300, "learning_rate": 0.1, "every": 10, "num_iterations": 20})
  c.mesh_axes = ("data", "model")
  c.mesh_shape = (-1, 1)  # -1: all devices the other axes leave
  c.mesh_shrink = False  # shrink fixed axes to fit the devices present
  c.data_axis = "data"
  c.model_axis = "model"
  # Split every parameter over the data axis too (FSDP): the HVP then gathers
  # one layer at a time (accumulate='split').
  c.fsdp = False
  c.show_pbar = True
  # Check in 3 products that the operator is deterministic and symmetric.
  c.check_operator = False
  # Save the method's state after every this many steps (0: only on SIGTERM);
  # a run started again on the same workdir resumes from the newest one.
  c.checkpoint_every = 5
  # Compile the method's programs and report bytes per device, then exit
  # without training or allocating: "local" (this machine's devices) or a TPU
  # slice to compile for, e.g. "v5e:8x8" (needs the libtpu wheel); "" runs.
  c.dry_run = ""
  # Follow a training run as a long-running job beside it: watch
  # config.params.directory and evaluate every checkpoint step (those there
  # first, oldest first, then each new one) with the methods named here
  # (comma-separated, of power, lanczos, trace, density; "": config.method),
  # appending a line per step to WORKDIR/curvature.jsonl.
  c.follow = False
  c.follow_methods = ""
  c.follow_every = 0  # skip steps fewer than this many after the last one done
  c.follow_until = -1  # end once a step >= this is done (-1: no such step)
  c.follow_timeout = 3600.0  # end after this many seconds with no new step
  c.follow_poll = 5.0  # seconds between looks at the directory
  # The trainer's marker of its last step: its presence in the directory
  # ends the follower once every step there is done.
  c.follow_marker = "training_done"
  c.follow_learning_rate = 0.0  # the trainer's step size: a 2/lr line
  return c


def _keys(config, prefix=""):
  for key, value in config.items():
    name = f"{prefix}{key}"
    yield name
    if isinstance(value, ml_collections.ConfigDict):
      yield from _keys(value, name + ".")


def explain_config_error(argv, error) -> str:
  """One line for a config that does not load, naming what to fix.

  Args:
    argv: the command line.
    error: what loading the config (its file and ``--config.KEY=`` overrides)
      raised.

  Returns:
    ``--config.KEY``: no such key, with the nearest existing one suggested;
    a config file that is missing; or the error's first line.
  """
  known = set(_keys(base_config()))
  for arg in argv:
    match = re.match(r"--config\.([\w.]+)(=|$)", arg)
    if match and match.group(1) not in known:
      key = match.group(1)
      near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
      hint = (f"; did you mean --config.{near[0]}?" if near else
              "; see deeplanczos/experiment/config.py for every key")
      return f"--config.{key}: configs have no key {key!r}{hint}"
    match = re.match(r"--config=([^:]+)", arg)
    if match and not os.path.exists(match.group(1)):
      return (f"--config={match.group(1)}: no such file (configs/ has the "
              "project's; give a path relative to where you run)")
  text = str(error).strip().splitlines()
  return f"the config does not load: {type(error).__name__}: " + (
      text[0] if text else "")
