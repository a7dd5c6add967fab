"""A training run that checkpoints as flax/orbax loops do: what a follower reads.

The stand-in for a user's trainer in the follow example (``launch/train.py``):
the task's training loop (:func:`tasks.train`), saving ``{'params',
'opt_state'}`` with an orbax ``CheckpointManager`` into
``WORKDIR/checkpoints`` at step 0 and every ``config.train.checkpoint_every``
steps (asynchronously, as training loops do), keeping the newest
``config.train.keep``, and the last step always; then an empty
``config.follow_marker`` file there says that training is over.
"""

import os

from absl import logging
import orbax.checkpoint as ocp

from deeplanczos.experiment import tasks as tasks_lib
from deeplanczos.experiment.config import ConfigError


def train_and_save(config, workdir: str) -> str:
  """Trains ``config``'s task, checkpointing; returns the checkpoint directory."""
  c = config.train
  if c.checkpoint_every < 1 or c.keep < 0:
    raise ConfigError(
        "config.train.checkpoint_every must be >= 1 and config.train.keep "
        f">= 0 (0 keeps every step); got {c.checkpoint_every} and {c.keep}.")
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  marker = os.path.join(directory, config.follow_marker)
  if os.path.exists(marker):
    os.remove(marker)  # a training run again in the same workdir
  options = ocp.CheckpointManagerOptions(max_to_keep=c.keep or None,
                                         create=True)
  with ocp.CheckpointManager(directory, options=options) as manager:

    def save(step, params, opt_state):
      if step % c.checkpoint_every == 0 or step == c.steps:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
            {"params": params, "opt_state": opt_state})))
        logging.info("Saved training step %d.", step)

    tasks_lib.train(tasks_lib.build_task(config), config, save=save)
    manager.wait_until_finished()
  with open(marker, "w"):
    pass
  logging.info("Training done: %d steps, checkpoints in %s.", c.steps,
               directory)
  return directory
