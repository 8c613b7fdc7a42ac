"""CLIP-T and CLIP-I (spec section 8) with our Flax CLIP towers.

CLIP-T = 2.5 * max(cos(image, prompt), 0) and CLIP-I = cos(image, reference),
on the projected embeddings of a CLIPModel folder (ViT-B/32 in the reference:
`openai/clip-vit-base-patch32`). Images are resized (shortest side, bicubic),
centre-cropped to the tower's size and CLIP-normalised, as transformers'
CLIPImageProcessor does; prompts are tokenised to 77 tokens with truncation.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.models import clip_text, clip_vision
from kadiff_jax.metrics import rgb_images
from kadiff_jax.weights import convert, files

DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScorer:
  """CLIP-T and CLIP-I with a CLIPModel folder, a Hub id, or "tiny" (a random one, made on first use)."""

  def __init__(self, model: str = DEFAULT_CLIP):
    from kadiff_jax.clip_tokenizer import CLIPTokenizer
    from kadiff_jax.tiny_model import tiny_part
    folder = tiny_part("clip") if model == "tiny" else files.resolve_model(model)
    cfg = files.read_json(folder / "config.json")
    if "text_config" not in cfg or "vision_config" not in cfg:
      raise files.CheckpointNotFound(f"{folder}/config.json is not a CLIPModel config (needs text_config and "
                                     "vision_config)")
    proj = cfg.get("projection_dim", 512)
    self.text_config = clip_text.CLIPTextConfig.from_transformers(
        {**cfg["text_config"], "projection_dim": proj}, with_projection=True)
    self.vision_config = clip_vision.CLIPVisionConfig.from_transformers(
        {**cfg["vision_config"], "projection_dim": proj})
    state, _ = files.read_state_dict(folder)
    self.text_params = convert.torch_to_params(
        state, clip_text.init_shapes(self.text_config), component=f"CLIP text tower of {model}",
        renames=[(r"^text_model\.", "")], ignore=[r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$",
                                                  r"position_ids$"])
    self.vision_params = convert.torch_to_params(
        state, clip_vision.init_shapes(self.vision_config), component=f"CLIP vision tower of {model}",
        renames=[(r"^vision_model\.", "")], ignore=[r"^text_model\.", r"^text_projection\.", r"^logit_scale$",
                                                    r"position_ids$"])
    self.tokenizer = CLIPTokenizer(folder)
    tc, vc = self.text_config, self.vision_config
    self._text = jax.jit(lambda p, ids: _unit(clip_text.encode(p, ids, config=tc).text_embeds))
    self._image = jax.jit(lambda p, px: _unit(clip_vision.encode(p, px, config=vc).image_embeds))

  def pixels(self, images) -> np.ndarray:
    """Paths, PIL images or uint8 arrays -> [N, size, size, 3] CLIP pixels."""
    s = self.vision_config.image_size
    return np.stack([clip_vision.preprocess(im, s) for im in rgb_images(images, "CLIP")])

  def image_embeds(self, images) -> np.ndarray:
    """Images (paths, PIL or uint8 arrays) -> unit [N, projection_dim]."""
    return np.asarray(self._image(self.vision_params, self.pixels(images)))

  def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
    ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=self.text_config.max_position_embeddings, return_tensors="np")["input_ids"]
    return np.asarray(self._text(self.text_params, ids.astype(np.int32)))

  def clip_t(self, images, prompts: Sequence[str]) -> np.ndarray:
    """[N] = 2.5 * max(cos(image_i, prompt_i), 0)."""
    if len(images) != len(prompts):
      raise ValueError(f"CLIP-T: {len(images)} images but {len(prompts)} prompts")
    return self.clip_t_from_embeds(self.image_embeds(images), self.text_embeds(prompts))

  @staticmethod
  def clip_t_from_embeds(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """CLIP-T of unit embeddings already computed: [N] = 2.5 * max(cos, 0)."""
    return 2.5 * np.maximum((image_embeds * text_embeds).sum(-1), 0.0)

  def clip_i(self, images, references) -> np.ndarray:
    """[N] = cos(image_i, reference_i)."""
    if len(images) != len(references):
      raise ValueError(f"CLIP-I: {len(images)} images but {len(references)} references")
    return (self.image_embeds(images) * self.image_embeds(references)).sum(-1)

