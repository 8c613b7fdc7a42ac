"""CLIP text encoder (and with projection): SDXL's two text encoders.

`encode` returns every hidden state (embeddings + one per layer, before the
final LayerNorm), the final-normed last state, the pooled EOS state and, for
the projection model, the projected `text_embeds`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kadiff_jax.models import layers
from kadiff_jax.models.config_util import TRANSFORMERS_GENERIC_FIELDS, ConfigError, read_fields
from kadiff_jax.programs import serializable

_ACTS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
         "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = None  # set for CLIPTextModelWithProjection
  eos_token_id: int = 2
  bos_token_id: int = 0
  pad_token_id: int = 1

  @classmethod
  def from_transformers(cls, cfg: dict[str, Any], with_projection: bool) -> "CLIPTextConfig":
    """From a transformers `config.json`; `text_config` nesting (CLIPConfig) is accepted."""
    cfg = cfg.get("text_config", cfg)
    f = read_fields("text encoder", cfg, supported={
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "eos_token_id",
        "bos_token_id", "pad_token_id"},
        fixed={}, ignored=TRANSFORMERS_GENERIC_FIELDS)
    if f.get("hidden_act", "quick_gelu") not in _ACTS:
      raise ConfigError(f"text encoder config field 'hidden_act' = {f['hidden_act']!r} is not supported "
                        f"(expected one of {sorted(_ACTS)})")
    if not with_projection:
      f.pop("projection_dim", None)
    elif not f.get("projection_dim"):
      raise ConfigError("text encoder with projection: config field 'projection_dim' is missing")
    return cls(**f)

  def to_transformers(self, with_projection: bool) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if not with_projection:
      d.pop("projection_dim")
    arch = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", **d}


def clip_vit_l() -> CLIPTextConfig:
  """openai/clip-vit-large-patch14 text tower (SDXL `text_encoder`)."""
  return CLIPTextConfig()


def open_clip_h() -> CLIPTextConfig:
  """OpenCLIP ViT-H/14 text tower as SD2.x ships it (`text_encoder`, 23 layers: the penultimate of OpenCLIP's 24)."""
  return CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                        hidden_act="gelu")


def open_clip_big_g() -> CLIPTextConfig:
  """OpenCLIP ViT-bigG/14 text tower with projection (SDXL `text_encoder_2`)."""
  return CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280)


def tiny(projection: bool = False, vocab_size: int = 1000) -> CLIPTextConfig:
  """Tiny encoders shaped like SDXL's pair (quick_gelu vs gelu, projection on the second)."""
  return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, hidden_act="gelu" if projection else "quick_gelu",
                        projection_dim=32 if projection else None)


@serializable
class TextOutput(NamedTuple):
  hidden_states: tuple[jax.Array, ...]  # num_layers + 1 entries of [B, L, D]
  last_hidden_state: jax.Array          # [B, L, D] after final_layer_norm
  pooled: jax.Array                     # [B, D] last_hidden_state at the EOS token
  text_embeds: jax.Array | None         # [B, projection_dim] (projection model only)


class SelfAttention(nn.Module):
  heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    b, l, d = x.shape
    q, k, v = (layers.Dense(d, dtype=self.dtype, name=n)(x).reshape(b, l, self.heads, d // self.heads)
               for n in ("q_proj", "k_proj", "v_proj"))  # [B, L, heads, d_head]
    a = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, l, d)
    return layers.Dense(d, dtype=self.dtype, name="out_proj")(a)


class MLP(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    h = layers.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
    return layers.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(_ACTS[self.config.hidden_act](h))


class EncoderLayer(nn.Module):
  """Pre-LN transformer layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

  config: CLIPTextConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    ln = lambda name: layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name=name)
    x = x + SelfAttention(cfg.num_attention_heads, self.dtype, name="self_attn")(ln("layer_norm1")(x), mask)
    return x + MLP(cfg, self.dtype, name="mlp")(ln("layer_norm2")(x))


class Encoder(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    states = [x]
    for i in range(self.config.num_hidden_layers):
      x = EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
      states.append(x)
    return states


class Embeddings(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.config
    tok = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
    pos = layers.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
    return tok + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIPText(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None) -> TextOutput:
    cfg = self.config
    b, l = input_ids.shape
    if l > cfg.max_position_embeddings:
      raise ValueError(f"{l} tokens exceed the text encoder's max_position_embeddings={cfg.max_position_embeddings}")
    x = Embeddings(cfg, self.dtype, name="embeddings")(input_ids)
    mask = jnp.tril(jnp.ones((l, l), bool))[None, None]  # causal, [1, 1, L, L]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    states = Encoder(cfg, self.dtype, name="encoder")(x, mask)
    last = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_layer_norm")(states[-1])
    if cfg.eos_token_id == 2:  # legacy configs (all SD/SDXL ones): EOS is the highest id in the row
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    pooled = last[jnp.arange(b), eos]
    embeds = None
    if cfg.projection_dim:
      embeds = layers.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
    return TextOutput(tuple(states), last, pooled, embeds)


def encode(params, input_ids, *, config: CLIPTextConfig, attention_mask=None, dtype=jnp.float32) -> TextOutput:
  """Token ids [B, L] -> TextOutput (pure)."""
  return CLIPText(config, dtype).apply({"params": params}, input_ids, attention_mask)


def init_shapes(config: CLIPTextConfig):
  ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
  return jax.eval_shape(lambda i: CLIPText(config).init(jax.random.PRNGKey(0), i), ids)["params"]
