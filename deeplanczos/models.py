"""Small flax models for the example configs: digits MLP and CNN, a Transformer.

These are examples to run the library on, not part of its core: any loss of
the form ``loss(params, x, y)`` works.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
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
  """Pre-norm causal self-attention and MLP, Megatron-style partitioned.

  With ``head_kernels`` the attention projections are ``nn.DenseGeneral``
  kernels of shape ``(d_model, heads, head_dim)`` split over their heads
  axis (as large checkpoints store them), with ``num_kv_heads`` key/value
  heads (grouped-query attention) and a gated (SwiGLU) MLP; otherwise fused
  ``nn.Dense`` projections and a GELU MLP.
  """
  d_model: int
  num_heads: int
  mlp_dim: int
  head_kernels: bool = False
  num_kv_heads: int | None = None
  dtype: jnp.dtype | None = None
  activation_sharding: jax.sharding.Sharding | None = None

  def _attention_heads(self, h):
    """``(q, k, v)``, each ``(batch, time, heads, head_dim)``."""
    head_dim = self.d_model // self.num_heads
    kernel = nn.initializers.lecun_normal()
    if not self.head_kernels:
      b, t, _ = h.shape
      qkv = nn.Dense(3 * self.d_model, dtype=self.dtype,
                     kernel_init=_sharded(kernel, (None, "model")))(h)
      return jnp.split(qkv.reshape(b, t, 3 * self.num_heads, head_dim), 3,
                       axis=2)
    kv_heads = self.num_kv_heads or self.num_heads
    # DenseGeneral initializes the kernel flattened to 2-D, then reshapes it.
    proj = lambda heads, name: nn.DenseGeneral(
        (heads, head_dim), use_bias=False, dtype=self.dtype, name=name,
        kernel_init=_sharded(kernel, (None, "model", None)))(h)
    q, k, v = proj(self.num_heads, "query"), proj(kv_heads, "key"), proj(
        kv_heads, "value")
    repeat = self.num_heads // kv_heads
    return q, jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)

  @nn.compact
  def __call__(self, x):
    head_dim = self.d_model // self.num_heads
    kernel = nn.initializers.lecun_normal()
    b, t, _ = x.shape
    if self.activation_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, self.activation_sharding)
    q, k, v = self._attention_heads(nn.LayerNorm(dtype=self.dtype)(x))
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    att = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(logits), v)
    if self.head_kernels:
      x = x + nn.DenseGeneral(
          self.d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
          name="out", kernel_init=_sharded(kernel, ("model", None, None)))(att)
    else:
      x = x + nn.Dense(self.d_model, dtype=self.dtype,
                       kernel_init=_sharded(kernel, ("model", None)))(
                           att.reshape(b, t, self.d_model))
    h = nn.LayerNorm(dtype=self.dtype)(x)
    up = lambda: nn.Dense(self.mlp_dim, use_bias=not self.head_kernels,
                          dtype=self.dtype,
                          kernel_init=_sharded(kernel, (None, "model")))(h)
    h = nn.silu(up()) * up() if self.head_kernels else nn.gelu(up())
    return x + nn.Dense(self.d_model, use_bias=not self.head_kernels,
                        dtype=self.dtype,
                        kernel_init=_sharded(kernel, ("model", None)))(h)


class _ScannedBlock(_Block):
  """A block as a ``nn.scan`` body: ``(x, None) -> (block(x), None)``."""

  def __call__(self, x, _):
    return super().__call__(x), None


class Transformer(nn.Module):
  """A decoder-only Transformer language model.

  Its kernels carry flax partitioning metadata naming the ``'model'`` mesh
  axis, so ``nn.get_partition_spec`` gives a tensor-parallel layout.

  Written the ways large models are: ``scan_layers`` stacks the layers'
  parameters on a leading axis and runs them with ``nn.scan`` (one compiled
  layer), ``remat`` recomputes each layer's activations in the backward pass
  (``nn.remat``), ``head_kernels`` gives Llama-shaped layers (multi-axis
  ``DenseGeneral`` attention kernels, ``num_kv_heads`` grouped-query heads, a
  gated MLP), and ``dtype`` is the computation dtype (``jnp.bfloat16`` with
  bf16 parameters for a large checkpoint).
  """
  vocab_size: int = 32
  max_len: int = 32
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 128
  scan_layers: bool = False
  remat: bool = False
  head_kernels: bool = False
  num_kv_heads: int | None = None
  dtype: jnp.dtype | None = None
  activation_sharding: jax.sharding.Sharding | None = None

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(
        self.vocab_size, self.d_model, dtype=self.dtype,
        embedding_init=_sharded(nn.initializers.normal(0.02), ("model", None)))
    pos = self.param("pos", _sharded(nn.initializers.normal(0.02),
                                     (None, "model")),
                     (self.max_len, self.d_model))
    x = embed(tokens) + pos[: tokens.shape[1]].astype(self.dtype or pos.dtype)
    options = dict(d_model=self.d_model, num_heads=self.num_heads,
                   mlp_dim=self.mlp_dim, head_kernels=self.head_kernels,
                   num_kv_heads=self.num_kv_heads, dtype=self.dtype,
                   activation_sharding=self.activation_sharding)
    if self.scan_layers:
      block = nn.remat(_ScannedBlock) if self.remat else _ScannedBlock
      x, _ = nn.scan(block, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=self.num_layers,
                     metadata_params={nn.PARTITION_NAME: None})(
                         **options, name="layers")(x, None)
    else:
      block = nn.remat(_Block) if self.remat else _Block
      for _ in range(self.num_layers):
        x = block(**options)(x)
    return embed.attend(nn.LayerNorm(dtype=self.dtype)(x))


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
