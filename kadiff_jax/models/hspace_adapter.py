"""The H-space adapter of ImageRAGTurbo (HSPACE_SPEC §5, Eqs. 4-5): cross-attention from target to retrieved tokens.

    Δh = proj_out(block(proj_in(GroupNorm(h_t)), context = h0_r tokens))

where `block` is one SD transformer block (LayerNorm + self-attention,
LayerNorm + cross-attention to the retrieved tokens, LayerNorm + GEGLU feed-
forward x4, each residual); the caller adds λ·Δh to h_t. Choice Q6: this is
diffusers' `Transformer2DModel` (linear projections, one layer) without its
outer residual, so at 1280 channels with 20 heads of 64 it has 36,071,680
parameters, the paper's 36M. The retrieved tokens (64·k of them at 512 px)
enter the keys and values as they are, with no norm and no position. proj_out
starts at zero (`init_params`), so an untrained adapter leaves h_t unchanged.
Parameter names follow diffusers' (`transformer_blocks.0.attn2.to_k`, ...), so a
diffusers `Transformer2DModel` loads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kadiff_jax.models import layers
from kadiff_jax.models.attention import Attention
from kadiff_jax.models.unet import FeedForward, UNetConfig


@dataclasses.dataclass(frozen=True)
class HSpaceAdapterConfig:
  channels: int = 1280       # the H-space width (the UNet's last block_out_channels)
  heads: int = 20
  norm_num_groups: int = 32

  @property
  def dim_head(self) -> int:
    return self.channels // self.heads

  @classmethod
  def for_unet(cls, config: UNetConfig) -> "HSpaceAdapterConfig":
    """The adapter for a UNet: its mid block's width, heads and norm groups (20 x 64 and 32 for SD2.1)."""
    return cls(config.block_out_channels[-1], config.attention_heads[-1], config.norm_num_groups)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_RANDOM_INIT = nn.initializers.lecun_normal()  # trained from scratch: not the pretrained layers' checkpoint_init


class HSpaceAdapter(nn.Module):
  config: HSpaceAdapterConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, retrieved):
    """h: [B, H, W, C] target H-space map; retrieved: [B, L, C] retrieved tokens. Returns Δh [B, H, W, C]."""
    cfg, dt = self.config, self.dtype
    b, hh, ww, c = h.shape
    if c != cfg.channels or retrieved.shape[-1] != cfg.channels:
      raise ValueError(f"H-space adapter for {cfg.channels} channels got maps of {c} and tokens of "
                       f"{retrieved.shape[-1]}")
    x = layers.GroupNorm(cfg.norm_num_groups, 1e-6, dt, name="norm")(h.astype(dt))
    x = nn.Dense(c, dtype=dt, name="proj_in")(x.reshape(b, hh * ww, c))
    ctx = retrieved.astype(dt)
    block = _AdapterBlock(cfg, dt, name="transformer_blocks_0")
    x = block(x, ctx)
    return nn.Dense(c, dtype=dt, name="proj_out")(x).reshape(b, hh, ww, c)


class _AdapterBlock(nn.Module):
  config: HSpaceAdapterConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, context):
    cfg, dt = self.config, self.dtype
    ln = lambda name: layers.LayerNorm(1e-5, dt, name=name)
    attn = lambda name: Attention(cfg.heads, cfg.dim_head, dtype=dt, kernel_init=_RANDOM_INIT, name=name)
    x = x + attn("attn1")(ln("norm1")(x))
    x = x + attn("attn2")(ln("norm2")(x), context)
    return x + FeedForward(cfg.channels, dt, _RANDOM_INIT, name="ff")(ln("norm3")(x))


def apply(params, h, retrieved, *, config: HSpaceAdapterConfig, dtype=jnp.float32) -> jax.Array:
  """Δh of Eq. 4 (pure)."""
  return HSpaceAdapter(config, dtype).apply({"params": params}, h, retrieved)


def init_params(config: HSpaceAdapterConfig, key: jax.Array, *, zero_out: bool = True):
  """Fresh adapter params; proj_out is zero with `zero_out` (spec Q6: the untrained adapter is the identity)."""
  c = config.channels
  h = jnp.zeros((1, 1, 1, c), jnp.float32)
  params = HSpaceAdapter(config).init(key, h, jnp.zeros((1, 1, c), jnp.float32))["params"]
  if zero_out:
    params = dict(params, proj_out=jax.tree_util.tree_map(jnp.zeros_like, params["proj_out"]))
  return params


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
