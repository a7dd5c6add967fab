"""Small flax models for the example configs: digits MLP and CNN, a Transformer.

These are examples to run the library on, not part of its core: any loss of
the form ``loss(params, x, y)`` works.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """A ReLU multi-layer perceptron on flattened inputs."""
  features: Sequence[int] = (64, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Two 3x3 convolutions, average pooling, and a dense classifier."""
  channels: Sequence[int] = (16, 32)
  hidden: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


def _sharded(init, names):
  return nn.with_partitioning(init, names)


class _Block(nn.Module):
  """Pre-norm causal self-attention and MLP, Megatron-style partitioned."""
  d_model: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    head_dim = self.d_model // self.num_heads
    kernel = nn.initializers.lecun_normal()
    b, t, _ = x.shape
    h = nn.LayerNorm()(x)
    qkv = nn.Dense(3 * self.d_model,
                   kernel_init=_sharded(kernel, (None, "model")))(h)
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.num_heads, head_dim), 3,
                        axis=2)
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    att = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits), v)
    x = x + nn.Dense(self.d_model,
                     kernel_init=_sharded(kernel, ("model", None)))(
                         att.reshape(b, t, self.d_model))
    h = nn.LayerNorm()(x)
    h = nn.gelu(nn.Dense(self.mlp_dim,
                         kernel_init=_sharded(kernel, (None, "model")))(h))
    return x + nn.Dense(self.d_model,
                        kernel_init=_sharded(kernel, ("model", None)))(h)


class Transformer(nn.Module):
  """A small decoder-only Transformer language model.

  Its kernels carry flax partitioning metadata naming the ``'model'`` mesh
  axis, so ``nn.get_partition_spec`` gives a tensor-parallel layout.
  """
  vocab_size: int = 32
  max_len: int = 32
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 128

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(
        self.vocab_size, self.d_model,
        embedding_init=_sharded(nn.initializers.normal(0.02), ("model", None)))
    pos = self.param("pos", _sharded(nn.initializers.normal(0.02),
                                     (None, "model")),
                     (self.max_len, self.d_model))
    x = embed(tokens) + pos[: tokens.shape[1]]
    for _ in range(self.num_layers):
      x = _Block(self.d_model, self.num_heads, self.mlp_dim)(x)
    return embed.attend(nn.LayerNorm()(x))


class BNDropoutMLP(nn.Module):
  """An MLP with BatchNorm and dropout: a model with state and randomness.

  ``use_running_average`` picks BatchNorm's statistics (running averages, or
  the batch's own); ``dropout`` turns dropout on (it then needs a
  ``'dropout'`` rng).
  """
  features: Sequence[int] = (64, 64)
  num_classes: int = 10
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, *, use_running_average: bool, dropout: bool):
    x = x.reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.Dense(width)(x)
      x = nn.BatchNorm(use_running_average=use_running_average)(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not dropout)(nn.relu(x))
    return nn.Dense(self.num_classes)(x)
