"""Loading an SDXL pipeline folder (diffusers layout) into configs + params."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kadiff_jax.models import clip_text, unet, vae
from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.weights import files, load

log = logging.getLogger("kadiff_jax")

_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_HUB_PATTERNS = ("model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer*/*",
                 "unet/diffusion_pytorch_model{v}.safetensors*", "vae/diffusion_pytorch_model{v}.safetensors*",
                 "text_encoder*/model{v}.safetensors*")


@dataclasses.dataclass(frozen=True)
class SDXLModels:
  """Everything the SDXL pipelines need, as configs + param pytrees + tokenizers."""

  source: Path
  unet_config: unet.UNetConfig
  unet_params: Any
  vae_config: vae.VAEConfig
  vae_params: Any
  text_config: clip_text.CLIPTextConfig
  text_params: Any
  text_config_2: clip_text.CLIPTextConfig
  text_params_2: Any
  tokenizer: Any
  tokenizer_2: Any
  scheduler_config: dict
  force_zeros_for_empty_prompt: bool = True

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae_config.block_out_channels) - 1)

  @property
  def default_size(self) -> int:
    return self.unet_config.sample_size * self.vae_scale_factor


def resolve(model: str, *, variant: str | None = None, cache_dir: Path | None = None) -> Path:
  """'tiny', a local folder, or a Hub id -> local pipeline folder."""
  if model == "tiny":
    from kadiff_jax.tiny_model import tiny_model_dir
    return tiny_model_dir(cache_dir)
  v = f".{variant}" if variant else ""
  return files.resolve_model(model, [p.format(v=v) for p in _HUB_PATTERNS])


def load_tokenizer(folder: Path):
  from kadiff_jax.clip_tokenizer import CLIPTokenizer
  if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
    raise files.CheckpointNotFound(f"missing tokenizer folder {folder} (vocab.json and merges.txt)")
  return CLIPTokenizer(folder)


def load_sdxl(model: str, *, dtype=jnp.float32, vae_dtype=None, variant: str | None = None,
              cache_dir: Path | None = None, use_cache: bool = True) -> SDXLModels:
  """Loads an SDXL pipeline folder. `vae_dtype` defaults to fp32 when the VAE asks to be upcast."""
  root = resolve(model, variant=variant, cache_dir=cache_dir)
  index = files.read_json(root / "model_index.json")
  for name in _COMPONENTS:
    files.component_dir(root, name)
  ucfg = unet.UNetConfig.from_diffusers(files.read_json(root / "unet" / "config.json"))
  vcfg = vae.VAEConfig.from_diffusers(files.read_json(root / "vae" / "config.json"))
  t1 = clip_text.CLIPTextConfig.from_transformers(files.read_json(root / "text_encoder" / "config.json"), False)
  t2 = clip_text.CLIPTextConfig.from_transformers(files.read_json(root / "text_encoder_2" / "config.json"), True)
  if ucfg.addition_embed_type != "text_time":
    raise ConfigError(f"{root}/unet: addition_embed_type={ucfg.addition_embed_type!r}; an SDXL UNet has 'text_time'")
  if ucfg.cross_attention_dim[0] != t1.hidden_size + t2.hidden_size:
    raise ConfigError(f"{root}: unet cross_attention_dim {ucfg.cross_attention_dim[0]} != text encoder widths "
                      f"{t1.hidden_size} + {t2.hidden_size}")
  if vae_dtype is None:
    vae_dtype = jnp.float32 if vcfg.force_upcast else dtype
  kw = dict(variant=variant, cache_dir=cache_dir, use_cache=use_cache)
  return SDXLModels(
      source=root,
      unet_config=ucfg,
      unet_params=load.load_component(root / "unet", load.UNET, lambda: unet.init_shapes(ucfg), ucfg, dtype=dtype,
                                      **kw),
      vae_config=vcfg,
      vae_params=load.load_component(root / "vae", load.VAE, lambda: vae.init_shapes(vcfg), vcfg, dtype=vae_dtype,
                                     **kw),
      text_config=t1,
      text_params=load.load_component(root / "text_encoder", load.CLIP_TEXT, lambda: clip_text.init_shapes(t1), t1,
                                      dtype=dtype, **kw),
      text_config_2=t2,
      text_params_2=load.load_component(root / "text_encoder_2", dataclasses.replace(load.CLIP_TEXT,
                                                                                     name="text_encoder_2"),
                                        lambda: clip_text.init_shapes(t2), t2, dtype=dtype, **kw),
      tokenizer=load_tokenizer(root / "tokenizer"),
      tokenizer_2=load_tokenizer(root / "tokenizer_2"),
      scheduler_config=files.read_json(root / "scheduler" / "scheduler_config.json"),
      force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
  )


def params_dtype(tree) -> jnp.dtype:
  return jax.tree_util.tree_leaves(tree)[0].dtype
