r"""Curvature along a training run, from a second job beside the trainer.

The trainer (launch/train.py, a stand-in for your own loop) trains the digits
CNN of configs/cnn_digits.py from its initialization by gradient descent
(step size 0.1, batches of 1797 = the whole set, 300 steps) and saves orbax
checkpoints every 10 steps; the follower (launch/main.py with
config.follow) evaluates each step as it appears: the top Hessian eigenvalue
(20 power iterations, warm-started from the previous step's eigenvector) and
the trace (Hutch++, 30 products).

Run the two side by side (the follower waits for the trainer's steps):
  python launch/train.py --config=configs/cnn_digits_follow.py --workdir=/tmp/trainer &
  python launch/main.py --config=configs/cnn_digits_follow.py --workdir=/tmp/follower

The trainer takes 20 s; the follower logs a line per step (4 s each on 2
idle CPU cores, 20 s for the first; 2 min 37 s in all), `Step 300: top
eigenvalue 27.753; trace 154.793 +- 6.7 (4.6 s).`, and ends with `Followed
/tmp/trainer/checkpoints: 31 steps done (0..300), 0 skipped; ended: the
trainer's marker is there and every step is done. Top eigenvalue 1.04453 ->
27.753.` The top eigenvalue crosses 2/lr = 20 between steps 100 and 110 and
stays above it. It writes curvature.jsonl (a line per step),
curvature.png (the top eigenvalue against the step with the 2/lr line, and
the trace), tensorboard/ and result.json. A quick variant:
--config=configs/cnn_digits_follow.py:small (both commands).
"""

from deeplanczos import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.task = "cnn_digits"
  c.model.channels = (16, 32)
  c.model.hidden = 64
  c.train.steps = 300
  c.train.optimizer = "sgd"
  c.train.learning_rate = 0.1
  c.train.batch_size = 1797
  c.train.checkpoint_every = 10
  c.params.directory = "/tmp/trainer/checkpoints"
  c.params.path = "params"
  c.follow = True
  c.follow_methods = "power,trace"
  c.follow_learning_rate = c.train.learning_rate
  c.follow_timeout = 600.0
  c.num_iterations = 20
  c.trace.num_hvps = 30
  c.show_pbar = False
  if arg == "small":
    c.model.channels = (4, 8)
    c.model.hidden = 16
    c.train.steps = 20
    c.train.checkpoint_every = 5
    c.num_iterations = 10
    c.trace.num_hvps = 12
    c.follow_timeout = 120.0
  return c
