"""Loading a Stable Diffusion pipeline folder (diffusers layout) of any family into configs + params."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kadiff_jax.models import clip_text, unet, vae
from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.weights import family as families
from kadiff_jax.weights import files, load

log = logging.getLogger("kadiff_jax")

_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SECOND_ENCODER = ("text_encoder_2", "tokenizer_2")  # SDXL families
_HUB_PATTERNS = ("model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer*/*",
                 "unet/diffusion_pytorch_model{v}.safetensors*", "vae/diffusion_pytorch_model{v}.safetensors*",
                 "text_encoder*/model{v}.safetensors*")


@dataclasses.dataclass(frozen=True)
class DiffusionModels:
  """Everything the pipelines need from one pipeline folder, as configs + param pytrees + tokenizers.

  The second text encoder and tokenizer exist in SDXL families only (`family.text_time`)."""

  source: Path
  family: families.Family
  unet_config: unet.UNetConfig
  unet_params: Any
  vae_config: vae.VAEConfig
  vae_params: Any
  text_config: clip_text.CLIPTextConfig
  text_params: Any
  tokenizer: Any
  scheduler_config: dict
  text_config_2: clip_text.CLIPTextConfig | None = None
  text_params_2: Any = None
  tokenizer_2: Any = None
  force_zeros_for_empty_prompt: bool = False

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae_config.block_out_channels) - 1)

  @property
  def default_size(self) -> int:
    return self.unet_config.sample_size * self.vae_scale_factor


def resolve(model: str, *, variant: str | None = None, cache_dir: Path | None = None) -> Path:
  """'tiny' (the tiny SDXL), 'tiny-FAMILY' (e.g. tiny-sd15), a local folder, or a Hub id -> local pipeline
  folder."""
  family = tiny_family(model)
  if family is not None:
    from kadiff_jax.tiny_model import tiny_model_dir
    return tiny_model_dir(cache_dir, family=family)
  v = f".{variant}" if variant else ""
  return files.resolve_model(model, [p.format(v=v) for p in _HUB_PATTERNS])


def tiny_family(model: str) -> str | None:
  """The family a built-in tiny model name ('tiny', 'tiny-sd15', ...) names; None for anything else."""
  if model == "tiny":
    return "sdxl"
  if model.startswith("tiny-") and model[len("tiny-"):] in families.FAMILIES:
    return model[len("tiny-"):]
  return None


def load_tokenizer(folder: Path):
  from kadiff_jax.clip_tokenizer import CLIPTokenizer
  if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
    raise files.CheckpointNotFound(f"missing tokenizer folder {folder} (vocab.json and merges.txt)")
  return CLIPTokenizer(folder)


def load_models(model: str, *, dtype=jnp.float32, vae_dtype=None, variant: str | None = None,
                cache_dir: Path | None = None, use_cache: bool = True) -> DiffusionModels:
  """Loads a pipeline folder of any supported family (`kadiff_jax.weights.family`). `vae_dtype` defaults to fp32
  when the VAE asks to be upcast."""
  root = resolve(model, variant=variant, cache_dir=cache_dir)
  index = files.read_json(root / "model_index.json")
  unet_json = files.read_json(files.component_dir(root, "unet") / "config.json") if "unet" in index else {}
  text_json = (files.read_json(files.component_dir(root, "text_encoder") / "config.json")
               if "text_encoder" in index else None)
  sched_json = (files.read_json(files.component_dir(root, "scheduler") / "scheduler_config.json")
                if "scheduler" in index else {})
  fam = families.detect(root, index, unet_json, text_json, sched_json)
  for name in _COMPONENTS + (_SECOND_ENCODER if fam.text_time else ()):
    files.component_dir(root, name)
  ucfg = unet.UNetConfig.from_diffusers(unet_json)
  vcfg = vae.VAEConfig.from_diffusers(files.read_json(root / "vae" / "config.json"))
  t1 = clip_text.CLIPTextConfig.from_transformers(text_json, False)
  t2 = (clip_text.CLIPTextConfig.from_transformers(files.read_json(root / "text_encoder_2" / "config.json"), True)
        if fam.text_time else None)
  width = t1.hidden_size + (t2.hidden_size if t2 else 0)
  if ucfg.cross_attention_dim[0] != width:
    widths = f"{t1.hidden_size} + {t2.hidden_size}" if t2 else f"{t1.hidden_size}"
    raise ConfigError(f"{root}: unet cross_attention_dim {ucfg.cross_attention_dim[0]} != text encoder width(s) "
                      f"{widths}")
  if vae_dtype is None:
    vae_dtype = jnp.float32 if vcfg.force_upcast else dtype
  kw = dict(variant=variant, cache_dir=cache_dir, use_cache=use_cache)
  second = {}
  if t2 is not None:
    second = dict(text_config_2=t2, tokenizer_2=load_tokenizer(root / "tokenizer_2"),
                  text_params_2=load.load_component(root / "text_encoder_2",
                                                    dataclasses.replace(load.CLIP_TEXT, name="text_encoder_2"),
                                                    lambda: clip_text.init_shapes(t2), t2, dtype=dtype, **kw))
  return DiffusionModels(
      source=root,
      family=fam,
      unet_config=ucfg,
      unet_params=load.load_component(root / "unet", load.UNET, lambda: unet.init_shapes(ucfg), ucfg, dtype=dtype,
                                      **kw),
      vae_config=vcfg,
      vae_params=load.load_component(root / "vae", load.VAE, lambda: vae.init_shapes(vcfg), vcfg, dtype=vae_dtype,
                                     **kw),
      text_config=t1,
      text_params=load.load_component(root / "text_encoder", load.CLIP_TEXT, lambda: clip_text.init_shapes(t1), t1,
                                      dtype=dtype, **kw),
      tokenizer=load_tokenizer(root / "tokenizer"),
      scheduler_config=sched_json,
      # diffusers' SDXL pipelines register it (default True); SD1.x/2.x pipelines always encode the empty prompt
      force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)) if fam.text_time else False,
      **second,
  )


def params_dtype(tree) -> jnp.dtype:
  return jax.tree_util.tree_leaves(tree)[0].dtype
