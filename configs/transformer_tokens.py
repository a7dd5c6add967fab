r"""Top Hessian eigenvalue of a small decoder-only Transformer, tensor-parallel.

A 2-layer, 4-head, d_model=64 Transformer learns synthetic sequences
t_{i+1} = (t_i + s) mod 32 (stride s per sequence) for 300 Adam steps. Its
kernels carry flax partitioning metadata, and the default mesh puts 2 devices
on the model axis (fewer if the device count is odd) and the rest on data.

Run (8 fake CPU devices: data=4, model=2):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python launch/main.py --config=configs/transformer_tokens.py --workdir=/tmp/tf

It logs `power on transformer_tokens: Hessian eigenvalue 1.28429` (65 s on 2
idle CPU cores with 8 fake devices, 42 s on one) and writes result.json and
power.png. A quick variant: --config=configs/transformer_tokens.py:small
"""

from deeplanczos import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.task = "transformer_tokens"
  c.model.vocab_size = 32
  c.model.max_len = 16
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.num_layers = 2
  c.model.mlp_dim = 128
  c.data.num_sequences = 1024
  c.train.steps = 300
  c.train.learning_rate = 3e-3
  c.batch_size = 128
  c.mesh_shape = (-1, 2)
  c.mesh_shrink = True
  if arg == "small":
    c.model.d_model = 32
    c.model.num_layers = 1
    c.model.mlp_dim = 64
    c.data.num_sequences = 256
    c.train.steps = 30
    c.num_iterations = 5
  return c
