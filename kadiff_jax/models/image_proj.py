"""IP-Adapter image projections: Resampler (IP-Adapter-Plus) and ImageProjModel (base).

Params are named after the original IP-Adapter checkpoints (`image_proj` part):
Resampler `latents`, `proj_in`, `layers.{i}.0` (PerceiverAttention: norm1,
norm2, to_q, to_kv, to_out), `layers.{i}.1` (FeedForward: 0 LayerNorm,
1 Linear, 3 Linear), `proj_out`, `norm_out`; ImageProjModel `proj`, `norm`.
Our trees call the numbered submodules `attn`, `ff_norm`, `ff_in`, `ff_out`;
`weights/ip_adapter.py` maps the names.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kadiff_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
  dim: int = 1280           # hidden width (latents)
  depth: int = 4
  dim_head: int = 64
  heads: int = 20
  num_queries: int = 16     # image tokens handed to the UNet
  embedding_dim: int = 1280  # image encoder hidden size
  output_dim: int = 2048    # UNet cross_attention_dim
  ff_mult: int = 4


@dataclasses.dataclass(frozen=True)
class ImageProjConfig:
  clip_embeddings_dim: int = 1280
  cross_attention_dim: int = 2048
  num_tokens: int = 4


class PerceiverAttention(nn.Module):
  """Latents attend to concat(x, latents); q and k each scaled by dim_head**-0.25, fp32 softmax."""

  dim_head: int
  heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, latents):
    dim = latents.shape[-1]
    inner = self.dim_head * self.heads
    x = layers.LayerNorm(1e-5, self.dtype, name="norm1")(x)
    latents = layers.LayerNorm(1e-5, self.dtype, name="norm2")(latents)
    q = layers.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(latents)
    kv = layers.Dense(2 * inner, use_bias=False, dtype=self.dtype, name="to_kv")(jnp.concatenate([x, latents], axis=1))
    k, v = jnp.split(kv, 2, axis=-1)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)  # [B, L, heads, d]
    scale = self.dim_head ** -0.25
    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q) * scale, split(k) * scale, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, split(v)).reshape(latents.shape[0], latents.shape[1], inner)
    return layers.Dense(dim, use_bias=False, dtype=self.dtype, name="to_out")(out)


class ResamplerLayer(nn.Module):
  config: ResamplerConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, latents):
    cfg = self.config
    latents = latents + PerceiverAttention(cfg.dim_head, cfg.heads, self.dtype, name="attn")(x, latents)
    h = layers.LayerNorm(1e-5, self.dtype, name="ff_norm")(latents)
    h = layers.Dense(cfg.dim * cfg.ff_mult, use_bias=False, dtype=self.dtype, name="ff_in")(h)
    h = layers.Dense(cfg.dim, use_bias=False, dtype=self.dtype, name="ff_out")(nn.gelu(h, approximate=False))
    return latents + h


class Resampler(nn.Module):
  """Image features [B, T, embedding_dim] -> [B, num_queries, output_dim] tokens."""

  config: ResamplerConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    latents = self.param("latents", layers.checkpoint_init, (1, cfg.num_queries, cfg.dim))
    latents = jnp.broadcast_to(latents.astype(self.dtype), (x.shape[0],) + latents.shape[1:])
    x = layers.Dense(cfg.dim, dtype=self.dtype, name="proj_in")(x.astype(self.dtype))
    for i in range(cfg.depth):
      latents = ResamplerLayer(cfg, self.dtype, name=f"layers_{i}")(x, latents)
    latents = layers.Dense(cfg.output_dim, dtype=self.dtype, name="proj_out")(latents)
    return layers.LayerNorm(1e-5, self.dtype, name="norm_out")(latents)


class ImageProjModel(nn.Module):
  """Projected CLIP image embedding [B, D] -> [B, num_tokens, cross_attention_dim] tokens."""

  config: ImageProjConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, embeds):
    cfg = self.config
    t = layers.Dense(cfg.num_tokens * cfg.cross_attention_dim, dtype=self.dtype, name="proj")(embeds.astype(self.dtype))
    t = t.reshape(embeds.shape[0], cfg.num_tokens, cfg.cross_attention_dim)
    return layers.LayerNorm(1e-5, self.dtype, name="norm")(t)


def model_for(config) -> nn.Module:
  return Resampler(config) if isinstance(config, ResamplerConfig) else ImageProjModel(config)


def project(params, features, *, config, dtype=jnp.float32):
  """Image features -> IP tokens with the projection `config` selects (pure)."""
  m = Resampler(config, dtype) if isinstance(config, ResamplerConfig) else ImageProjModel(config, dtype)
  return m.apply({"params": params}, features)


def init_shapes(config):
  if isinstance(config, ResamplerConfig):
    x = jax.ShapeDtypeStruct((1, 5, config.embedding_dim), jnp.float32)
  else:
    x = jax.ShapeDtypeStruct((1, config.clip_embeddings_dim), jnp.float32)
  return jax.eval_shape(lambda a: model_for(config).init(jax.random.PRNGKey(0), a), x)["params"]
