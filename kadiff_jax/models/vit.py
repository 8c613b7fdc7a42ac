"""ViT encoder as transformers' `ViTModel` (pre-LN), for DINO features (facebook/dino-vits16).

Param names mirror the torch module so that a `ViTModel` checkpoint converts
with the generic renaming; the pooler is not built (DINO uses the CLS token of
the final-normed states).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kadiff_jax.models import layers
from kadiff_jax.models.config_util import TRANSFORMERS_GENERIC_FIELDS, ConfigError, read_fields

_ACTS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False)}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  hidden_size: int = 384
  intermediate_size: int = 1536
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True

  @classmethod
  def from_transformers(cls, cfg: dict[str, Any]) -> "ViTConfig":
    # encoder_stride serves masked-image-modelling heads and pooler_* the pooler; neither is built.
    f = read_fields("ViT", cfg, supported={f.name for f in dataclasses.fields(cls)}, fixed={},
                    ignored=TRANSFORMERS_GENERIC_FIELDS | {"hidden_dropout_prob", "attention_probs_dropout_prob",
                                                           "encoder_stride", "pooler_act", "pooler_output_size"})
    if f.get("hidden_act", "gelu") not in _ACTS:
      raise ConfigError(f"ViT config field 'hidden_act' = {f['hidden_act']!r} is not supported (expected 'gelu')")
    return cls(**f)

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


def dino_vits16() -> ViTConfig:
  return ViTConfig()


class PatchEmbeddings(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    p = cfg.patch_size
    x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=layers.checkpoint_init, name="projection")(pixels.astype(self.dtype))
    return x.reshape(x.shape[0], -1, cfg.hidden_size)  # raster order, like torch's flatten


class Embeddings(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    x = PatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(pixels)
    b = x.shape[0]
    cls_tok = self.param("cls_token", layers.checkpoint_init, (1, 1, cfg.hidden_size))
    pos = self.param("position_embeddings", layers.checkpoint_init, (1, cfg.num_tokens, cfg.hidden_size))
    x = jnp.concatenate([jnp.broadcast_to(cls_tok.astype(self.dtype), (b, 1, cfg.hidden_size)), x], axis=1)
    return x + pos.astype(self.dtype)


class SelfAttention(nn.Module):
  heads: int
  qkv_bias: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    b, l, d = x.shape
    q, k, v = (layers.Dense(d, use_bias=self.qkv_bias, dtype=self.dtype, name=n)(x).reshape(b, l, self.heads, -1)
               for n in ("query", "key", "value"))
    return jax.nn.dot_product_attention(q, k, v).reshape(b, l, d)


class Dense(nn.Module):
  """torch's `ViT*Output` / `ViTIntermediate`: a module holding one Linear called `dense`."""

  features: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    return layers.Dense(self.features, dtype=self.dtype, name="dense")(x)


class Attention(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    a = SelfAttention(cfg.num_attention_heads, cfg.qkv_bias, self.dtype, name="attention")(x)
    return Dense(cfg.hidden_size, self.dtype, name="output")(a)


class Layer(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    ln = lambda name: layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name=name)
    x = x + Attention(cfg, self.dtype, name="attention")(ln("layernorm_before")(x))
    h = _ACTS[cfg.hidden_act](Dense(cfg.intermediate_size, self.dtype, name="intermediate")(ln("layernorm_after")(x)))
    return x + Dense(cfg.hidden_size, self.dtype, name="output")(h)


class Encoder(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    for i in range(self.config.num_hidden_layers):
      x = Layer(self.config, self.dtype, name=f"layer_{i}")(x)
    return x


class ViT(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    """Preprocessed pixels [B, S, S, 3] (NHWC) -> final-normed states [B, T, D]."""
    cfg = self.config
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if tuple(pixels.shape[1:]) != want:
      raise ValueError(f"ViT input has shape {tuple(pixels.shape[1:])} per image, expected {want} (NHWC)")
    x = Embeddings(cfg, self.dtype, name="embeddings")(pixels)
    x = Encoder(cfg, self.dtype, name="encoder")(x)
    return layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="layernorm")(x)


def encode(params, pixels, *, config: ViTConfig, dtype=jnp.float32) -> jax.Array:
  """Pixels [B, S, S, 3] -> last hidden states [B, T, D]; the CLS token is [:, 0] (pure)."""
  return ViT(config, dtype).apply({"params": params}, pixels)


def init_shapes(config: ViTConfig):
  px = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  return jax.eval_shape(lambda p: ViT(config).init(jax.random.PRNGKey(0), p), px)["params"]
