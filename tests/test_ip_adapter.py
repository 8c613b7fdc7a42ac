"""IP-Adapter: CLIP vision encoder, preprocessing, projections, loading, and the pipeline vs diffusers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file
from transformers import CLIPVisionConfig as HFVisionConfig, CLIPVisionModelWithProjection

from conftest import max_rel_err, nchw, nhwc, tiny_ip_pipe
from kadiff_jax import image_io
from kadiff_jax.models import clip_vision, image_proj, ip_adapter, unet
from kadiff_jax.job import Job
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER, random_params
from kadiff_jax.weights import convert, files, load
from kadiff_jax.weights.ip_adapter import CLIP_VISION, adapter_state, load_ip_adapter, read_checkpoint

PROMPTS = ["a photo of a cat", "a dog in the snow"]


def _image(seed, h=48, w=40):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8))


@pytest.fixture(scope="module")
def adapter(tiny_dir, tiny_models):
  return load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config)


@pytest.fixture(scope="module")
def ip_pipe(tiny_dir):
  return tiny_ip_pipe(tiny_dir)


@pytest.mark.parametrize("size", [(48, 40), (30, 90), (32, 32)])
def test_preprocess_equals_clip_image_processor(size):
  from transformers import CLIPImageProcessor
  img = _image(1, *size)
  ref = CLIPImageProcessor(size=32, crop_size=32)(images=img, return_tensors="np").pixel_values[0]
  np.testing.assert_allclose(nchw(clip_vision.preprocess(img, 32)[None])[0], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_vision_matches_transformers(tmp_path, act):
  cfg = dataclasses.replace(clip_vision.tiny(), hidden_act=act)
  d = cfg.to_transformers()
  d.pop("architectures"), d.pop("model_type")
  torch.manual_seed(0)
  tm = CLIPVisionModelWithProjection(HFVisionConfig(**d)).eval()
  tm.save_pretrained(tmp_path)
  params = load.load_component(tmp_path, CLIP_VISION, lambda: clip_vision.init_shapes(cfg), cfg, use_cache=False)
  px = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.tensor(px), output_hidden_states=True)
  out = clip_vision.encode(params, jnp.asarray(nhwc(px)), config=cfg)
  assert len(out.hidden_states) == len(ref.hidden_states)
  for a, b in zip(out.hidden_states, ref.hidden_states):
    assert max_rel_err(a, b.numpy()) < 1e-5
  assert max_rel_err(out.image_embeds, ref.image_embeds.numpy()) < 1e-5


@pytest.mark.parametrize("name,cfg", [("vit-h", clip_vision.vit_h14()), ("vit-bigG", clip_vision.vit_big_g14()),
                                      ("vit-b32", clip_vision.vit_b32()), ("vit-l14", clip_vision.vit_l14())])
def test_full_size_vision_param_shapes(name, cfg):
  d = cfg.to_transformers()
  d.pop("architectures"), d.pop("model_type")
  with torch.device("meta"):
    tm = CLIPVisionModelWithProjection(HFVisionConfig(**d))
  want = {k: tuple(v.shape) for k, v in tm.state_dict().items() if not k.endswith("position_ids")}
  ours = convert.expected_torch_shapes(clip_vision.init_shapes(cfg))
  ours = {(k if k.startswith("visual_projection") else "vision_model." + k): v for k, v in ours.items()}
  assert ours == want


def test_resampler_matches_diffusers(tiny_dir, adapter):
  from diffusers import UNet2DConditionModel
  tm = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
  proj_state, _ = read_checkpoint(tiny_dir / TINY_IP_ADAPTER)
  module = tm._convert_ip_adapter_image_proj_to_diffusers({k: torch.from_numpy(np.array(v))
                                                            for k, v in proj_state.items()}).eval()
  x = np.random.default_rng(2).standard_normal((2, 17, adapter.encoder_config.hidden_size)).astype(np.float32)
  with torch.no_grad():
    ref = module(torch.tensor(x)).numpy()
  ours = image_proj.project(adapter.proj_params, jnp.asarray(x), config=adapter.proj_config)
  assert ours.shape == (2, 4, 64) and max_rel_err(ours, ref) < 1e-5


def test_image_proj_model_matches_diffusers(tiny_dir):
  from diffusers import UNet2DConditionModel
  tm = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
  cfg = image_proj.ImageProjConfig(clip_embeddings_dim=32, cross_attention_dim=64, num_tokens=4)
  params = random_params(image_proj.init_shapes(cfg), 7)
  state = convert.params_to_torch(params)
  assert sorted(state) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]  # the public key names
  module = tm._convert_ip_adapter_image_proj_to_diffusers({k: torch.from_numpy(v) for k, v in state.items()}).eval()
  e = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
  with torch.no_grad():
    ref = module(torch.tensor(e)).numpy()
  assert max_rel_err(image_proj.project(params, jnp.asarray(e), config=cfg), ref) < 1e-5


def test_tiny_sdxl_ip_adapter_plus_matches_diffusers(tiny_models, adapter, ip_pipe, tmp_path):
  ref_img = _image(5)
  ref_img.save(tmp_path / "ref.png")
  noise = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  jobs = [Job.numbered(p, 0, i, reference=str(tmp_path / "ref.png"), ip_scale=0.7) for i, p in enumerate(PROMPTS)]
  latents, _ = t2i.generate(tiny_models, jobs, t2i.GenerationOptions(steps=5), init_latents=nhwc(noise),
                            progress=False, adapter=adapter)
  ip_pipe.set_ip_adapter_scale(0.7)
  ref = ip_pipe(PROMPTS, ip_adapter_image=ref_img, num_inference_steps=5, latents=torch.tensor(noise),
                output_type="latent").images.numpy()
  assert np.abs(nchw(latents) - ref).max() < 1e-3
  # and the adapter matters: without it the result is far away
  plain = ip_pipe  # reuse: scale 0 in diffusers disables the image branch
  plain.set_ip_adapter_scale(0.0)
  ref0 = plain(PROMPTS, ip_adapter_image=ref_img, num_inference_steps=5, latents=torch.tensor(noise),
               output_type="latent").images.numpy()
  assert np.abs(ref0 - ref).max() > 0.1


def test_scale_zero_is_exactly_plain_sdxl(tiny_models, adapter, tmp_path):
  _image(6).save(tmp_path / "r.png")
  noise = nhwc(np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32))
  opts = t2i.GenerationOptions(steps=4)
  with_ip, _ = t2i.generate(tiny_models, [Job.numbered(p, 0, i, reference=str(tmp_path / "r.png"), ip_scale=0.0)
                                          for i, p in enumerate(PROMPTS)], opts, init_latents=noise,
                            progress=False, adapter=adapter)
  plain, _ = t2i.generate(tiny_models, [Job.numbered(p, 0, i) for i, p in enumerate(PROMPTS)], opts,
                          init_latents=noise, progress=False)
  np.testing.assert_array_equal(with_ip, plain)


def test_per_sample_references_and_scales_in_one_batch(tiny_models, adapter, tmp_path):
  for i in range(2):
    _image(10 + i).save(tmp_path / f"r{i}.png")
  noise = nhwc(np.random.default_rng(5).standard_normal((3, 4, 8, 8)).astype(np.float32))
  opts = t2i.GenerationOptions(steps=4)
  jobs = [Job.numbered("a cat", 0, 0, reference=str(tmp_path / "r0.png"), ip_scale=0.5),
          Job.numbered("a cat", 0, 1, reference=str(tmp_path / "r1.png"), ip_scale=0.9),
          Job.numbered("a cat", 0, 2)]
  together, _ = t2i.generate(tiny_models, jobs, opts, init_latents=noise, progress=False, adapter=adapter)
  for i, job in enumerate(jobs):
    alone, _ = t2i.generate(tiny_models, [job], opts, init_latents=noise[i:i + 1], progress=False, adapter=adapter)
    assert np.abs(alone[0] - together[i]).max() / np.abs(alone).max() < 2e-5
  assert np.abs(together[0] - together[1]).max() > 0.05


def test_composes_with_other_hooks(tiny_models, adapter):
  """Adding another hook never disables the IP-Adapter branch (diffusers' processor-replacement pitfall)."""
  cfg = tiny_models.unet_config

  @dataclasses.dataclass(frozen=True)
  class Tap:
    name: str = "tap"
    needs_args = False

    def selects(self, site):
      return site.kind == "cross"

    def __call__(self, call, attend, args):
      out = attend(call.q, call.k, call.v)
      return out, {"out": out}

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  cond = unet.UNetCond(jnp.asarray(rng.standard_normal((2, 77, 64)), jnp.float32), jnp.zeros((2, 32)),
                       jnp.tile(jnp.array([[64.0, 64, 0, 0, 64, 64]]), (2, 1)))
  tokens = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
  args = ip_adapter.hook_inputs(adapter, tokens, jnp.array([1.0, 1.0]))
  ip = ip_adapter.IPAdapterAttention()
  only_ip, _ = unet.apply(tiny_models.unet_params, x, 10, cond, config=cfg, hooks=(ip,), hook_args={"ip_adapter": args})
  plain, _ = unet.apply(tiny_models.unet_params, x, 10, cond, config=cfg)
  for hooks in ((Tap(), ip), (ip, Tap())):
    both, aux = unet.apply(tiny_models.unet_params, x, 10, cond, config=cfg, hooks=hooks,
                           hook_args={"ip_adapter": args})
    np.testing.assert_allclose(np.asarray(both), np.asarray(only_ip), atol=1e-6)
    assert len(aux) == 11
  assert np.abs(np.asarray(only_ip) - np.asarray(plain)).max() > 1e-3


def test_bin_checkpoint_loads_like_safetensors(tmp_path, tiny_dir, tiny_models, adapter):
  proj, layers = read_checkpoint(tiny_dir / TINY_IP_ADAPTER)
  torch.save({"image_proj": {k: torch.from_numpy(np.array(v)) for k, v in proj.items()},
              "ip_adapter": {k: torch.from_numpy(np.array(v)) for k, v in layers.items()}}, tmp_path / "a.bin")
  got = load_ip_adapter(tmp_path / "a.bin", tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config)
  for a, b in zip(jax.tree_util.tree_leaves((got.proj_params, got.layers)),
                  jax.tree_util.tree_leaves((adapter.proj_params, adapter.layers))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layer_count_mismatch_is_refused(tmp_path, tiny_dir, adapter):
  bigger = dataclasses.replace(unet.tiny_sdxl(), transformer_layers_per_block=(1, 2, 2))
  with pytest.raises(convert.WeightsError, match="checkpoint has 11 cross-attention layers.*this UNet has 14"):
    load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, bigger)
  state = adapter_state(adapter, unet.tiny_sdxl())
  state["ip_adapter.1.to_k_ip.weight"] = np.zeros((32, 64), np.float32)
  save_file(state, str(tmp_path / "bad.safetensors"))
  with pytest.raises(convert.WeightsError, match=r"1.to_k_ip.weight has shape \(32, 64\).*needs \(64, 64\)"):
    load_ip_adapter(tmp_path / "bad.safetensors", tiny_dir / TINY_IMAGE_ENCODER, unet.tiny_sdxl())


def test_missing_image_encoder_and_wrong_encoder(tmp_path, tiny_dir):
  with pytest.raises(files.CheckpointNotFound, match="image encoder folder"):
    load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tmp_path / "nope", unet.tiny_sdxl())
  import shutil, json
  enc = tmp_path / "enc"
  shutil.copytree(tiny_dir / TINY_IMAGE_ENCODER, enc)
  cfg = json.loads((enc / "config.json").read_text())
  cfg["hidden_size"] = 48
  (enc / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(convert.WeightsError, match="image features of width 32.*gives 48"):
    load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, enc, unet.tiny_sdxl())


def test_reference_image_modes(tmp_path):
  grey = np.random.default_rng(0).integers(0, 256, (20, 24)).astype(np.uint8)
  Image.fromarray(grey).save(tmp_path / "g.png")
  np.testing.assert_array_equal(np.asarray(image_io.load_rgb(tmp_path / "g.png")), np.repeat(grey[..., None], 3, -1))
  Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit grey, full range
  assert Image.open(tmp_path / "g16.png").mode.startswith("I")
  np.testing.assert_array_equal(np.asarray(image_io.load_rgb(tmp_path / "g16.png"))[..., 0], grey)
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
  Image.fromarray(rgba).save(tmp_path / "a.png")
  out = np.asarray(image_io.load_rgb(tmp_path / "a.png"))
  assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)
  (tmp_path / "x.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="not a readable image"):
    image_io.load_rgb(tmp_path / "x.png")


def test_cli_ip_adapter(tmp_path, tiny_dir, capsys):
  from kadiff_jax import cli
  _image(8).convert("L").save(tmp_path / "ref.png")
  args = ["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--out", str(tmp_path / "o"), "--steps", "3",
          "--ip-adapter", str(tiny_dir / TINY_IP_ADAPTER), "--image-encoder", str(tiny_dir / TINY_IMAGE_ENCODER),
          "--reference", str(tmp_path / "ref.png"), "--ip-scale", "0.8"]
  assert cli.main(args) == 0
  meta = image_io.read_png_metadata(tmp_path / "o" / "seed0_0000.png")
  assert meta["ip_scale"] == "0.8" and meta["reference"].endswith("ref.png")
  assert cli.main(args[:-6] + ["--reference", str(tmp_path / "ref.png")]) == 2
  assert "go together" in capsys.readouterr().err
  # `--ip-adapter tiny` names the tiny model's own adapter and encoder: the same image as the explicit paths
  named = args[:9] + ["--ip-adapter", "tiny", "--reference", str(tmp_path / "ref.png"), "--ip-scale", "0.8"]
  named[named.index("--out") + 1] = str(tmp_path / "named")
  assert cli.main(named) == 0
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "named" / "seed0_0000.png")),
                                np.asarray(Image.open(tmp_path / "o" / "seed0_0000.png")))


def test_image_projection_params_are_cached(tmp_path, tiny_dir, tiny_models, adapter, caplog):
  """The projection's converted params come from the params cache on a second load, equal to the first (converting
  needs its init traced); a changed adapter file is converted again."""
  import logging
  load_twice = [load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config,
                                cache_dir=tmp_path) for _ in range(2)]
  assert len(list((tmp_path / "params").glob("image_proj-*.safetensors"))) == 1
  for a in load_twice:
    for x, y in zip(jax.tree_util.tree_leaves(a.proj_params), jax.tree_util.tree_leaves(adapter.proj_params)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  changed = tmp_path / "changed.safetensors"
  parts = zip(("image_proj", "ip_adapter"), read_checkpoint(tiny_dir / TINY_IP_ADAPTER))
  state = {f"{part}.{k}": v for part, d in parts for k, v in d.items()}
  first = next(k for k in state if k.startswith("image_proj.") and k.endswith("bias"))
  state[first] = state[first] + 1
  save_file(state, str(changed))
  with caplog.at_level(logging.INFO, logger="kadiff_jax"):
    moved = load_ip_adapter(changed, tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config, cache_dir=tmp_path)
  assert "image_proj: converted" in caplog.text
  assert len(list((tmp_path / "params").glob("image_proj-*.safetensors"))) == 2
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree_util.tree_leaves(moved.proj_params), jax.tree_util.tree_leaves(adapter.proj_params)))
