"""Model families: what kind of Stable Diffusion pipeline a folder holds, read from the folder itself.

A family decides how prompts become UNet conditioning and which defaults
text-to-image uses; nothing else in the pipelines asks which model it is.

| family       | pipeline class            | conditioning                                        | steps, guidance |
|--------------|---------------------------|-----------------------------------------------------|-----------------|
| `sdxl`       | StableDiffusionXLPipeline | two encoders' penultimate states, pooled + time ids | 50, 5.0         |
| `sdxl-turbo` | StableDiffusionXLPipeline | as sdxl                                             | 1, 0.0          |
| `sd15`       | StableDiffusionPipeline   | CLIP ViT-L (quick_gelu) last hidden state           | 50, 7.5         |
| `sd21`       | StableDiffusionPipeline   | OpenCLIP ViT-H (gelu) last hidden state (SD2.x)     | 50, 7.5         |
| `sd-turbo`   | StableDiffusionPipeline   | as sd21                                             | 1, 0.0          |

A 768-px SD2.x folder (the v-prediction releases) whose scheduler config
does not say its prediction type is refused rather than read as epsilon.
The turbo models are told apart from their bases by their scheduler
folder, the one thing their releases change there: EulerAncestralDiscrete
with trailing timesteps. Steps and guidance are diffusers' pipeline
defaults (50 and 5.0 / 7.5) except for the turbo models, whose model cards
generate in 1 step without guidance.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kadiff_jax.models.config_util import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  label: str
  text_time: bool   # SDXL conditioning: two text encoders, pooled text embeds and time ids
  steps: int        # default denoising steps of text-to-image
  guidance: float   # default classifier-free guidance of text-to-image

  @property
  def few_step(self) -> bool:
    return self.steps < 4


FAMILIES = {f.name: f for f in (
    Family("sdxl", "SDXL", True, 50, 5.0),
    Family("sdxl-turbo", "SDXL-Turbo", True, 1, 0.0),
    Family("sd15", "SD1.x", False, 50, 7.5),
    Family("sd21", "SD2.x", False, 50, 7.5),
    Family("sd-turbo", "SD-Turbo", False, 1, 0.0),
)}

XL_CLASSES = ("StableDiffusionXLPipeline",)
SD_CLASSES = ("StableDiffusionPipeline",)


def is_turbo_scheduler(scheduler_config: dict) -> bool:
  """The turbo releases' scheduler: ancestral Euler over trailing timesteps."""
  return (scheduler_config.get("_class_name") == "EulerAncestralDiscreteScheduler"
          and scheduler_config.get("timestep_spacing") == "trailing")


def detect(root: Path, index: dict, unet_config: dict, text_config: dict | None, scheduler_config: dict) -> Family:
  """The family of the pipeline folder `root`, from its model_index.json and component configs (dicts).

  Raises ConfigError naming what was found for anything else (an SD3 or Flux transformer, an inpainting or
  upscaling UNet, an unknown pipeline class)."""
  cls = index.get("_class_name")
  if "transformer" in index or "unet" not in index:
    parts = sorted(k for k in index if not k.startswith("_"))
    found = "a 'transformer' component" if "transformer" in index else f"components {parts}"
    raise ConfigError(f"{root}: pipeline class {cls!r} with {found} is not a UNet Stable Diffusion pipeline; "
                      f"supported: {', '.join(XL_CLASSES + SD_CLASSES)} (SD1.x, SD2.x, SD-Turbo, SDXL, SDXL-Turbo)")
  if cls not in XL_CLASSES + SD_CLASSES:
    raise ConfigError(f"{root}/model_index.json: pipeline class {cls!r} is not supported; expected one of "
                      f"{', '.join(XL_CLASSES + SD_CLASSES)}")
  in_channels = unet_config.get("in_channels", 4)
  if in_channels != 4:
    raise ConfigError(f"{root}/unet: in_channels={in_channels}: an inpainting or upscaling UNet; text-to-image "
                      "UNets take 4 latent channels")
  turbo = is_turbo_scheduler(scheduler_config)
  embed = unet_config.get("addition_embed_type")
  if cls in XL_CLASSES:
    if embed != "text_time":
      raise ConfigError(f"{root}/unet: addition_embed_type={embed!r}; an SDXL UNet has 'text_time'")
    return FAMILIES["sdxl-turbo" if turbo else "sdxl"]
  if embed is not None:
    raise ConfigError(f"{root}/unet: addition_embed_type={embed!r} in a {cls}; SD1.x/2.x UNets have none")
  act = (text_config or {}).get("hidden_act")
  if act == "quick_gelu":  # OpenAI CLIP ViT-L/14
    return FAMILIES["sd15"]
  if act == "gelu":        # OpenCLIP ViT-H/14
    if (unet_config.get("sample_size") or 0) >= 96 and "prediction_type" not in scheduler_config:
      raise ConfigError(f"{root}/scheduler/scheduler_config.json has no 'prediction_type', and this is a 768-px "
                        "SD2.x model, which its release trains for v-prediction: add \"prediction_type\": "
                        "\"v_prediction\" (or \"epsilon\" for an epsilon fine-tune)")
    return FAMILIES["sd-turbo" if turbo else "sd21"]
  raise ConfigError(f"{root}/text_encoder: hidden_act={act!r}; expected quick_gelu (SD1.x, CLIP ViT-L) or gelu "
                    "(SD2.x, OpenCLIP ViT-H)")
