"""CLIP vision encoder (CLIPVisionModelWithProjection) and CLIP image preprocessing.

IP-Adapter-Plus reads the penultimate hidden states (ViT-H/14), the base
IP-Adapter the projected `image_embeds` (ViT-bigG/14); the metrics use
ViT-B/32 and ViT-L/14. The transformer layers are the text encoder's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from kadiff_jax.models import layers
from kadiff_jax.models.clip_text import Encoder
from kadiff_jax.models.config_util import TRANSFORMERS_GENERIC_FIELDS, ConfigError, read_fields
from kadiff_jax.programs import serializable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_hidden_layers: int = 32
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 1024

  @classmethod
  def from_transformers(cls, cfg: dict[str, Any]) -> "CLIPVisionConfig":
    cfg = cfg.get("vision_config", cfg)
    f = read_fields("image encoder", cfg, supported={f.name for f in dataclasses.fields(cls)}, fixed={},
                    ignored=TRANSFORMERS_GENERIC_FIELDS)
    from kadiff_jax.models.clip_text import _ACTS
    if f.get("hidden_act", "gelu") not in _ACTS:
      raise ConfigError(f"image encoder config field 'hidden_act' = {f['hidden_act']!r} is not supported")
    return cls(**f)

  def to_transformers(self) -> dict[str, Any]:
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            **dataclasses.asdict(self)}

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


def vit_h14() -> CLIPVisionConfig:
  """laion/CLIP-ViT-H-14 (h94/IP-Adapter `models/image_encoder`, IP-Adapter-Plus SDXL)."""
  return CLIPVisionConfig()


def vit_big_g14() -> CLIPVisionConfig:
  """laion/CLIP-ViT-bigG-14 (h94/IP-Adapter `sdxl_models/image_encoder`, base SDXL adapter)."""
  return CLIPVisionConfig(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                          projection_dim=1280)


def vit_b32() -> CLIPVisionConfig:
  """openai/clip-vit-base-patch32 (CLIP-T / CLIP-I metrics)."""
  return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          patch_size=32, hidden_act="quick_gelu", projection_dim=512)


def vit_l14() -> CLIPVisionConfig:
  """openai/clip-vit-large-patch14."""
  return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          hidden_act="quick_gelu", projection_dim=768)


def tiny() -> CLIPVisionConfig:
  return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=32, patch_size=8, projection_dim=32)


@serializable
class VisionOutput(NamedTuple):
  hidden_states: tuple[jax.Array, ...]  # num_layers + 1 entries of [B, T, D] (T = patches + 1)
  last_hidden_state: jax.Array          # [B, T, D]
  pooled: jax.Array                     # [B, D] post-LayerNorm class token
  image_embeds: jax.Array               # [B, projection_dim]


class Embeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    cls_tok = self.param("class_embedding", layers.checkpoint_init, (cfg.hidden_size,))
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                      kernel_init=layers.checkpoint_init, name="patch_embedding")(pixels.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, cfg.hidden_size)  # [B, hw, D], raster order like torch's flatten
    x = jnp.concatenate([jnp.broadcast_to(cls_tok.astype(self.dtype), (b, 1, cfg.hidden_size)), patches], axis=1)
    pos = layers.Embed(cfg.num_tokens, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
    return x + pos(jnp.arange(x.shape[1]))[None]


class CLIPVision(nn.Module):
  config: CLIPVisionConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels) -> VisionOutput:
    cfg = self.config
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if tuple(pixels.shape[1:]) != want:
      raise ValueError(f"image encoder input has shape {tuple(pixels.shape[1:])} per image, expected {want} (NHWC)")
    x = Embeddings(cfg, self.dtype, name="embeddings")(pixels)
    x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="pre_layrnorm")(x)  # (sic) the torch name
    states = Encoder(cfg, self.dtype, name="encoder")(x, None)
    pooled = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="post_layernorm")(states[-1][:, 0])
    embeds = layers.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(pooled)
    return VisionOutput(tuple(states), states[-1], pooled, embeds)


def encode(params, pixels, *, config: CLIPVisionConfig, dtype=jnp.float32) -> VisionOutput:
  """Preprocessed pixels [B, S, S, 3] (NHWC) -> VisionOutput (pure)."""
  return CLIPVision(config, dtype).apply({"params": params}, pixels)


def init_shapes(config: CLIPVisionConfig):
  px = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  return jax.eval_shape(lambda p: CLIPVision(config).init(jax.random.PRNGKey(0), p), px)["params"]


def preprocess(image: Image.Image | np.ndarray, size: int, mean=CLIP_MEAN, std=CLIP_STD,
               crop: int | None = None) -> np.ndarray:
  """CLIPImageProcessor: shortest side to `size` (PIL bicubic), centre crop to `crop` (default
  `size`), /255, normalise.

  Takes an RGB PIL image or uint8 HWC array; returns float32 [crop, crop, 3] (HWC).
  Equal to transformers' PIL-backend CLIPImageProcessor (the reference's).
  """
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f"preprocess: expected a uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}")
    image = Image.fromarray(image)
  if image.mode != "RGB":
    raise ValueError(f"preprocess: expected an RGB image, got mode {image.mode!r} (see image_io.load_rgb)")
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
  a = np.asarray(image)
  crop = size if crop is None else crop
  top, left = (new_h - crop) // 2, (new_w - crop) // 2
  if top < 0 or left < 0:
    raise ValueError(f"preprocess: crop {crop} is larger than the resized image {new_w}x{new_h}")
  a = a[top:top + crop, left:left + crop].astype(np.float32) * (1 / 255)
  return ((a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)
