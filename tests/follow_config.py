"""A follower of the tiny user model's training run, for tests.

``get_config("power,trace")`` follows with those methods; the default runs
all four. The trainer's directory comes from ``config.params.directory``.
"""

from deeplanczos import experiment


def get_config(arg=None):
  """A tiny user model (43 parameters) trained by SGD, saved every 2 steps."""
  c = experiment.base_config()
  c.task = "tests.helpers:user_task"
  c.batch_size = 20
  c.train.update(steps=6, batch_size=20, optimizer="sgd", learning_rate=0.5,
                 checkpoint_every=2)
  c.follow = True
  c.follow_methods = arg or "power,lanczos,trace,density"
  c.follow_poll = 0.05
  c.follow_timeout = 30.0
  c.follow_learning_rate = 0.5
  c.num_iterations = 60
  c.lanczos.update(k=3, ncv=12)
  c.trace.num_hvps = 30
  c.density.update(num_probes=2, num_steps=10)
  c.show_pbar = False
  return c
