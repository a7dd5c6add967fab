r"""A model with BatchNorm and dropout: a deterministic Hessian all the same.

An MLP with BatchNorm and dropout (rate 0.1) is trained on digits (BatchNorm
keeps running statistics). Its Hessian uses the running statistics
(`--config.hessian.batch_norm=batch` for batch statistics; the state is never
updated) with dropout on, each batch's masks fixed by a key folded from the
batch index. The run first checks, in 3 products, that the operator is
deterministic and symmetric, and records the check in result.json.

Run:
  python launch/main.py --config=configs/bn_dropout_digits.py --workdir=/tmp/bn

It logs `Operator check: {'deterministic': True, 'symmetric': True, ...}`,
then `power on bn_dropout_digits: Hessian eigenvalue 6.40872` (19 s on 2 idle
CPU cores).
"""

import ml_collections

from deeplanczos import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.task = "bn_dropout_digits"
  c.model.features = (64, 64)
  c.model.dropout_rate = 0.1
  c.hessian = ml_collections.ConfigDict(
      {"batch_norm": "running", "dropout": True})
  c.check_operator = True
  if arg == "small":
    c.model.features = (16,)
    c.train.steps = 50
    c.num_iterations = 5
  return c
