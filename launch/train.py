r"""The example trainer of a followed run: trains a config's task, checkpointing.

A stand-in for your own training loop: it writes the orbax checkpoints a
flax/orbax trainer writes, for a follower (``launch/main.py`` with
``--config.follow=True``) to read beside it:

  python launch/train.py --config=configs/cnn_digits_follow.py --workdir=/tmp/trainer
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deeplanczos import experiment
from deeplanczos.experiment import logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file from configs/; config.train is used.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The checkpoints go to WORKDIR/checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(logs.OwnInfo(__file__))
  try:
    experiment.train_and_save(_CONFIG.value, _WORKDIR.value)
  except experiment.ConfigError as e:
    raise SystemExit(f"deeplanczos: {e}") from None


if __name__ == "__main__":
  app.run(main)
