"""Prompt conditioning for every family: text embeddings, and SDXL's pooled embeddings and time ids.

SDXL families concatenate both encoders' penultimate hidden states and take
text_encoder_2's projected EOS state as the pooled embedding; SD1.x/2.x take
the one encoder's final-normed last hidden state and have no pooled
embedding (width 0 here, so every family's embeddings stack and cache alike).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.models import clip_text, unet
from kadiff_jax.programs import persistent_jit, serializable
from kadiff_jax.weights.models import DiffusionModels


@serializable
class PromptEmbeds(NamedTuple):
  embeds: jax.Array   # [B, 77, D]: the UNet's text tokens (SDXL: both encoders' penultimate states, D1 + D2)
  pooled: jax.Array   # [B, projection_dim]: text_encoder_2's projected EOS state (SDXL); [B, 0] otherwise


def tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
  """CLIP token ids [B, model_max_length], padded and truncated like diffusers' SDXL pipeline."""
  out = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="np")
  return np.asarray(out["input_ids"], np.int32)


@persistent_jit(static_argnames=("config", "config_2"))
def _encode(params, params_2, ids, ids_2, *, config, config_2) -> PromptEmbeds:
  o1 = clip_text.encode(params, ids, config=config, dtype=jax.tree_util.tree_leaves(params)[0].dtype)
  if config_2 is None:  # SD1.x/2.x: the final-normed last hidden state, no pooled embedding
    return PromptEmbeds(o1.last_hidden_state.astype(jnp.float32), jnp.zeros((ids.shape[0], 0), jnp.float32))
  o2 = clip_text.encode(params_2, ids_2, config=config_2, dtype=jax.tree_util.tree_leaves(params_2)[0].dtype)
  embeds = jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1)
  return PromptEmbeds(embeds.astype(jnp.float32), o2.text_embeds.astype(jnp.float32))


def encode_prompts(models: DiffusionModels, prompts: Sequence[str]) -> PromptEmbeds:
  """The family's text encoder(s) on `prompts` (as diffusers' `encode_prompt`, clip_skip None)."""
  second = models.family.text_time
  return _encode(models.text_params, models.text_params_2 if second else None, tokenize(models.tokenizer, prompts),
                 tokenize(models.tokenizer_2, prompts) if second else None, config=models.text_config,
                 config_2=models.text_config_2 if second else None)


def encode_negative(models: DiffusionModels, negative_prompts: Sequence[str | None],
                    like: PromptEmbeds) -> PromptEmbeds:
  """Negative embeddings: zeros where no negative prompt is given and the model asks for
  `force_zeros_for_empty_prompt` (SDXL), else the encoded (possibly empty) prompt."""
  if all(p is None for p in negative_prompts) and models.force_zeros_for_empty_prompt:
    return PromptEmbeds(jnp.zeros_like(like.embeds), jnp.zeros_like(like.pooled))
  return encode_prompts(models, [p or "" for p in negative_prompts])


def unet_cond(models: DiffusionModels, embeds, pooled, height: int, width: int) -> unet.UNetCond:
  """The UNet's conditioning for rows of text embeddings [R, L, D] and pooled embeddings [R, P]: SDXL families add
  the pooled embeddings and time ids for a height x width image, the others take the text tokens alone."""
  if not models.family.text_time:
    return unet.UNetCond(embeds)
  return unet.UNetCond(embeds, pooled, time_ids(height, width, embeds.shape[0]))


def time_ids(height: int, width: int, batch: int, crop=(0, 0), original=None) -> np.ndarray:
  """SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w), [B, 6] (host array)."""
  oh, ow = original or (height, width)
  return np.tile(np.array([[oh, ow, crop[0], crop[1], height, width]], np.float32), (batch, 1))
