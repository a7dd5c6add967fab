r"""Top Hessian eigenvalue of an MLP trained on scikit-learn's digits.

A 64-64 ReLU MLP is trained for 500 Adam steps on the 1797 bundled 8x8 digits
(deterministically), then 30 power iterations, each a full pass over the data
in global batches of 256 (the last batch of 5 is masked, not dropped), give
the dominant eigenvalue of the Hessian of the mean cross-entropy.

Run:
  python launch/main.py --config=configs/mlp_digits.py --workdir=/tmp/mlp_digits

It logs `power on mlp_digits: Hessian eigenvalue 8.35004` (process 0; 11 s on
2 idle CPU cores, with the start-up), and writes
/tmp/mlp_digits/result.json and /tmp/mlp_digits/power.png.

A quick variant: --config=configs/mlp_digits.py:small
"""

from deeplanczos import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.task = "mlp_digits"
  c.model.features = (64, 64)
  if arg == "small":
    c.model.features = (16,)
    c.train.steps = 50
    c.num_iterations = 5
  return c
