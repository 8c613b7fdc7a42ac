"""Shared building blocks: norms, timestep embeddings, resampling, ResNet block.

Everything is NHWC. Param names follow the PyTorch modules they mirror
(`kernel`/`bias` for Linear and Conv, `scale`/`bias` for norms) so that the
weight converter is a renaming plus layout change.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def checkpoint_init(key, shape, dtype=jnp.float32):
  """The initialiser of a param that always comes from a checkpoint: zeros, since only its shape is ever used.

  Flax checks each param's shape on every `apply` against an `eval_shape` of its initialiser; tracing a random
  one (lecun normal: threefry and erf_inv) there costs about 5 ms per param, 2.5 s per trace of the tiny SDXL's
  inversion program, and zeros almost nothing. Modules that are trained from scratch (the H-space adapter) pass
  a random initialiser instead.
  """
  del key
  return jnp.zeros(shape, dtype)


Dense = functools.partial(nn.Dense, kernel_init=checkpoint_init)  # torch Linear loaded from a checkpoint
Embed = functools.partial(nn.Embed, embedding_init=checkpoint_init)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over the channel (last) axis; statistics in fp32."""

  num_groups: int
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    shape = xf.shape
    g = xf.reshape(shape[0], -1, self.num_groups, c // self.num_groups)  # [B, HW, G, C/G]
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = g.reshape(shape) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis; statistics in fp32."""

  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(jnp.float32)
    return y.astype(self.dtype)


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
         dtype=jnp.float32, name: str | None = None) -> nn.Conv:
  """A torch-style Conv2d (symmetric padding, default 'same' for odd kernels)."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, kernel_init=checkpoint_init, name=name)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, [N] -> [N, dim], fp32.

  Same frequencies and ordering as diffusers' `get_timestep_embedding`.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """Linear -> SiLU -> Linear (diffusers `TimestepEmbedding`)."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    x = nn.silu(x)
    return Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class Downsample(nn.Module):
  """Strided 3x3 conv. `padding=0` reproduces the VAE's asymmetric (0,1,0,1) pad."""

  features: int
  padding: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.features, 3, stride=2, padding=self.padding, dtype=self.dtype, name="conv")(x)


def resize_nearest(x, size):
  """torch legacy nearest resize of NHWC to `size`: src = floor(dst * in / out)."""
  b, h, w, c = x.shape
  if size[0] % h == 0 and size[1] % w == 0:  # integer factors: a broadcast, no gather
    fh, fw = size[0] // h, size[1] // w
    return jnp.broadcast_to(x[:, :, None, :, None], (b, h, fh, w, fw, c)).reshape(b, size[0], size[1], c)
  hi = (jnp.arange(size[0]) * x.shape[1]) // size[0]
  wi = (jnp.arange(size[1]) * x.shape[2]) // size[1]
  return x[:, hi][:, :, wi]


class Upsample(nn.Module):
  """diffusers `Upsample2D`: nearest to `size` (2x when None), then 3x3 conv."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size=None):
    size = size or (2 * x.shape[1], 2 * x.shape[2])
    return conv(self.features, 3, dtype=self.dtype, name="conv")(resize_nearest(x, size))


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` (time_scale_shift 'default', output_scale_factor 1)."""

  features: int
  groups: int = 32
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.silu(GroupNorm(self.groups, self.epsilon, self.dtype, name="norm1")(x))
    h = conv(self.features, 3, dtype=self.dtype, name="conv1")(h)
    if temb is not None:
      t = Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.epsilon, self.dtype, name="norm2")(h))
    h = conv(self.features, 3, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(x)
    return x + h
