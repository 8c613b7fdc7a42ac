"""KA-Diff options. Every default reproduces the reference release (spec section 9).

This dataclass is the only place a KA-Diff default lives: the CLI flags and
YAML configs are derived from its fields (`kadiff_jax.config`), and the
defaults that depend on the model (size, injection layers) are resolved in
one place, `for_model`.
"""

from __future__ import annotations

import dataclasses

from kadiff_jax.config import csv_tuple, option
from kadiff_jax.models.attention import LayerSelector, parse_layers
from kadiff_jax.schedulers import DDIM, SchedulerConfig

DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
DEFAULT_PROMPT = "best quality, high quality"
MODES = ("kadiff", "masactrl", "baseline")
ROW_LAYOUTS = ("grouped", "per_job")
# The release's layers per family, in its numbering (self-attention layers counted down, mid, up from 1; the UNet's
# own `attention_sites` numbering). SDXL: 44-70 (spec 6.2), the last 21 transformer blocks of up_blocks[0] and all
# of up_blocks[1]. SD1.5 (its sd1.5 branch): 9-16 of down 1-6, mid 7, up 8-16, i.e. every up-block self-attention
# but up_blocks.1.attentions.0, at H/32, H/16 and H/8; SD2.x has SD1.5's block structure and numbering, and no
# release of its own, so it takes SD1.5's. A UNet numbered like neither (e.g. a tiny SDXL) injects into every
# up-block self-attention layer.
SDXL_INJECT_LAYERS = "44-70"
SD_INJECT_LAYERS = "9-16"
OTHER_INJECT_LAYERS = "up_blocks.*"


def kadiff_scheduler() -> DDIM:
  """The reference's DDIM: scaled_linear 0.00085-0.012, leading, steps_offset 0, no clipping, final alpha = ac[0]."""
  return DDIM(SchedulerConfig(steps_offset=0), clip_sample=False, set_alpha_to_one=False)


def parse_step_range(value: str) -> tuple[int, int]:
  """'19-49' -> (19, 49); '30' -> (30, 30)."""
  lo, _, hi = str(value).partition("-")
  try:
    return int(lo), int(hi or lo)
  except ValueError:
    raise ValueError(f"expected START-END, e.g. 19-49, got {value!r}") from None


def parse_mask_threshold(value: str) -> str | float:
  if value == "otsu":
    return value
  try:
    return float(value)
  except ValueError:
    raise ValueError(f"expected 'otsu' or a number in [0, 1], got {value!r}") from None


def default_inject_layers(unet_config) -> str:
  """The release's layers where the UNet is numbered like SDXL's (44-70) or SD1.5's (9-16), every up-block
  self-attention otherwise."""
  from kadiff_jax.models import unet
  numbering = lambda cfg: {p: (s.kind, s.index) for p, s in unet.attention_sites(cfg).items()}
  for reference, layers in ((unet.sdxl_base(), SDXL_INJECT_LAYERS), (unet.sd15(), SD_INJECT_LAYERS)):
    if numbering(unet_config) == numbering(reference):
      return layers
  return OTHER_INJECT_LAYERS


def default_dift_block(unet_config) -> str:
  """The DIFT feature block of the releases: the up block whose output is at H/16 (1/2 of the latent side), which
  is up_blocks.0 on SDXL's 3 levels and up_blocks.1 on SD1.x/2.x's 4."""
  b = unet_config.num_blocks - 3
  if b < 0:
    raise ValueError(f"this UNet has {unet_config.num_blocks} levels; DIFT features need an up block at H/16 "
                     "(3 levels or more); choose one with dift_block")
  return f"up_blocks.{b}"


@dataclasses.dataclass(frozen=True)
class KADiffOptions:
  mode: str = option("kadiff", "KA-Diff injection, the plain IP-Adapter image from the same noise (baseline), "
                     "or MasaCtrl-style mutual self-attention", choices=MODES)
  steps: int = option(50, "DDIM steps (inversion and generation)")
  guidance: float = option(5.0, "classifier-free guidance of generation")
  inversion_guidance: float = option(7.5, "classifier-free guidance of the DDIM inversion")
  size: int | None = option(None, "image side in pixels (square); default: the model's (1024 for SDXL)")
  ip_scale: float | None = option(None, "IP-Adapter scale; default: the adapter's (0.5 Plus, 0.6 base)")
  negative_prompt: str = option(DEFAULT_NEGATIVE, "negative prompt of generation")
  inject_layers: str | None = option(
      None, f"self-attention layers to inject: flat numbers and/or module-path globs; default: "
      f"{SDXL_INJECT_LAYERS} on SDXL-numbered UNets, {SD_INJECT_LAYERS} on SD1.x/2.x-numbered ones, "
      f"{OTHER_INJECT_LAYERS} otherwise")
  dift_block: str | None = option(None, "UNet block whose output is the DIFT feature map for correspondence; "
                                  "default: the up block at H/16 (up_blocks.0 on SDXL, up_blocks.1 on SD1.x/2.x)")
  inject_steps: tuple[int, int] | None = option(
      None, "START-END denoising steps with injection (0-based, inclusive); default: 19-49 of 50, scaled",
      parse=parse_step_range)
  threshold: float = option(0.7, "cosine-distance threshold below which a matched target is injected")
  inject: tuple[str, ...] = option(("k", "v"), "what the matched source replaces (Q1b: k,v)", parse=csv_tuple)
  inversion_uncond: str = option("reference", "Q1: inversion's uncond half: the reference's cond sequence "
                                 "(reference) or the negative prompt", choices=("reference", "negative_prompt"))
  mask_padding: str = option("foreground", "Q2: what a non-square mask is padded with",
                             choices=("foreground", "background"))
  use_init_latents: bool = option(False, "start from the inverted reference inside the mask (spec 5)")
  mask_layers: str = option("*", "mask auto: cross-attention layers whose maps are averaged")
  mask_words: tuple[str, ...] | None = option(None, "mask auto: subject words of the ref_prompt; default: its "
                                              "content words", parse=csv_tuple)
  mask_threshold: str | float = option("otsu", "mask auto: 'otsu' or a fraction in [0, 1]",
                                       parse=parse_mask_threshold)
  row_layout: str = option("grouped", "UNet rows of generation: grouped (jobs with the same reference share its "
                           "one cond row; no uncond ref row in kadiff mode) or per_job (the release's 4 rows per "
                           "job); the same images up to float rounding", choices=ROW_LAYOUTS)
  group_size: int | None = option(None, "grouped rows: most jobs per reference group; default: the size with the "
                                  "fewest UNet rows for each batch")

  def __post_init__(self):
    checks = (("inversion_uncond", ("reference", "negative_prompt")), ("mask_padding", ("foreground", "background")),
              ("mode", MODES), ("row_layout", ROW_LAYOUTS))
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
    if self.group_size is not None and self.group_size < 1:
      raise ValueError(f"group_size={self.group_size}: expected at least 1")
    if self.steps < 2:
      raise ValueError(f"steps={self.steps}: expected at least 2")
    if self.inject_layers is not None:
      parse_layers(self.inject_layers)  # a malformed spec fails here, before any model loads
    lo, hi = self.step_range()
    if not 0 <= lo <= hi < self.steps:
      raise ValueError(f"inject_steps=({lo}, {hi}): expected 0 <= start <= end < steps={self.steps}")

  def for_model(self, models) -> "KADiffOptions":
    """These options with every default that depends on the model or the step count resolved (size, injection
    layers and steps) and checked."""
    from kadiff_jax.models import unet
    size = self.size or models.default_size
    unit = models.vae_scale_factor * 2 ** (len(models.unet_config.block_out_channels) - 1)
    if size % unit:
      raise ValueError(f"size={size}: this model needs a multiple of {unit} (square feature maps at every level)")
    layers = self.inject_layers or default_inject_layers(models.unet_config)
    parse_layers(layers).select(tuple(unet.attention_sites(models.unet_config).values()), "inject_layers")
    dift = self.dift_block or default_dift_block(models.unet_config)
    ups = len(models.unet_config.up_block_types)
    if dift not in {f"up_blocks.{b}" for b in range(ups)}:
      raise ValueError(f"dift_block={dift!r}: expected up_blocks.N with N in 0..{ups - 1} for this UNet")
    return dataclasses.replace(self, size=size, inject_layers=layers, inject_steps=self.step_range(),
                               dift_block=dift)

  def step_range(self) -> tuple[int, int]:
    """Denoising steps with injection; the reference's 19-49 of 50 scaled to other step counts."""
    if self.inject_steps is not None:
      return tuple(self.inject_steps)
    return round(19 * self.steps / 50), self.steps - 1

  def layer_selector(self) -> LayerSelector:
    if self.inject_layers is None:
      raise ValueError("inject_layers is resolved per model: call options.for_model(models) first")
    return parse_layers(self.inject_layers, kind="self")
