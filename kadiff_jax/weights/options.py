"""Which weights to load: the model options every generating command shares, and loading them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp

from kadiff_jax.config import option

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  model: str = option("tiny", "pipeline folder in diffusers layout (SD1.x, SD2.x, SD-Turbo, SDXL, SDXL-Turbo), Hub "
                      "id, or a built-in random model written to the cache on first use: 'tiny' (SDXL) or "
                      "tiny-sd15, tiny-sd21, tiny-sd-turbo, tiny-sdxl-turbo")
  variant: str | None = option(None, "weight file variant, e.g. fp16")
  dtype: str = option("fp32", "compute and weight dtype of the UNet and text encoders", choices=tuple(DTYPES))
  ip_adapter: str | None = option(None, "IP-Adapter file (.safetensors or .bin), Plus or base; 'tiny': the tiny "
                                  "model's own (KA-Diff modes use it without asking)")
  image_encoder: str | None = option(None, "the IP-Adapter's CLIP image encoder folder")
  cache_dir: str | None = option(None, "the cache root: converted params, references, tiny "
                                 "models (default $KADIFF_CACHE, else $XDG_CACHE_HOME/kadiff_jax)")

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")

  @property
  def cache_path(self) -> Path | None:
    return Path(self.cache_dir) if self.cache_dir else None

  def load(self):
    """The pipeline these options name."""
    import logging
    from kadiff_jax import schedulers
    from kadiff_jax.progress import step
    from kadiff_jax.weights.models import load_models
    with step("loading the pipeline %s (%s)", self.model, self.dtype):
      models = load_models(self.model, dtype=DTYPES[self.dtype], variant=self.variant, cache_dir=self.cache_path)
    sched = models.scheduler_config.get("_class_name")
    note = "" if sched in schedulers.DIFFUSERS_CLASSES else f"; its {sched} is not implemented, text-to-image uses ddim"
    logging.getLogger("kadiff_jax").info("%s: a %s pipeline, %d px%s", models.source.name, models.family.label,
                                         models.default_size, note)
    return models

  def load_adapter(self, models, *, required: bool):
    """The IP-Adapter (the tiny model's own when none is named); None when not named and not required."""
    from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, tiny_ip_adapter
    from kadiff_jax.weights.ip_adapter import load_ip_adapter
    ip, enc = self.ip_adapter, self.image_encoder
    own = models.source / tiny_ip_adapter(models.family.name)
    if ip == "tiny" or (ip is None and required and own.is_file()):
      if not own.is_file():
        raise ValueError(f"ip_adapter 'tiny' is the tiny model's own adapter; model {self.model!r} has none "
                         "(use it with --model tiny or tiny-FAMILY)")
      ip, enc = own, (models.source / TINY_IMAGE_ENCODER if enc in (None, "tiny") else enc)
    if ip is None and enc is None and not required:
      return None
    if ip is None or enc is None:
      raise ValueError("an IP-Adapter needs both ip_adapter (--ip-adapter FILE) and image_encoder "
                       f"(--image-encoder DIR); got ip_adapter={ip!r}, image_encoder={enc!r}")
    from kadiff_jax.progress import step
    with step("loading the IP-Adapter %s", Path(ip).name):
      return load_ip_adapter(ip, enc, models.unet_config, cache_dir=self.cache_path)
