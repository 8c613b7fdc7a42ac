"""AutoencoderKL (SD / SDXL VAE), NHWC: encode to a diagonal Gaussian, decode.

Latents handed to the UNet are `(sample - shift_factor) * scaling_factor`;
`encode` and `decode` apply that scaling so callers never do it by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kadiff_jax.models import layers
from kadiff_jax.models.config_util import ConfigError, read_fields
from kadiff_jax.programs import serializable


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  sample_size: int = 1024
  scaling_factor: float = 0.13025
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True

  @classmethod
  def from_diffusers(cls, cfg: dict[str, Any]) -> "VAEConfig":
    n = len(cfg.get("block_out_channels", cls.block_out_channels))
    f = read_fields("vae", cfg, supported={
        "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
        "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "use_quant_conv",
        "use_post_quant_conv", "mid_block_add_attention", "force_upcast", "down_block_types",
        "up_block_types"},
        fixed={"act_fn": "silu", "latents_mean": None, "latents_std": None},
        ignored=set())
    for name, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      got = tuple(f.pop(name, (want,) * n))
      if got != (want,) * n:
        raise ConfigError(f"vae config field {name!r} = {list(got)} is not supported (expected {n} x {want!r})")
    if "block_out_channels" in f:
      f["block_out_channels"] = tuple(f["block_out_channels"])
    if isinstance(f.get("sample_size"), (list, tuple)):
      f["sample_size"] = f["sample_size"][0]
    return cls(**f)

  def to_diffusers(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    n = len(self.block_out_channels)
    return {"_class_name": "AutoencoderKL", **d, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "act_fn": "silu"}


def sdxl() -> VAEConfig:
  """The SDXL VAE (stabilityai/sdxl-vae)."""
  return VAEConfig()


def tiny() -> VAEConfig:
  return VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)


class VAEAttention(nn.Module):
  """Single-head spatial self-attention of the VAE mid block (with its own GroupNorm)."""

  groups: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = layers.GroupNorm(self.groups, 1e-6, self.dtype, name="group_norm")(x).reshape(b, h * w, c)
    q = layers.Dense(c, dtype=self.dtype, name="to_q")(y)[:, :, None]  # [B, HW, 1, C]
    k = layers.Dense(c, dtype=self.dtype, name="to_k")(y)[:, :, None]
    v = layers.Dense(c, dtype=self.dtype, name="to_v")(y)[:, :, None]
    o = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
    return x + layers.Dense(c, dtype=self.dtype, name="to_out_0")(o).reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int
  attention: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = layers.ResnetBlock(c, self.groups, 1e-6, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
    return layers.ResnetBlock(c, self.groups, 1e-6, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  config: VAEConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.config, self.dtype
    g = cfg.norm_num_groups
    h = layers.conv(cfg.block_out_channels[0], 3, dtype=dt, name="conv_in")(x)
    for i, ch in enumerate(cfg.block_out_channels):
      block = _EncoderBlock(ch, cfg.layers_per_block, g, i < len(cfg.block_out_channels) - 1, dt,
                            name=f"down_blocks_{i}")
      h = block(h)
    h = MidBlock(g, cfg.mid_block_add_attention, dt, name="mid_block")(h)
    h = nn.silu(layers.GroupNorm(g, 1e-6, dt, name="conv_norm_out")(h))
    return layers.conv(2 * cfg.latent_channels, 3, dtype=dt, name="conv_out")(h)


class _EncoderBlock(nn.Module):
  features: int
  depth: int
  groups: int
  downsample: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h):
    for j in range(self.depth):
      h = layers.ResnetBlock(self.features, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(h)
    if self.downsample:
      h = layers.Downsample(self.features, 0, self.dtype, name="downsamplers_0")(h)
    return h


class _DecoderBlock(nn.Module):
  features: int
  depth: int
  groups: int
  upsample: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h):
    for j in range(self.depth + 1):
      h = layers.ResnetBlock(self.features, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(h)
    if self.upsample:
      h = layers.Upsample(self.features, self.dtype, name="upsamplers_0")(h)
    return h


class Decoder(nn.Module):
  config: VAEConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, z):
    cfg, dt = self.config, self.dtype
    g = cfg.norm_num_groups
    rev = tuple(reversed(cfg.block_out_channels))
    h = layers.conv(rev[0], 3, dtype=dt, name="conv_in")(z)
    h = MidBlock(g, cfg.mid_block_add_attention, dt, name="mid_block")(h)
    for i, ch in enumerate(rev):
      h = _DecoderBlock(ch, cfg.layers_per_block, g, i < len(rev) - 1, dt, name=f"up_blocks_{i}")(h)
    h = nn.silu(layers.GroupNorm(g, 1e-6, dt, name="conv_norm_out")(h))
    return layers.conv(cfg.out_channels, 3, dtype=dt, name="conv_out")(h)


@serializable
class Posterior(NamedTuple):
  """Diagonal Gaussian over unscaled latents, [B, h, w, latent_channels]."""

  mean: jax.Array
  logvar: jax.Array

  def sample(self, key) -> jax.Array:
    std = jnp.exp(0.5 * self.logvar)
    return self.mean + std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class AutoencoderKL(nn.Module):
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, dtype=self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.conv(cfg.latent_channels, 1, dtype=self.dtype)

  def encode(self, x) -> Posterior:
    m = self.encoder(x.astype(self.dtype))
    if self.config.use_quant_conv:
      m = self.quant_conv(m)
    mean, logvar = jnp.split(m.astype(jnp.float32), 2, axis=-1)
    return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z):
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, x):
    return self.decode(self.encode(x).mean)


def encode(params, images, *, config: VAEConfig, key=None, dtype=jnp.float32) -> jax.Array:
  """Images [B, H, W, 3] in [-1, 1] -> scaled latents [B, H/8, W/8, C].

  With `key` the posterior is sampled; without, its mean is used (as KA-Diff does).
  """
  post = AutoencoderKL(config, dtype).apply({"params": params}, images, method=AutoencoderKL.encode)
  z = post.mean if key is None else post.sample(key)
  return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def posterior(params, images, *, config: VAEConfig, dtype=jnp.float32) -> Posterior:
  """The unscaled posterior of `images` (for callers who need mean and logvar)."""
  return AutoencoderKL(config, dtype).apply({"params": params}, images, method=AutoencoderKL.encode)


def decode(params, latents, *, config: VAEConfig, dtype=jnp.float32) -> jax.Array:
  """Scaled latents [B, h, w, C] -> images [B, 8h, 8w, 3], roughly in [-1, 1] (not clipped)."""
  z = latents.astype(jnp.float32) / config.scaling_factor + (config.shift_factor or 0.0)
  return AutoencoderKL(config, dtype).apply({"params": params}, z, method=AutoencoderKL.decode)


def init_shapes(config: VAEConfig):
  x = jax.ShapeDtypeStruct((1, 64, 64, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x_: AutoencoderKL(config).init(jax.random.PRNGKey(0), x_), x)["params"]
