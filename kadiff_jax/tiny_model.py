"""Complete tiny pipeline folders of every model family in diffusers format, random and seeded.

Weights come from our own initialisers with every norm and bias perturbed
(so parity tests exercise them), written through the reverse converter in
PyTorch names and layouts: `diffusers.StableDiffusionXLPipeline` (sdxl,
sdxl-turbo) and `StableDiffusionPipeline` (sd15, sd21, sd-turbo) load the
folders as they would the real ones. Each family's folder copies what sets
the real release apart: its text encoders (CLIP ViT-L's quick_gelu, OpenCLIP's
gelu and "!" padding), UNet block structure (SDXL's 3 levels with pooled
text and time ids; SD's 4 levels; SD2's linear projections and upcast
attention), VAE scaling factor and scheduler folder (Euler, PNDM, DDIM with
v-prediction, ancestral Euler over trailing timesteps). Text-encoder weights
use the `text_model.` prefix of the real repositories. Each folder holds an
IP-Adapter in h94/IP-Adapter's layout (`ip_adapter/`).
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
_SCHEDULER_BASE = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                   "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
_EULER = {"interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
          "use_karras_sigmas": False}
SCHEDULER_CONFIGS = {  # as the real releases' scheduler folders
    "sdxl": {"_class_name": "EulerDiscreteScheduler", **_SCHEDULER_BASE, **_EULER, "timestep_spacing": "leading"},
    "sdxl-turbo": {"_class_name": "EulerAncestralDiscreteScheduler", **_SCHEDULER_BASE, **_EULER,
                   "timestep_spacing": "trailing"},
    "sd15": {"_class_name": "PNDMScheduler", **_SCHEDULER_BASE},
    "sd21": {"_class_name": "DDIMScheduler", **_SCHEDULER_BASE, "prediction_type": "v_prediction"},
    "sd-turbo": {"_class_name": "EulerAncestralDiscreteScheduler", **_SCHEDULER_BASE, **_EULER,
                 "timestep_spacing": "trailing"},
}
SDXL_SCHEDULER = SCHEDULER_CONFIGS["sdxl"]
TINY_FAMILIES = tuple(SCHEDULER_CONFIGS)
# Each family's tiny IP-Adapter file (relative to the model folder) and the shared image encoder. SDXL's is the Plus
# adapter KA-Diff's SDXL release uses; SD's is the base adapter its sd1.5 branch uses, with a Plus one beside it.
TINY_IP_ADAPTERS = {"sdxl": "ip_adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
                    "sd": "ip_adapter/models/ip-adapter_sd15.safetensors"}
TINY_IP_ADAPTER_PLUS_SD = "ip_adapter/models/ip-adapter-plus_sd15.safetensors"
TINY_IP_ADAPTER = TINY_IP_ADAPTERS["sdxl"]
TINY_IMAGE_ENCODER = "ip_adapter/models/image_encoder"


def tiny_ip_adapter(family: str) -> str:
  """The tiny model's own IP-Adapter file for a family, relative to its folder."""
  return TINY_IP_ADAPTERS["sdxl" if family.startswith("sdxl") else "sd"]


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


def tiny_configs(family: str):
  """(UNet, VAE, text encoder configs) of a family's tiny model."""
  if family not in SCHEDULER_CONFIGS:
    raise ValueError(f"family={family!r}: expected one of {TINY_FAMILIES}")
  if family.startswith("sdxl"):
    return unet.tiny_sdxl(), vae.tiny(), (clip_text.tiny(False, TINY_VOCAB), clip_text.tiny(True, TINY_VOCAB))
  sd2 = family != "sd15"
  text = dataclasses.replace(clip_text.tiny(False, TINY_VOCAB), hidden_act="gelu" if sd2 else "quick_gelu")
  return unet.tiny_sd(sd2=family == "sd21"), dataclasses.replace(vae.tiny(), scaling_factor=0.18215), (text,)


def make_tiny_model(folder: str | os.PathLike, seed: int = 0, family: str = "sdxl") -> Path:
  """Writes the tiny pipeline of `family` into `folder` (replaced atomically) and returns its path."""
  folder = Path(folder)
  ucfg, vcfg, texts = tiny_configs(family)
  tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  from kadiff_jax import __version__

  if ucfg.cross_attention_dim[0] != sum(t.hidden_size for t in texts):
    raise AssertionError("tiny UNet cross_attention_dim must equal the text widths")
  meta = {"_diffusers_version": "0.42.1", "_kadiff_jax_version": __version__, "_kadiff_jax_seed": seed}
  save_component(tmp / "unet", convert.params_to_torch(random_params(unet.init_shapes(ucfg), [seed, 0])),
                 {**ucfg.to_diffusers(), **meta})
  save_component(tmp / "vae", convert.params_to_torch(random_params(vae.init_shapes(vcfg), [seed, 1])),
                 {**vcfg.to_diffusers(), **meta})
  names = ("text_encoder", "text_encoder_2")
  for i, cfg in enumerate(texts):
    save_component(tmp / names[i], _text_state(random_params(clip_text.init_shapes(cfg), [seed, 2 + i])),
                   {**cfg.to_transformers(cfg.projection_dim is not None), "torch_dtype": "float32"},
                   weights_name="model.safetensors")
  write_tiny_ip_adapter(tmp / "ip_adapter", ucfg, seed, family)
  xl = len(texts) == 2
  # SDXL's second tokenizer and SD2's tokenizer (OpenCLIP) pad with "!"; CLIP ViT-L's pads with its EOS
  clip_bpe.write_tokenizer(tmp / "tokenizer", TINY_VOCAB, **({} if xl or family == "sd15" else {"pad_token": "!"}))
  if xl:
    clip_bpe.write_tokenizer(tmp / "tokenizer_2", TINY_VOCAB, pad_token="!")
  (tmp / "scheduler").mkdir()
  sched = SCHEDULER_CONFIGS[family]
  (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
  parts = {"scheduler": ["diffusers", sched["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
           "vae": ["diffusers", "AutoencoderKL"], "feature_extractor": [None, None], "image_encoder": [None, None]}
  if xl:
    index = {"_class_name": "StableDiffusionXLPipeline", **meta, "force_zeros_for_empty_prompt": True, **parts,
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"]}
  else:
    index = {"_class_name": "StableDiffusionPipeline", **meta, "requires_safety_checker": False, **parts,
             "safety_checker": [None, None]}
  (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
  if folder.exists():
    shutil.rmtree(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  os.replace(tmp, folder)
  log.info("wrote tiny %s pipeline (seed %d) to %s", family, seed, folder)
  return folder


def tiny_resampler(ucfg: unet.UNetConfig, ecfg: clip_vision.CLIPVisionConfig) -> image_proj.ResamplerConfig:
  """The Plus projection at tiny size (dim_head 64, depth 4, as diffusers' loader assumes)."""
  return image_proj.ResamplerConfig(dim=64, depth=4, dim_head=64, heads=1, num_queries=4,
                                    embedding_dim=ecfg.hidden_size, output_dim=ucfg.cross_attention_dim[0])


def write_tiny_ip_adapter(folder: Path, ucfg: unet.UNetConfig, seed: int = 0, family: str = "sdxl") -> None:
  """IP-Adapter file(s) + CLIP image encoder in h94/IP-Adapter's layout under `folder`: for SDXL families the Plus
  adapter, for SD families the base adapter (ImageProjModel) and a Plus one."""
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
  cross = ucfg.cross_attention_dim[0]
  projections = {TINY_IP_ADAPTER_PLUS_SD if not family.startswith("sdxl") else tiny_ip_adapter(family):
                 tiny_resampler(ucfg, ecfg)}
  if not family.startswith("sdxl"):
    projections[tiny_ip_adapter(family)] = image_proj.ImageProjConfig(ecfg.projection_dim, cross, num_tokens=4)
  for k, (name, pcfg) in enumerate(sorted(projections.items())):
    rng = np.random.default_rng([seed, 11] + ([k] if k else []))
    layers = {s.path: {n: (rng.standard_normal((cross, s.channels)) / np.sqrt(cross))
                       .astype(np.float32) for n in ("to_k_ip", "to_v_ip")}
              for s in unet.attention_sites(ucfg).values() if s.kind == "cross"}
    proj = random_params(image_proj.init_shapes(pcfg), [seed, 12] + ([k] if k else []))
    adapter = IPAdapter(ecfg, None, pcfg, proj, layers)
    path = folder.parent / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(adapter, ucfg), str(path))


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


def make_tiny_lpips(folder: str | os.PathLike, seed: int = 0) -> Path:
  """Random LPIPS weights in the public layouts: `alexnet.safetensors` (torchvision AlexNet `features.*`) and
  `alex.safetensors` (lpips v0.1 heads `lin{k}.model.1.weight`, non-negative as trained ones are)."""
  from safetensors.numpy import save_file
  from kadiff_jax.metrics.lpips import ALEXNET
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng([seed, 24])
  backbone, heads, cin = {}, {}, 3
  for k, (i, cout, size, *_) in enumerate(ALEXNET):
    fan_in = cin * size * size
    backbone[f"features.{i}.weight"] = (rng.standard_normal((cout, cin, size, size)) / np.sqrt(fan_in)).astype(
        np.float32)
    backbone[f"features.{i}.bias"] = (0.05 * rng.standard_normal(cout)).astype(np.float32)
    heads[f"lin{k}.model.1.weight"] = np.abs(rng.standard_normal((1, cout, 1, 1)) / cout).astype(np.float32)
    cin = cout
  save_file(backbone, str(folder / "alexnet.safetensors"))
  save_file(heads, str(folder / "alex.safetensors"))
  (folder / "config.json").write_text(json.dumps({"model_type": "lpips", "net": "alex", "version": "0.1",
                                                  "backbone": "alexnet.safetensors", "lin": "alex.safetensors"}))
  return folder


TINY_PARTS = {"clip": make_tiny_clip, "dino": make_tiny_dino, "lpips": make_tiny_lpips}  # made on first use


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


def tiny_model_dir(cache_dir: Path | None = None, seed: int = 0, family: str = "sdxl") -> Path:
  """The tiny model of `family` in the cache, built on first use."""
  from kadiff_jax import __version__
  folder = (cache_dir or default_cache_dir()) / f"tiny-{family}-{__version__}-seed{seed}"
  if not (folder / "model_index.json").is_file() or not (folder / tiny_ip_adapter(family)).is_file():
    make_tiny_model(folder, seed, family)
  return folder
