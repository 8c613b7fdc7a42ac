"""Every model family end to end against diffusers on its tiny model: SD1.5, SD2.1 (v-prediction), SD-Turbo and
SDXL-Turbo text-to-image, SD1.5 IP-Adapter (base and Plus), KA-Diff on SD1.5, and the family errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import max_rel_err, nchw, nhwc
from kadiff_jax import cli
from kadiff_jax.job import Job
from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER_PLUS_SD, make_tiny_model, tiny_ip_adapter
from kadiff_jax.weights.ip_adapter import load_ip_adapter
from kadiff_jax.weights.models import load_models

PROMPTS = ["a photo of a cat", "a dog in the snow"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
  made = {}

  def get(family):
    if family not in made:
      made[family] = make_tiny_model(tmp_path_factory.mktemp("families") / f"tiny-{family}", 0, family)
    return made[family]
  return get


@pytest.fixture(scope="module")
def family_models(family_dir):
  loaded = {}

  def get(family):
    if family not in loaded:
      loaded[family] = load_models(str(family_dir(family)))
    return loaded[family]
  return get


def _torch_pipe(models):
  from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
  cls = StableDiffusionXLPipeline if models.family.text_time else StableDiffusionPipeline
  return cls.from_pretrained(str(models.source))


def _noise(n=2):
  return np.random.default_rng(1).standard_normal((n, 4, 8, 8)).astype(np.float32)


def _same_images(ours, ref_float):
  assert np.abs(ours.astype(int) - (ref_float * 255).round().astype(int)).max() <= 1


@pytest.mark.parametrize("family,label,steps,guidance,scheduler", [
    ("sd15", "SD1.x", 50, 7.5, "ddim"), ("sd21", "SD2.x", 50, 7.5, "ddim"),
    ("sd-turbo", "SD-Turbo", 1, 0.0, "euler_ancestral"), ("sdxl-turbo", "SDXL-Turbo", 1, 0.0, "euler_ancestral"),
    ("sdxl", "SDXL", 50, 5.0, "euler")])
def test_family_and_defaults_come_from_the_folder(family_models, family, label, steps, guidance, scheduler):
  m = family_models(family)
  assert (m.family.name, m.family.label) == (family, label)
  assert (m.text_params_2 is None) == (not family.startswith("sdxl"))
  o = t2i.GenerationOptions().for_model(m)
  assert (o.steps, o.guidance, o.scheduler, o.height, o.width) == (steps, guidance, scheduler, 64, 64)


@pytest.mark.parametrize("family,negative", [("sd15", None), ("sd15", "blurry, lowres"), ("sd21", None)])
def test_sd_text_to_image_matches_stable_diffusion_pipeline(family_models, family, negative):
  """SD1.5 (eps; its PNDM folder runs DDIM on both sides) and SD2.1 (DDIM, v-prediction) at guidance 7.5."""
  from diffusers import DDIMScheduler
  m = family_models(family)
  noise = _noise()
  opts = t2i.GenerationOptions(steps=6)
  jobs = [Job.numbered(p, 0, i, negative_prompt=negative) for i, p in enumerate(PROMPTS)]
  latents, images = t2i.generate(m, jobs, opts, init_latents=nhwc(noise), progress=False)
  pipe = _torch_pipe(m)
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd21" else "epsilon")
  kw = dict(num_inference_steps=6, guidance_scale=7.5, latents=torch.tensor(noise),
            negative_prompt=None if negative is None else [negative] * 2)
  ref = pipe(PROMPTS, output_type="latent", **kw).images.numpy()
  assert max_rel_err(nchw(latents), ref) < 1e-3
  _same_images(images, pipe(PROMPTS, output_type="np", **kw).images)


@pytest.mark.parametrize("family", ["sd-turbo", "sdxl-turbo"])
@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_matches_diffusers_with_the_same_step_noise(family_models, family, steps, monkeypatch):
  """Ancestral Euler over trailing timesteps, guidance 0: diffusers draws each step's noise where we feed it ours
  (from the per-image keys), and no unconditional rows run."""
  import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
  m = family_models(family)
  noise = _noise()
  jobs = [Job.numbered(p, 3, i) for i, p in enumerate(PROMPTS)]
  rows = []
  real = t2i.denoise

  def spy(params, x, cond, *a, **k):
    rows.append(cond.encoder_hidden_states.shape[0])
    return real(params, x, cond, *a, **k)
  monkeypatch.setattr(t2i, "denoise", spy)
  latents, images = t2i.generate(m, jobs, t2i.GenerationOptions(steps=steps), init_latents=nhwc(noise),
                                 progress=False)
  assert rows == [2]  # one row per image: guidance 0 computes no CFG rows
  keys = t2i.step_keys([(j.seed, j.index) for j in jobs])
  draws = [np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), (8, 8, 4)))(keys))
           for i in range(steps)]
  pipe = _torch_pipe(m)
  outs = {}
  for output_type in ("latent", "np"):
    fed = iter(draws)
    monkeypatch.setattr(ea, "randn_tensor", lambda shape, **_: torch.tensor(nchw(next(fed))))
    outs[output_type] = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=0.0, latents=torch.tensor(noise),
                             output_type=output_type).images
    assert next(fed, None) is None  # diffusers drew exactly one noise per step
  assert max_rel_err(nchw(latents), outs["latent"].numpy()) < 1e-3
  _same_images(images, outs["np"])
  # the step noise is part of the result: another seed's keys change it
  other, _ = t2i.generate(m, [Job.numbered(p, 4, i) for i, p in enumerate(PROMPTS)],
                          t2i.GenerationOptions(steps=steps), init_latents=nhwc(noise), progress=False)
  assert (np.abs(other - latents).max() > 1e-3) == (steps > 1)  # one step ends at sigma 0: no noise is added


@pytest.mark.parametrize("weight", ["base", "plus"])
def test_sd15_ip_adapter_matches_diffusers(family_models, family_dir, weight, tmp_path):
  folder = family_dir("sd15")
  name = tiny_ip_adapter("sd15") if weight == "base" else TINY_IP_ADAPTER_PLUS_SD
  m = family_models("sd15")
  adapter = load_ip_adapter(folder / name, folder / TINY_IMAGE_ENCODER, m.unet_config)
  assert adapter.plus == (weight == "plus") and adapter.default_scale == (0.5 if weight == "plus" else 0.6)
  ref_img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 40, 3)).astype(np.uint8))
  ref_img.save(tmp_path / "ref.png")
  noise = _noise()
  jobs = [Job.numbered(p, 0, i, reference=str(tmp_path / "ref.png"), ip_scale=0.7) for i, p in enumerate(PROMPTS)]
  opts = t2i.GenerationOptions(steps=5, scheduler="ddim")
  latents, images = t2i.generate(m, jobs, opts, init_latents=nhwc(noise), progress=False, adapter=adapter)
  from diffusers import DDIMScheduler
  pipe = _torch_pipe(m)
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.load_ip_adapter(str(folder / "ip_adapter"), subfolder="models", weight_name=Path(name).name,
                       image_encoder_folder="image_encoder")
  pipe.set_ip_adapter_scale(0.7)
  kw = dict(ip_adapter_image=ref_img, num_inference_steps=5, latents=torch.tensor(noise))
  ref = pipe(PROMPTS, output_type="latent", **kw).images.numpy()
  assert max_rel_err(nchw(latents), ref) < 1e-3
  _same_images(images, pipe(PROMPTS, output_type="np", **kw).images)
  plain, _ = t2i.generate(m, [Job.numbered(p, 0, i) for i, p in enumerate(PROMPTS)], opts, init_latents=nhwc(noise),
                          progress=False)
  assert np.abs(plain - latents).max() > 1e-2  # the adapter matters


def _reference():
  dogs = sorted((SHARED / "dog").glob("*.jpg")) if SHARED.is_dir() else []
  if not dogs:
    pytest.skip("the DreamBooth data in ../shared is absent")
  return str(dogs[0])


@pytest.mark.slow
def test_kadiff_on_sd15_injects_after_the_start_step_only(family_models, family_dir):
  """The release's sd1.5 defaults (layers 9-16, DIFT from up_blocks.1, base adapter at 0.6); injection off is the
  IP-Adapter baseline, and injection changes the generated image from its start step on."""
  from kadiff_jax.kadiff import generate as G
  from kadiff_jax.kadiff import reference as R
  from kadiff_jax.kadiff.options import KADiffOptions
  m = family_models("sd15")
  folder = family_dir("sd15")
  adapter = load_ip_adapter(folder / tiny_ip_adapter("sd15"), folder / TINY_IMAGE_ENCODER, m.unet_config)
  opts = KADiffOptions(steps=10).for_model(m)
  assert (opts.inject_layers, opts.dift_block, opts.step_range(), opts.size) == ("9-16", "up_blocks.1", (4, 9), 64)
  assert G.injection_resolutions(m.unet_config, 8, opts.layer_selector()) == (2, 4, 8)  # H/32, H/16, H/8
  prepared = R.prepare_reference(m, adapter, _reference(), "a dog", opts)
  assert prepared.features.shape == (10, 4, 4, 64)  # up_blocks.1's output: H/16
  mask = np.zeros((64, 64), bool)
  mask[8:56, 12:52] = True
  item = G.GenerationItem(Job("j", "a dog on the beach", 0, ref_prompt="a dog"), prepared, mask,
                          np.random.default_rng(0).standard_normal((8, 8, 4)).astype(np.float32))
  run = lambda o, mode=None: G.run_jobs(m, adapter, [item], o, mode=mode, record=("trajectory",)).aux["trajectory"]
  base = run(opts, "baseline")
  off = run(KADiffOptions(steps=10, threshold=-np.inf))
  np.testing.assert_allclose(off, base, rtol=0, atol=2e-5 * np.abs(base).max())
  start = 6
  on = run(KADiffOptions(steps=10, inject_steps=(start, 9), threshold=2.0))
  np.testing.assert_allclose(on[:start], base[:start], rtol=0, atol=2e-5 * np.abs(base).max())
  assert np.abs(on[start] - base[start]).max() > 1e-4 and np.abs(on[-1] - base[-1]).max() > 1e-3


@pytest.mark.slow  # ~35 s: invert and generate from the CLI
def test_kadiff_cli_on_sd15_and_the_reference_cache_refuses_another_family(tmp_path, family_dir, capsys):
  ref = _reference()
  cache = tmp_path / "cache"
  common = ["--reference", ref, "--ref-prompt", "a dog", "--steps", "6", "--cache-dir", str(cache)]
  assert cli.main(["invert", "--model", str(family_dir("sd15")), *common, "--out", str(tmp_path / "ref15.npz")]) == 0
  assert cli.main(["generate", "--mode", "kadiff", "--model", str(family_dir("sd15")), *common, "--prompt",
                   "a dog on the beach", "--baseline", "--out", str(tmp_path / "o")]) == 0
  rec = json.loads((tmp_path / "o" / "seed0_0000.json").read_text())
  assert rec["inputs"]["family"] == "sd15" and rec["inputs"]["options"]["inject_layers"] == "9-16"
  ours, base = (np.asarray(Image.open(tmp_path / "o" / n)) for n in ("seed0_0000.png", "seed0_0000_baseline.png"))
  assert ours.shape == (64, 64, 3) and np.abs(ours.astype(int) - base).max() > 0
  capsys.readouterr()
  rc = cli.main(["generate", "--mode", "kadiff", "--model", str(family_dir("sdxl")), "--reference-cache",
                 str(tmp_path / "ref15.npz"), "--prompt", "a dog", "--steps", "6", "--out", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert rc == 2 and "family: cache has 'sd15', this run needs 'sdxl'" in err and "Traceback" not in err


@pytest.mark.slow  # ~70 s: three whole commands
def test_run_evaluate_and_visualize_on_sd15(tmp_path, family_dir, capsys):
  if not SHARED.is_dir():
    pytest.skip("the DreamBooth data in ../shared is absent")
  model = str(family_dir("sd15"))
  idx = tmp_path / "idx"
  assert cli.main(["retrieve", "build", "--corpus", str(SHARED), "--index", str(idx)]) == 0
  queries = tmp_path / "q.jsonl"
  queries.write_text(json.dumps({"id": "chow", "prompt": "a chow chow in the snow", "seed": 1}) + "\n")
  assert cli.main(["run", "--index", str(idx), "--queries", str(queries), "--model", model, "--steps", "3",
                   "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), "--min-score", "0.3"]) == 0
  assert json.loads((tmp_path / "run" / "chow.json").read_text())["inputs"]["family"] == "sd15"
  assert cli.main(["evaluate", "dreambooth", "--data", str(SHARED), "--out", str(tmp_path / "ev"), "--subjects",
                   "dog", "--prompts", "0", "--methods", "kadiff", "--model", model, "--steps", "3", "--clip", "tiny",
                   "--dino", "tiny", "--cache-dir", str(tmp_path / "c")]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["items"] == 1
  assert cli.main(["visualize", "correspondence", "--model", model, "--reference", _reference(), "--prompt",
                   "a dog in the snow", "--ref-prompt", "a dog", "--steps", "6", "--size", "128", "--out",
                   str(tmp_path / "viz"), "--cache-dir", str(tmp_path / "c")]) == 0
  head = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert head["resolution"] in (4, 8, 16)
  assert np.asarray(Image.open(tmp_path / "viz" / "matches.png")).std() > 0


def _edit_json(path: Path, **changes):
  data = json.loads(path.read_text())
  for k, v in changes.items():
    if v is None:
      data.pop(k, None)
    else:
      data[k] = v
  path.write_text(json.dumps(data))


def test_unsupported_folders_and_wrong_adapters_get_one_line(tmp_path, family_dir, capsys):
  def fails(model, *extra):
    capsys.readouterr()
    rc = cli.main(["generate", "--model", str(model), "--prompt", "x", "--steps", "1", "--out",
                   str(tmp_path / "o"), *extra])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("INFO ")]
    assert rc == 2 and len(err) == 1 and err[0].startswith("kadiff: error: "), err
    return err[0]

  sd3 = tmp_path / "sd3"
  sd3.mkdir()
  (sd3 / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"]}))
  assert "pipeline class 'StableDiffusion3Pipeline' with a 'transformer' component is not a UNet" in fails(sd3)
  odd = tmp_path / "odd"
  shutil.copytree(family_dir("sd15"), odd)
  _edit_json(odd / "model_index.json", _class_name="KandinskyPipeline")
  assert "pipeline class 'KandinskyPipeline' is not supported; expected one of" in fails(odd)
  v = tmp_path / "sd21-768"
  shutil.copytree(family_dir("sd21"), v)
  _edit_json(v / "unet" / "config.json", sample_size=96)
  _edit_json(v / "scheduler" / "scheduler_config.json", prediction_type=None)
  assert "has no 'prediction_type', and this is a 768-px SD2.x model" in fails(v)
  _edit_json(v / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
  assert load_models(str(v)).family.name == "sd21"
  xl = family_dir("sdxl")
  err = fails(family_dir("sd15"), "--ip-adapter", str(xl / tiny_ip_adapter("sdxl")), "--image-encoder",
              str(xl / TINY_IMAGE_ENCODER), "--reference", _reference())
  assert "makes 64-wide tokens; the UNet's cross_attention_dim is 32" in err and "another model family" in err


def test_family_detection_errors_directly(tmp_path):
  from kadiff_jax.weights import family
  with pytest.raises(ConfigError, match="in_channels=9: an inpainting or upscaling UNet"):
    family.detect(tmp_path, {"_class_name": "StableDiffusionPipeline", "unet": []}, {"in_channels": 9}, {}, {})
  with pytest.raises(ConfigError, match="addition_embed_type=None; an SDXL UNet has 'text_time'"):
    family.detect(tmp_path, {"_class_name": "StableDiffusionXLPipeline", "unet": []}, {}, {}, {})
  with pytest.raises(ConfigError, match="hidden_act='relu'"):
    family.detect(tmp_path, {"_class_name": "StableDiffusionPipeline", "unet": []}, {}, {"hidden_act": "relu"}, {})
