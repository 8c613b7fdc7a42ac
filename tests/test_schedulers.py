"""DDIM, EulerDiscrete and EulerAncestralDiscrete: timesteps and every step vs diffusers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from kadiff_jax import schedulers
from kadiff_jax.models.config_util import ConfigError

KADIFF_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                   set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading")
SDXL_EULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  timestep_spacing="leading")

CASES = [
    ("ddim", DDIMScheduler, KADIFF_DDIM, 50),
    ("ddim", DDIMScheduler, {**KADIFF_DDIM, "steps_offset": 1, "set_alpha_to_one": True}, 7),
    ("ddim", DDIMScheduler, {**KADIFF_DDIM, "timestep_spacing": "trailing"}, 10),
    ("ddim", DDIMScheduler, {**KADIFF_DDIM, "timestep_spacing": "linspace"}, 9),
    ("ddim", DDIMScheduler, {**KADIFF_DDIM, "prediction_type": "v_prediction", "clip_sample": True}, 6),
    ("ddim", DDIMScheduler, {**KADIFF_DDIM, "prediction_type": "sample", "beta_schedule": "linear"}, 6),
    ("ddim", DDIMScheduler, {**KADIFF_DDIM, "beta_schedule": "squaredcos_cap_v2"}, 6),
    ("euler", EulerDiscreteScheduler, SDXL_EULER, 30),
    ("euler", EulerDiscreteScheduler, {**SDXL_EULER, "timestep_spacing": "trailing"}, 8),
    ("euler", EulerDiscreteScheduler, {**SDXL_EULER, "timestep_spacing": "linspace",
                                       "prediction_type": "v_prediction"}, 8),
    # zero terminal SNR (Lin et al.): v-prediction over trailing timesteps, as such models are configured
    ("ddim", DDIMScheduler, {**KADIFF_DDIM, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                             "prediction_type": "v_prediction"}, 8),
    ("euler", EulerDiscreteScheduler, {**SDXL_EULER, "rescale_betas_zero_snr": True,
                                       "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 8),
]


@pytest.mark.parametrize("name,cls,cfg,steps", CASES)
def test_scheduler_matches_diffusers_step_by_step(name, cls, cfg, steps):
  ref = cls(**cfg)
  ref.set_timesteps(steps)
  sched = schedulers.from_name(name, dict(ref.config))
  state = sched.set_timesteps(steps)
  np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
  assert float(sched.init_noise_sigma(state)) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
  rng = np.random.default_rng(steps)
  x = (rng.standard_normal((1, 4, 8, 8)) * float(ref.init_noise_sigma)).astype(np.float32)
  ours = jnp.asarray(x)  # our own trajectory, never reset
  largest = 1.0  # the trajectory's largest magnitude: what its float32 rounding is relative to
  for i, t in enumerate(ref.timesteps):
    out = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(sched.scale_model_input(state, i, jnp.asarray(x))),
                               ref.scale_model_input(torch.tensor(x), t).numpy(), rtol=1e-6, atol=1e-7)
    step_ours = np.asarray(sched.step(state, i, jnp.asarray(x), jnp.asarray(out)))  # same input as torch
    ours = sched.step(state, i, ours, jnp.asarray(out))
    # float32 rounding is relative to the step's input too: a zero-SNR first step maps |x| ~ 1e4 to ~ 10
    scale = max(1.0, np.abs(x).max())
    x = ref.step(torch.tensor(out), t, torch.tensor(x)).prev_sample.numpy()
    scale = max(scale, np.abs(x).max())
    largest = max(largest, scale)
    assert np.abs(step_ours - x).max() / scale < 1e-6, (i, int(t))
  assert np.abs(np.asarray(ours) - x).max() / largest < 1e-5


def test_alphas_cumprod_bit_exact():
  ref = DDIMScheduler(**KADIFF_DDIM).alphas_cumprod.numpy()
  np.testing.assert_array_equal(schedulers.DDIM().config.alphas_cumprod(), ref)
  zero = DDIMScheduler(**KADIFF_DDIM, rescale_betas_zero_snr=True).alphas_cumprod.numpy()
  ours = schedulers.DDIM.from_diffusers({**KADIFF_DDIM, "rescale_betas_zero_snr": True}).config.alphas_cumprod()
  assert ours[-1] == zero[-1] == 0.0 and ours[0] == pytest.approx(float(ref[0]), rel=1e-6)
  np.testing.assert_allclose(ours, zero, rtol=1e-5, atol=1e-9)


def test_unknown_scheduler_and_fields():
  with pytest.raises(ValueError, match="unknown scheduler 'dpm'"):
    schedulers.from_name("dpm")
  with pytest.raises(ConfigError, match="use_karras_sigmas"):
    schedulers.from_name("euler", {**SDXL_EULER, "use_karras_sigmas": True})
  with pytest.raises(ConfigError, match="thresholding"):
    schedulers.from_name("ddim", {**KADIFF_DDIM, "thresholding": True})
  with pytest.raises(ConfigError, match="not_a_field"):
    schedulers.from_name("ddim", {"not_a_field": 1})
  # an SDXL Euler config is reusable for DDIM, as with diffusers' from_config
  sdxl = {"_class_name": "EulerDiscreteScheduler", **SDXL_EULER, "interpolation_type": "linear",
          "use_karras_sigmas": False, "skip_prk_steps": True, "sample_max_value": 1.0}
  assert schedulers.from_name("ddim", sdxl).config.steps_offset == 1


TURBO = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
         "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "trailing"}  # sd-turbo's scheduler


@pytest.mark.parametrize("cfg,steps", [(TURBO, 1), (TURBO, 4), ({**TURBO, "timestep_spacing": "leading"}, 10),
                                       ({**TURBO, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
                                        6),
                                       ({**TURBO, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
                                        4)])
def test_euler_ancestral_matches_diffusers_step_by_step(cfg, steps):
  """The ancestral step with the same noise diffusers draws from its generator (passed explicitly to ours)."""
  from diffusers import EulerAncestralDiscreteScheduler
  from kadiff_jax.schedulers.euler_ancestral import EulerAncestralDiscrete
  ref = EulerAncestralDiscreteScheduler(**cfg)
  ref.set_timesteps(steps)
  sched = EulerAncestralDiscrete.from_diffusers(dict(ref.config))
  state = sched.set_timesteps(steps)
  np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
  np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6)  # within an ulp
  assert float(sched.init_noise_sigma(state)) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
  rng = np.random.default_rng(steps)
  x = (rng.standard_normal((2, 4, 8, 8)) * float(ref.init_noise_sigma)).astype(np.float32)
  theirs, ours_noise = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
  for i, t in enumerate(ref.timesteps):
    out = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(sched.scale_model_input(state, i, jnp.asarray(x))),
                               ref.scale_model_input(torch.tensor(x), t).numpy(), rtol=1e-6, atol=1e-7)
    z = torch.randn(x.shape, generator=ours_noise, dtype=torch.float32).numpy()  # what diffusers draws next
    step_ours = np.asarray(sched.step(state, i, jnp.asarray(x), jnp.asarray(out), noise=jnp.asarray(z)))
    scale = max(1.0, np.abs(x).max())  # rounding relative to the step's input and output (zero SNR: |x| ~ 1e4)
    x = ref.step(torch.tensor(out), t, torch.tensor(x), generator=theirs).prev_sample.numpy()
    assert np.abs(step_ours - x).max() / max(scale, np.abs(x).max()) < 1e-6, (i, float(t))


def test_euler_ancestral_noise_is_per_row_and_explicit():
  """Keyed noise: row b at step i depends on keys[b] and i only, so batching does not change a row."""
  import jax
  from kadiff_jax.schedulers.euler_ancestral import EulerAncestralDiscrete
  sched = EulerAncestralDiscrete.from_diffusers(TURBO)
  state = sched.set_timesteps(4)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jnp.ones((3, 8, 8, 4)) * 2.0
  out = jnp.zeros_like(x)
  both = sched.step(sched.with_keys(state, keys), 1, x, out)
  alone = sched.step(sched.with_keys(state, keys[1:2]), 1, x[1:2], out[1:2])
  np.testing.assert_array_equal(np.asarray(both[1:2]), np.asarray(alone))
  assert not np.allclose(np.asarray(both[0]), np.asarray(both[1]))  # different keys, different noise
  assert not np.allclose(np.asarray(sched.step(sched.with_keys(state, keys), 2, x, out)), np.asarray(both))
  with pytest.raises(ValueError, match="needs noise= or a state with per-row keys"):
    sched.step(state, 0, x, out)
