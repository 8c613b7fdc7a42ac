"""Loading: strict key reports, sharded/variant/bf16/.bin files, the params cache, bad folders."""

from __future__ import annotations

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from kadiff_jax.models import unet
from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.tiny_model import random_params
from kadiff_jax.weights import convert, files, load
from kadiff_jax.weights.models import load_models

CFG = unet.tiny_sdxl()


@pytest.fixture(scope="module")
def state():
  return convert.params_to_torch(random_params(unet.init_shapes(CFG), 5))


def _same(a, b):
  import jax
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_strict_report_names_missing_unexpected_and_misshaped(state):
  bad = dict(state)
  del bad["conv_in.bias"]
  bad["down_blocks.1.attentions.0.extra.weight"] = np.zeros(3, np.float32)
  bad["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
  with pytest.raises(convert.WeightsError) as e:
    convert.torch_to_params(bad, unet.init_shapes(CFG), component="unet")
  msg = str(e.value)
  assert "1 missing" in msg and "conv_in.bias" in msg
  assert "1 unexpected" in msg and "down_blocks.1.attentions.0.extra.weight" in msg
  assert "1 wrong shape" in msg and "conv_out.weight: checkpoint (4, 32, 1, 1), model expects (4, 32, 3, 3)" in msg


def test_round_trip_names(state):
  params = convert.torch_to_params(state, unet.init_shapes(CFG), component="unet")
  assert convert.params_to_torch(params).keys() == state.keys()
  assert convert.torch_name_to_path("time_embedding.linear_1.weight") == ("time_embedding", "linear_1", "weight")
  assert convert.path_to_torch_module(("up_blocks_0", "attentions_2", "transformer_blocks_1", "ff", "net_0", "proj")) \
      == "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj"


def test_sharded_variant_bf16_and_bin(tmp_path, state):
  want = convert.torch_to_params(state, unet.init_shapes(CFG), component="unet")
  keys = sorted(state)
  # sharded fp16 variant, diffusers' naming
  d = tmp_path / "sharded"
  d.mkdir()
  half = len(keys) // 2
  shards = {"diffusion_pytorch_model-00001-of-00002.fp16.safetensors": keys[:half],
            "diffusion_pytorch_model-00002-of-00002.fp16.safetensors": keys[half:]}
  for name, ks in shards.items():
    save_file({k: state[k].astype(np.float16) for k in ks}, str(d / name))
  (d / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(
      {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
  got = load.load_component(d, load.UNET, lambda: unet.init_shapes(CFG), CFG, variant="fp16", use_cache=False)
  _same(got, {k: v for k, v in convert.torch_to_params(
      {k: v.astype(np.float16).astype(np.float32) for k, v in state.items()}, unet.init_shapes(CFG),
      component="unet").items()})
  with pytest.raises(files.CheckpointNotFound, match="variant None"):
    files.weight_files(d)
  # bf16 safetensors written by torch
  d2 = tmp_path / "bf16"
  d2.mkdir()
  from safetensors.torch import save_file as tsave
  tsave({k: torch.from_numpy(v).bfloat16() for k, v in state.items()}, str(d2 / "diffusion_pytorch_model.safetensors"))
  got = files.read_safetensors(d2 / "diffusion_pytorch_model.safetensors")
  assert got["conv_in.weight"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["conv_in.weight"].astype(np.float32),
                                state["conv_in.weight"].astype(ml_dtypes.bfloat16).astype(np.float32))
  # .bin through torch.load(weights_only=True)
  d3 = tmp_path / "bin"
  d3.mkdir()
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, d3 / "diffusion_pytorch_model.bin")
  _same(load.load_component(d3, load.UNET, lambda: unet.init_shapes(CFG), CFG, use_cache=False), want)


def test_params_cache_second_load_and_log(tmp_path, state, caplog):
  d = tmp_path / "unet"
  load.save_component(d, state, CFG.to_diffusers())
  with caplog.at_level(logging.INFO, logger="kadiff_jax"):
    first = load.load_component(d, load.UNET, lambda: unet.init_shapes(CFG), CFG, cache_dir=tmp_path / "c")
    second = load.load_component(d, load.UNET, lambda: unet.init_shapes(CFG), CFG, cache_dir=tmp_path / "c")
  text = caplog.text
  assert "converted" in text and "read converted params from the cache" in text
  _same(first, second)
  # bf16 params round-trip through the cache bit for bit; a damaged cache file is converted again
  bf = [load.load_component(d, load.UNET, lambda: unet.init_shapes(CFG), CFG, dtype=jnp.bfloat16,
                            cache_dir=tmp_path / "b")
        for _ in range(2)]
  assert jax.tree_util.tree_leaves(bf[1])[0].dtype == jnp.bfloat16
  _same(bf[0], bf[1])
  for f in (tmp_path / "c" / "params").glob("*.safetensors"):
    f.write_bytes(f.read_bytes()[:100])
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="kadiff_jax"):
    _same(load.load_component(d, load.UNET, lambda: unet.init_shapes(CFG), CFG, cache_dir=tmp_path / "c"), first)
  assert "unreadable" in caplog.text and "converted" in caplog.text
  # a changed checkpoint is converted again, never served stale from the cache
  caplog.clear()
  state2 = dict(state)
  state2["conv_in.bias"] = state["conv_in.bias"] + 1
  load.save_component(d, state2, CFG.to_diffusers())
  with caplog.at_level(logging.INFO, logger="kadiff_jax"):
    third = load.load_component(d, load.UNET, lambda: unet.init_shapes(CFG), CFG, cache_dir=tmp_path / "c")
  assert "converted" in caplog.text
  np.testing.assert_allclose(np.asarray(third["conv_in"]["bias"]), state["conv_in.bias"] + 1)


def test_bad_pipeline_folders(tmp_path, tiny_dir):
  broken = tmp_path / "no_vae"
  shutil.copytree(tiny_dir, broken)
  shutil.rmtree(broken / "vae")
  with pytest.raises(files.CheckpointNotFound, match="no subfolder 'vae'"):
    load_models(str(broken))
  odd = tmp_path / "odd_field"
  shutil.copytree(tiny_dir, odd)
  cfg = json.loads((odd / "unet" / "config.json").read_text())
  cfg["class_embed_type"] = "projection"
  (odd / "unet" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="class_embed_type"):
    load_models(str(odd))
  wrong = tmp_path / "wrong_shape"
  shutil.copytree(tiny_dir, wrong)
  st = files.read_safetensors(wrong / "unet" / "diffusion_pytorch_model.safetensors")
  st = {k: np.array(v) for k, v in st.items()}
  st["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
  save_file(st, str(wrong / "unet" / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(convert.WeightsError, match="conv_in.weight"):
    load_models(str(wrong), use_cache=False)
  with pytest.raises(files.CheckpointNotFound, match="neither an existing folder nor a Hub id"):
    load_models(str(tmp_path / "missing" / "x" / "y"))
