"""KA-Diff options. Every default reproduces the reference release (spec section 9)."""

from __future__ import annotations

import dataclasses

from kadiff_jax.models.attention import LayerSelector, parse_layers
from kadiff_jax.schedulers import DDIM, SchedulerConfig

DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
DEFAULT_PROMPT = "best quality, high quality"


def kadiff_scheduler() -> DDIM:
  """The reference's DDIM: scaled_linear 0.00085-0.012, leading, steps_offset 0, no clipping, final alpha = ac[0]."""
  return DDIM(SchedulerConfig(steps_offset=0), clip_sample=False, set_alpha_to_one=False)


@dataclasses.dataclass(frozen=True)
class KADiffOptions:
  steps: int = 50
  guidance: float = 5.0
  inversion_guidance: float = 7.5
  size: int | None = None                    # height = width; None: the model's (1024 for SDXL, as the reference)
  ip_scale: float | None = None              # None: the adapter's default (0.5 Plus)
  negative_prompt: str = DEFAULT_NEGATIVE
  inject_layers: str = "44-70"               # flat self-attention numbers and/or module-path globs
  inject_steps: tuple[int, int] | None = None  # inclusive, 0-based; None: 19-49 of 50, scaled to `steps`
  threshold: float = 0.7
  inject: tuple[str, ...] = ("k", "v")       # Q1b: the reference computes a replaced query, then drops it
  inversion_uncond: str = "reference"        # Q1: "reference" | "negative_prompt"
  mask_padding: str = "foreground"           # Q2: "foreground" | "background"
  use_init_latents: bool = False
  mode: str = "kadiff"                       # "kadiff" | "masactrl" | "baseline"
  mask_layers: str = "*"                     # attn2 layers whose maps make the automatic concept mask
  mask_words: tuple[str, ...] | None = None  # subject words of ref_prompt for the automatic mask; None: content words
  mask_threshold: str | float = "otsu"       # automatic mask: "otsu" or a fixed fraction of the normalised map

  def __post_init__(self):
    checks = (("inversion_uncond", ("reference", "negative_prompt")), ("mask_padding", ("foreground", "background")),
              ("mode", ("kadiff", "masactrl", "baseline")))
    for name, allowed in checks:
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
    if not set(self.inject) <= {"q", "k", "v"} or not self.inject:
      raise ValueError(f"inject={self.inject!r}: expected a non-empty subset of ('q', 'k', 'v')")
    if self.mask_threshold != "otsu" and not (isinstance(self.mask_threshold, (int, float))
                                              and 0 <= self.mask_threshold <= 1):
      raise ValueError(f"mask_threshold={self.mask_threshold!r}: expected 'otsu' or a number in [0, 1]")
    if self.size is not None and (self.size <= 0 or self.size % 8):
      raise ValueError(f"size={self.size}: expected a positive multiple of 8")
    if self.steps < 2:
      raise ValueError(f"steps={self.steps}: expected at least 2")
    lo, hi = self.step_range()
    if not 0 <= lo <= hi < self.steps:
      raise ValueError(f"inject_steps=({lo}, {hi}): expected 0 <= start <= end < steps={self.steps}")

  def for_model(self, models) -> "KADiffOptions":
    """These options with the size resolved and checked against the model's downsampling."""
    size = self.size or models.default_size
    unit = models.vae_scale_factor * 2 ** (len(models.unet_config.block_out_channels) - 1)
    if size % unit:
      raise ValueError(f"size={size}: this model needs a multiple of {unit} (square feature maps at every level)")
    return dataclasses.replace(self, size=size)

  def step_range(self) -> tuple[int, int]:
    """Denoising steps with injection; the reference's 19-49 of 50 scaled to other step counts."""
    if self.inject_steps is not None:
      return tuple(self.inject_steps)
    return round(19 * self.steps / 50), self.steps - 1

  def layer_selector(self) -> LayerSelector:
    return parse_layers(self.inject_layers, kind="self")
