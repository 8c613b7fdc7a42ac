"""KA-Diff on the tiny model: inversion, injection semantics, cache, masks, determinism."""

from __future__ import annotations

import glob

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from kadiff_jax import image_io
from kadiff_jax.kadiff import generate as G
from kadiff_jax.kadiff import reference as R
from kadiff_jax.kadiff.options import KADiffOptions, kadiff_scheduler
from kadiff_jax.models import ip_adapter
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
from kadiff_jax.weights.ip_adapter import load_ip_adapter

DREAMBOOTH_DOG = sorted(glob.glob(str(__import__("pathlib").Path(__file__).parents[2] / "shared/data/dreambooth/dog/*")))
OPTS = KADiffOptions(steps=10, inject_layers="up_blocks.*")


@pytest.fixture(scope="module")
def reference_image(tmp_path_factory):
  if DREAMBOOTH_DOG:
    return DREAMBOOTH_DOG[0]
  p = tmp_path_factory.mktemp("ref") / "ref.png"  # shared/ absent: a synthetic stand-in
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80, 3)).astype(np.uint8)).save(p)
  return str(p)


@pytest.fixture(scope="module")
def adapter(tiny_dir, tiny_models):
  return load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config)


@pytest.fixture(scope="module")
def cache(tiny_models, adapter, reference_image):
  return R.invert_reference(tiny_models, adapter, reference_image, "a dog", OPTS)


def _run(models, adapter, cache, reference_image, opts, mode=None, seed=0, trajectory=False):
  mask = np.zeros((1, 64, 64), bool)
  mask[0, 8:56, 16:60] = True
  noise = np.random.default_rng(seed).standard_normal((1, 8, 8, 4)).astype(np.float32)
  job = [G.KADiffJob("a dog in the snow", reference_image, "a dog")]
  return G.run_jobs(models, adapter, job, [cache], [image_io.load_rgb(reference_image)], mask, noise, opts,
                    mode=mode, trajectory_out=trajectory)


def test_inversion_step_matches_spec_formula():
  sched = kadiff_scheduler()
  state = sched.set_timesteps(50)
  ac = sched.config.alphas_cumprod().astype(np.float64)
  rng = np.random.default_rng(0)
  z, eps = rng.standard_normal((2, 1, 4, 4, 4))
  for k, t in enumerate(range(0, 1000, 20)):  # inversion visits t = 0, 20, ..., 980
    i = 49 - k
    assert int(state.timesteps[i]) == t
    prev = t - 20
    a_prev = ac[prev] if prev >= 0 else ac[0]  # set_alpha_to_one=False
    want = np.sqrt(ac[t]) * (z - np.sqrt(1 - a_prev) * eps) / np.sqrt(a_prev) + np.sqrt(1 - ac[t]) * eps
    got = sched.invert_step(state, i, jnp.asarray(z, jnp.float32), jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_cache_layout_and_reconstruction(tiny_models, adapter, cache, reference_image):
  s = OPTS.steps
  assert cache.latents.shape == (s + 1, 8, 8, 4) and cache.features.shape == (s, 4, 4, 64)
  np.testing.assert_array_equal(cache.timesteps, np.arange(900, -1, -100))
  # entry S is z0_ref: the VAE mean of the resized reference, scaled
  from kadiff_jax.models import vae
  z0 = vae.encode(tiny_models.vae_params, jnp.asarray(R.reference_pixels(image_io.load_rgb(reference_image), 64))[None],
                  config=tiny_models.vae_config)
  np.testing.assert_allclose(cache.latents[-1], np.asarray(z0)[0], atol=1e-5)


def _reconstruction_error(models, adapter, reference_image, steps):
  """DDIM from the inverted z_T with the inversion's own conditioning (guidance 1) vs z0_ref."""
  opts = KADiffOptions(steps=steps, inversion_guidance=1.0).for_model(models)
  c = R.invert_reference(models, adapter, reference_image, "a dog", opts)
  cond, ip_args = R.inversion_conditioning(models, adapter, ["a dog"], [image_io.load_rgb(reference_image)], opts)
  sched = kadiff_scheduler()
  rec = t2i.denoise(models.unet_params, jnp.asarray(c.latents[:1]), cond, sched.set_timesteps(steps), jnp.float32(1.0),
                    {"ip_adapter": ip_args}, unet_config=models.unet_config, scheduler=sched, do_cfg=True,
                    hooks=(ip_adapter.IPAdapterAttention(),))
  return np.abs(np.asarray(rec)[0] - c.latents[-1]).max() / np.abs(c.latents[-1]).max()


def test_ref_branch_reconstructs_z0(tiny_models, adapter, reference_image):
  """DDIM inversion is first-order: the replay error shrinks with the step count. Random tiny weights
  make eps rough in t, so it takes more steps than a trained model; at 200 steps it is within 0.5."""
  e50 = _reconstruction_error(tiny_models, adapter, reference_image, 50)
  e200 = _reconstruction_error(tiny_models, adapter, reference_image, 200)
  assert e200 < 0.5 and e200 < e50 / 2, (e50, e200)


def test_injection_off_is_baseline_and_on_changes_only_after_start(tiny_models, adapter, cache, reference_image):
  base = _run(tiny_models, adapter, cache, reference_image, OPTS, mode="baseline", trajectory=True)
  off = _run(tiny_models, adapter, cache, reference_image, KADiffOptions(steps=10, inject_layers="up_blocks.*",
                                                                         threshold=-np.inf), trajectory=True)
  np.testing.assert_array_equal(off[2], base[2])
  nolayers = _run(tiny_models, adapter, cache, reference_image, KADiffOptions(steps=10, inject_layers="999"))
  np.testing.assert_array_equal(nolayers[0], base[0])
  start = 6
  on = _run(tiny_models, adapter, cache, reference_image,
            KADiffOptions(steps=10, inject_layers="up_blocks.*", inject_steps=(start, 9)), trajectory=True)
  np.testing.assert_array_equal(on[2][:start], base[2][:start])  # steps before the start are untouched
  assert np.abs(on[2][start] - base[2][start]).max() > 1e-4
  assert np.abs(on[0] - base[0]).max() > 1e-3
  masa = _run(tiny_models, adapter, cache, reference_image, OPTS, mode="masactrl")
  assert np.abs(masa[0] - base[0]).max() > 1e-3 and np.abs(masa[0] - on[0]).max() > 1e-4


def test_deterministic(tiny_models, adapter, cache, reference_image):
  a = _run(tiny_models, adapter, cache, reference_image, OPTS, seed=3)
  b = _run(tiny_models, adapter, cache, reference_image, OPTS, seed=3)
  np.testing.assert_array_equal(a[1], b[1])


def test_use_init_latents_copies_masked_region(tiny_models, cache):
  noise = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
  mask = np.zeros((1, 64, 64), bool)
  mask[0, :, :32] = True  # left half
  out = G.initial_latents(noise, [cache], mask, True)
  np.testing.assert_array_equal(out[0, :, :4], cache.latents[0][:, :4])
  np.testing.assert_array_equal(out[0, :, 4:], noise[0, :, 4:])
  assert G.initial_latents(noise, [cache], mask, False) is noise


def test_cache_round_trip_and_mismatch(tmp_path, tiny_models, adapter, cache, reference_image):
  path = cache.save(tmp_path / "dog")
  loaded = R.load_cache(path, expected=cache.manifest)
  np.testing.assert_array_equal(loaded.features, cache.features)
  other = dict(cache.manifest, steps=50)
  with pytest.raises(ValueError, match="steps: cache has 10, this run needs 50"):
    R.load_cache(path, expected=other)


def test_mask_loading_quirk_q2(tmp_path):
  Image.fromarray(np.zeros((10, 20), np.uint8)).save(tmp_path / "m.png")  # wide, all background
  fg = R.load_mask(tmp_path / "m.png", 64)  # padding counts as foreground (the reference's quirk)
  assert fg.shape == (64, 64) and fg[0].all() and fg[-1].all() and not fg[32].any()
  bg = R.load_mask(tmp_path / "m.png", 64, padding="background")
  assert not bg.any()


def test_options_validation():
  with pytest.raises(ValueError, match="inversion_uncond='x'"):
    KADiffOptions(inversion_uncond="x")
  with pytest.raises(ValueError, match="inject_steps=.*steps=10"):
    KADiffOptions(steps=10, inject_steps=(5, 10))
  assert KADiffOptions().step_range() == (19, 49) and KADiffOptions(steps=25).step_range() == (10, 24)
