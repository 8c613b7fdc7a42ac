"""Golden final latents of tiny end-to-end runs: text-to-image, inversion, KA-Diff (all modes).

The values in `golden/tiny_runs.npz` were recorded with the code as it stood
before the sampler refactor (commit bb87db4, on 2bbf48e's code), so they pin
behaviour across structural changes. They are our own numbers: parity with
the reference stack is asserted elsewhere (test_pipeline, test_unet, ...);
these only say "nothing moved". `KADIFF_RECORD_GOLDEN=1` rewrites the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import max_rel_err

GOLDEN = Path(__file__).parent / "golden" / "tiny_runs.npz"
TOL = 2e-5  # max |ours - golden| / max |golden|: float rounding only (XLA may fuse a restructured loop differently)


def _reference(tmp: Path) -> str:
  rng = np.random.default_rng(7)
  yy, xx = np.mgrid[0:96, 0:80]
  img = np.stack([yy * 2, xx * 3, (yy + xx)], -1) % 256 + rng.integers(0, 40, (96, 80, 3))
  path = tmp / "ref.png"
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
  return str(path)


def _mask(tmp: Path) -> str:
  m = np.zeros((40, 60), np.uint8)
  m[5:35, 10:50] = 255
  path = tmp / "mask.png"
  Image.fromarray(m).save(path)
  return str(path)


def runs(tiny_dir: Path, tmp: Path) -> dict[str, np.ndarray]:
  """Every golden run's final latents (and the inversion's outputs), by name."""
  from kadiff_jax.job import Job
  from kadiff_jax.kadiff import generate as G
  from kadiff_jax.kadiff import reference as R
  from kadiff_jax.kadiff.options import KADiffOptions
  from kadiff_jax.pipelines import text_to_image as t2i
  from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
  from kadiff_jax.weights.ip_adapter import load_ip_adapter
  from kadiff_jax.weights.models import load_models

  ref, mask = _reference(tmp), _mask(tmp)
  models = load_models(str(tiny_dir))
  adapter = load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, models.unet_config)
  out = {}
  jobs = [Job.numbered("a cat", 0, 0), Job.numbered("a dog", 1, 0, negative_prompt="blurry")]
  out["t2i_euler"], _ = t2i.generate(models, jobs, t2i.GenerationOptions(steps=4), progress=False)
  ip_jobs = [Job.numbered("a cat", 0, 0, reference=ref, ip_scale=0.7),
             Job.numbered("a dog", 1, 0, negative_prompt="blurry")]
  out["t2i_ddim_ip"], _ = t2i.generate(models, ip_jobs, t2i.GenerationOptions(steps=4, scheduler="ddim"),
                                       progress=False, adapter=adapter)
  opts = KADiffOptions(steps=6, inject_layers="up_blocks.*")
  prepared = R.prepare_reference(models, adapter, ref, "a photo of a thing", opts, auto_mask=True)
  out["inversion_latents"], out["inversion_features"] = prepared.latents, prepared.features
  out["inversion_cross_attention"] = prepared.cross_attention
  m = R.load_mask(mask, 64)
  gen = [Job("a", "a thing in the snow", 0, reference=ref, ref_prompt="a photo of a thing"),
         Job("b", "a red thing", 1, reference=ref, ref_prompt="a photo of a thing")]
  items = [G.GenerationItem(j, prepared, mk, np.asarray(t2i.initial_noise(j.seed, [0], (8, 8, 4)))[0])
           for j, mk in zip(gen, (m, np.ones_like(m)))]
  for mode in ("kadiff", "masactrl", "baseline"):
    out[f"{mode}"] = G.run_jobs(models, adapter, items, opts, mode=mode).latents
  init_opts = KADiffOptions(steps=6, inject_layers="up_blocks.*", use_init_latents=True, threshold=0.9,
                            inject_steps=(2, 4))
  out["kadiff_init_latents"] = G.run_jobs(models, adapter, items, init_opts).latents
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


@pytest.fixture(scope="module")
def current(tiny_dir, tmp_path_factory):
  return runs(tiny_dir, tmp_path_factory.mktemp("golden"))


def test_golden_latents(current):
  if os.environ.get("KADIFF_RECORD_GOLDEN"):
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez(GOLDEN, **current)
  golden = np.load(GOLDEN)
  assert sorted(golden.files) == sorted(current), (sorted(golden.files), sorted(current))
  for name in golden.files:
    assert current[name].shape == golden[name].shape, name
    assert max_rel_err(current[name], golden[name]) < TOL, (name, max_rel_err(current[name], golden[name]))
