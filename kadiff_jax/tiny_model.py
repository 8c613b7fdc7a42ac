"""A complete tiny SDXL pipeline folder in diffusers format, random and seeded.

Weights come from our own initialisers with every norm and bias perturbed
(so parity tests exercise them), written through the reverse converter in
PyTorch names and layouts: `diffusers.StableDiffusionXLPipeline.from_pretrained`
loads the folder as it would the real one. Text-encoder weights use the
`text_model.` prefix of the real SDXL repositories.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from kadiff_jax import clip_bpe
from kadiff_jax.models import clip_text, clip_vision, image_proj, unet, vae
from kadiff_jax.weights import convert
from kadiff_jax.weights.load import default_cache_dir, save_component

log = logging.getLogger("kadiff_jax")

TINY_VOCAB = 1000
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def random_params(shapes, seed):
  """Seeded random params for a shape tree, drawn in numpy (no init graph to compile).

  Kernels N(0, 1/fan_in); embeddings N(0, 0.02); norm scales 1 + 0.1 N(0, 1);
  biases 0.05 N(0, 1), so parity tests exercise every norm and bias.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, tuple(leaf.shape)
    z = rng.standard_normal(shape)
    if name == "kernel":
      z = z / np.sqrt(np.prod(shape[:-1]))
    elif name == "embedding":
      z = 0.02 * z
    elif name == "scale":
      z = 1 + 0.1 * z
    else:
      z = 0.05 * z
    return z.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _text_state(params) -> dict[str, np.ndarray]:
  params = dict(params)
  proj = params.pop("text_projection", None)
  state = convert.params_to_torch(params, prefix="text_model.")
  if proj is not None:
    state.update(convert.params_to_torch({"text_projection": proj}))
  return state


def make_tiny_model(folder: str | os.PathLike, seed: int = 0) -> Path:
  """Writes the tiny pipeline into `folder` (replaced atomically) and returns its path."""
  folder = Path(folder)
  tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  from kadiff_jax import __version__

  ucfg, vcfg = unet.tiny_sdxl(), vae.tiny()
  t1, t2 = clip_text.tiny(False, TINY_VOCAB), clip_text.tiny(True, TINY_VOCAB)
  if ucfg.cross_attention_dim[0] != t1.hidden_size + t2.hidden_size:
    raise AssertionError("tiny UNet cross_attention_dim must equal the two text widths")
  meta = {"_diffusers_version": "0.42.1", "_kadiff_jax_version": __version__, "_kadiff_jax_seed": seed}
  save_component(tmp / "unet", convert.params_to_torch(random_params(unet.init_shapes(ucfg), [seed, 0])),
                 {**ucfg.to_diffusers(), **meta})
  save_component(tmp / "vae", convert.params_to_torch(random_params(vae.init_shapes(vcfg), [seed, 1])),
                 {**vcfg.to_diffusers(), **meta})
  for i, (name, cfg) in enumerate((("text_encoder", t1), ("text_encoder_2", t2))):
    save_component(tmp / name, _text_state(random_params(clip_text.init_shapes(cfg), [seed, 2 + i])),
                   {**cfg.to_transformers(cfg.projection_dim is not None), "torch_dtype": "float32"},
                   weights_name="model.safetensors")
  write_tiny_ip_adapter(tmp / "ip_adapter", ucfg, seed)
  clip_bpe.write_tokenizer(tmp / "tokenizer", TINY_VOCAB)
  clip_bpe.write_tokenizer(tmp / "tokenizer_2", TINY_VOCAB, pad_token="!")
  (tmp / "scheduler").mkdir()
  (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER, indent=2))
  (tmp / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionXLPipeline", **meta, "force_zeros_for_empty_prompt": True,
      "feature_extractor": [None, None], "image_encoder": [None, None],
      "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
  if folder.exists():
    shutil.rmtree(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  os.replace(tmp, folder)
  log.info("wrote tiny SDXL pipeline (seed %d) to %s", seed, folder)
  return folder


TINY_IP_ADAPTER = "ip_adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
TINY_IMAGE_ENCODER = "ip_adapter/models/image_encoder"


def tiny_resampler(ucfg: unet.UNetConfig, ecfg: clip_vision.CLIPVisionConfig) -> image_proj.ResamplerConfig:
  """The Plus projection at tiny size (dim_head 64, depth 4, as diffusers' loader assumes)."""
  return image_proj.ResamplerConfig(dim=64, depth=4, dim_head=64, heads=1, num_queries=4,
                                    embedding_dim=ecfg.hidden_size, output_dim=ucfg.cross_attention_dim[0])


def write_tiny_ip_adapter(folder: Path, ucfg: unet.UNetConfig, seed: int = 0) -> None:
  """IP-Adapter-Plus file + CLIP image encoder in h94/IP-Adapter's layout under `folder`."""
  from kadiff_jax.models.ip_adapter import IPAdapter
  from kadiff_jax.weights.ip_adapter import adapter_state
  from safetensors.numpy import save_file

  ecfg = clip_vision.tiny()
  enc = random_params(clip_vision.init_shapes(ecfg), [seed, 10])
  enc = dict(enc)
  proj_out = enc.pop("visual_projection")
  state = convert.params_to_torch(enc, prefix="vision_model.")
  state.update(convert.params_to_torch({"visual_projection": proj_out}))
  save_component(folder / "models" / "image_encoder", state, {**ecfg.to_transformers(), "torch_dtype": "float32"},
                 weights_name="model.safetensors")
  pcfg = tiny_resampler(ucfg, ecfg)
  rng = np.random.default_rng([seed, 11])
  cross = ucfg.cross_attention_dim[0]
  layers = {s.path: {n: (rng.standard_normal((cross, s.channels)) / np.sqrt(cross))
                     .astype(np.float32) for n in ("to_k_ip", "to_v_ip")}
            for s in unet.attention_sites(ucfg).values() if s.kind == "cross"}
  adapter = IPAdapter(ecfg, None, pcfg, random_params(image_proj.init_shapes(pcfg), [seed, 12]), layers)
  (folder / "sdxl_models").mkdir(parents=True, exist_ok=True)
  save_file(adapter_state(adapter, ucfg), str(folder / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"))


def make_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
  """A tiny random CLIPModel folder (text and vision towers with projections, our tiny BPE tokenizer) in the
  transformers layout, for CLIP-T and CLIP-I: `transformers.CLIPModel.from_pretrained` loads it."""
  folder = Path(folder)
  tcfg, vcfg = clip_text.tiny(True, TINY_VOCAB), clip_vision.tiny()
  if tcfg.projection_dim != vcfg.projection_dim:
    raise AssertionError("tiny CLIP towers must share one projection width")
  text = dict(random_params(clip_text.init_shapes(tcfg), [seed, 20]))
  vision = dict(random_params(clip_vision.init_shapes(vcfg), [seed, 21]))
  state = convert.params_to_torch({k: v for k, v in text.items() if k != "text_projection"}, prefix="text_model.")
  state.update(convert.params_to_torch({k: v for k, v in vision.items() if k != "visual_projection"},
                                       prefix="vision_model."))
  state.update(convert.params_to_torch({"text_projection": text["text_projection"],
                                        "visual_projection": vision["visual_projection"]}))
  state["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
  text_cfg = {k: v for k, v in tcfg.to_transformers(True).items() if k not in ("architectures", "projection_dim")}
  vision_cfg = {k: v for k, v in vcfg.to_transformers().items() if k not in ("architectures", "projection_dim")}
  save_component(folder, state, {"architectures": ["CLIPModel"], "model_type": "clip", "torch_dtype": "float32",
                                 "projection_dim": tcfg.projection_dim, "logit_scale_init_value": 2.6592,
                                 "text_config": {**text_cfg, "model_type": "clip_text_model"},
                                 "vision_config": {**vision_cfg, "model_type": "clip_vision_model"}},
                 weights_name="model.safetensors")
  clip_bpe.write_tokenizer(folder, TINY_VOCAB)
  return folder


def make_tiny_dino(folder: str | os.PathLike, seed: int = 0) -> Path:
  """A tiny random ViTModel folder shaped like DINO ViT-S/16 (CLS features), in the transformers layout."""
  from kadiff_jax.models import vit
  folder = Path(folder)
  cfg = vit.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)
  state = convert.params_to_torch(random_params(vit.init_shapes(cfg), [seed, 22]))
  rng = np.random.default_rng([seed, 23])  # the pooler transformers' ViTModel carries (DINO scores do not use it)
  state["pooler.dense.weight"] = (rng.standard_normal((32, 32)) / np.sqrt(32)).astype(np.float32)
  state["pooler.dense.bias"] = np.zeros(32, np.float32)
  save_component(folder, state, {"architectures": ["ViTModel"], "model_type": "vit", "torch_dtype": "float32",
                                 **dataclasses.asdict(cfg)}, weights_name="model.safetensors")
  return folder


TINY_PARTS = {"clip": make_tiny_clip, "dino": make_tiny_dino}  # beside the SDXL folder, made on first use


def tiny_part(name: str, cache_dir: Path | None = None, seed: int = 0) -> Path:
  """The tiny CLIP ("clip"), DINO ("dino") or LLaVA-OneVision re-ranker ("mllm") folder in the cache, made on
  first use: what `--clip tiny`, `--dino tiny` and `--rerank tiny` name."""
  from kadiff_jax import __version__
  folder = (cache_dir or default_cache_dir()) / f"tiny-{name}-{__version__}-seed{seed}"
  if not (folder / "config.json").is_file():
    if name == "mllm":
      try:
        from retrieval.tiny_mllm import make_tiny_mllm
        import torch  # noqa: F401
      except ImportError:
        raise ImportError("the tiny re-ranker needs the rerank extra: pip install 'kadiff-jax[rerank]'") from None
      make = make_tiny_mllm
    elif name in TINY_PARTS:
      make = TINY_PARTS[name]
    else:
      raise ValueError(f"tiny part {name!r}: expected one of {sorted(TINY_PARTS) + ['mllm']}")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp, seed)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info("wrote the tiny %s model to %s", name, folder)
  return folder


def tiny_model_dir(cache_dir: Path | None = None, seed: int = 0) -> Path:
  """The tiny model in the cache, built on first use."""
  from kadiff_jax import __version__
  folder = (cache_dir or default_cache_dir()) / f"tiny-sdxl-{__version__}-seed{seed}"
  if not (folder / "model_index.json").is_file() or not (folder / TINY_IP_ADAPTER).is_file():
    make_tiny_model(folder, seed)
  return folder
