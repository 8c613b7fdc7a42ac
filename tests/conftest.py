"""Shared fixtures: one tiny SDXL pipeline folder per session, loaded once."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kadiff_jax import xla_cpu

xla_cpu.configure()  # the CPU settings the `kadiff` command runs with, before any test creates a backend


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
  # Keep converted-param caches and the tiny model out of the user's home.
  os.environ["KADIFF_CACHE"] = str(tmp_path_factory.mktemp("kadiff_cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  from kadiff_jax.tiny_model import make_tiny_model
  return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
  from kadiff_jax.weights.models import load_models
  return load_models(str(tiny_dir))


@pytest.fixture(scope="session")
def torch_pipe(tiny_dir):
  from diffusers import StableDiffusionXLPipeline
  return StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))


def tiny_ip_pipe(tiny_dir):
  """diffusers' SDXL pipeline on the tiny folder with its IP-Adapter Plus loaded (a fresh one per caller: some tests
  replace its attention processors)."""
  from diffusers import StableDiffusionXLPipeline
  pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
  pipe.load_ip_adapter(str(tiny_dir / "ip_adapter"), subfolder="sdxl_models",
                       weight_name="ip-adapter-plus_sdxl_vit-h.safetensors", image_encoder_folder="models/image_encoder")
  return pipe


def max_rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref| (error relative to the output's scale)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
  """A tiny random transformers CLIPModel folder (with our tiny BPE tokenizer) and the torch model."""
  import torch
  from kadiff_jax import clip_bpe
  from kadiff_jax.tiny_model import TINY_VOCAB
  from transformers import CLIPConfig, CLIPModel
  folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
  torch.manual_seed(0)
  cfg = CLIPConfig(
      text_config=dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       bos_token_id=TINY_VOCAB - 2, eos_token_id=TINY_VOCAB - 1),  # the tokenizer's ids
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8),
      projection_dim=24)
  model = CLIPModel(cfg).eval()
  model.save_pretrained(folder)
  clip_bpe.write_tokenizer(folder, TINY_VOCAB)
  return folder, model


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
  """A tiny random transformers ViTModel folder (DINO-shaped, 224 px, patch 16) and the torch model."""
  import torch
  from transformers import ViTConfig, ViTModel
  folder = tmp_path_factory.mktemp("dino") / "tiny-dino"
  torch.manual_seed(1)
  model = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=224, patch_size=16), add_pooling_layer=True).eval()
  model.save_pretrained(folder)
  return folder, model


def pytest_collection_modifyitems(config, items):
  """`slow` tests (multi-process, sharded and long end-to-end runs) run only with KADIFF_SLOW=1."""
  if os.environ.get("KADIFF_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: set KADIFF_SLOW=1 to run")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def torchvision_standin(**models) -> None:
  """torchvision's PyPI build does not load beside this CPU torch; the lpips and elatentlpips packages import it only
  for a backbone's layer list. This installs (or extends) a stand-in `torchvision.models` whose named constructors
  return objects with the `features` the test declares (the same layers as torchvision's)."""
  import sys
  import types
  tv = sys.modules.get("torchvision")
  if tv is None:
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace()
    sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models
  for name, features in models.items():
    setattr(tv.models, name, lambda features=features, **_: types.SimpleNamespace(features=features()))
