"""BERT encoder (post-LN), as used by sentence embedders such as all-MiniLM-L6-v2.

Param names mirror transformers' `BertModel` so that its state dict converts
with the generic torch->Flax renaming. Only the encoder is built (no pooler:
sentence embedders pool the token states themselves).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kadiff_jax.models import layers
from kadiff_jax.models.config_util import TRANSFORMERS_GENERIC_FIELDS, ConfigError, read_fields

_ACTS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
         "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
         "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  intermediate_size: int = 1536
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  @classmethod
  def from_transformers(cls, cfg: dict[str, Any]) -> "BertConfig":
    f = read_fields("BERT encoder", cfg, supported={
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "pad_token_id"},
        fixed={"position_embedding_type": "absolute"},
        ignored=TRANSFORMERS_GENERIC_FIELDS | {
            "attention_probs_dropout_prob", "hidden_dropout_prob", "initializer_range", "gradient_checkpointing",
            "use_cache", "classifier_dropout"})
    if f.get("hidden_act", "gelu") not in _ACTS:
      raise ConfigError(f"BERT config field 'hidden_act' = {f['hidden_act']!r} is not supported "
                        f"(expected one of {sorted(_ACTS)})")
    return cls(**f)

  def to_transformers(self) -> dict[str, Any]:
    return {"architectures": ["BertModel"], "model_type": "bert", "position_embedding_type": "absolute",
            **dataclasses.asdict(self)}


class Embeddings(nn.Module):
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    cfg = self.config
    embed = lambda n, size: layers.Embed(size, cfg.hidden_size, dtype=self.dtype, name=n)
    x = (embed("word_embeddings", cfg.vocab_size)(input_ids)
         + embed("position_embeddings", cfg.max_position_embeddings)(jnp.arange(input_ids.shape[1]))[None]
         + embed("token_type_embeddings", cfg.type_vocab_size)(token_type_ids))
    return layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(x)


class SelfAttention(nn.Module):
  heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    b, l, d = x.shape
    q, k, v = (layers.Dense(d, dtype=self.dtype, name=n)(x).reshape(b, l, self.heads, d // self.heads)
               for n in ("query", "key", "value"))
    return jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, l, d)


class AddNorm(nn.Module):
  """BERT's `*Output` block: LayerNorm(residual + dense(x))."""

  features: int
  eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, residual):
    h = layers.Dense(self.features, dtype=self.dtype, name="dense")(x)
    return layers.LayerNorm(self.eps, self.dtype, name="LayerNorm")(residual + h)


class Attention(nn.Module):
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    a = SelfAttention(cfg.num_attention_heads, self.dtype, name="self")(x, mask)
    return AddNorm(cfg.hidden_size, cfg.layer_norm_eps, self.dtype, name="output")(a, x)


class Intermediate(nn.Module):
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    return _ACTS[self.config.hidden_act](
        layers.Dense(self.config.intermediate_size, dtype=self.dtype, name="dense")(x))


class Layer(nn.Module):
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    x = Attention(cfg, self.dtype, name="attention")(x, mask)
    h = Intermediate(cfg, self.dtype, name="intermediate")(x)
    return AddNorm(cfg.hidden_size, cfg.layer_norm_eps, self.dtype, name="output")(h, x)


class Encoder(nn.Module):
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, mask):
    for i in range(self.config.num_hidden_layers):
      x = Layer(self.config, self.dtype, name=f"layer_{i}")(x, mask)
    return x


class Bert(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    cfg = self.config
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"{input_ids.shape[1]} tokens exceed max_position_embeddings={cfg.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(cfg, self.dtype, name="embeddings")(input_ids, token_type_ids)
    mask = attention_mask.astype(bool)[:, None, None, :]  # keys only: [B, 1, 1, L]
    return Encoder(cfg, self.dtype, name="encoder")(x, mask)


def encode(params, input_ids, attention_mask, *, config: BertConfig, dtype=jnp.float32) -> jax.Array:
  """Token ids and mask [B, L] -> last hidden states [B, L, D] (pure)."""
  return Bert(config, dtype).apply({"params": params}, input_ids, attention_mask)


def init_shapes(config: BertConfig):
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda i: Bert(config).init(jax.random.PRNGKey(0), i, jnp.ones_like(i)), ids)["params"]
