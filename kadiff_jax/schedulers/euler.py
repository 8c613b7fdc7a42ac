"""Euler method over Karras sigmas (Karras et al. 2022, Alg. 2 with churn 0): diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.programs import serializable
from kadiff_jax.schedulers.common import SchedulerConfig, split_config


def predicted_x0(prediction_type: str, sigma, x, model_output):
  """The clean sample the model's output implies at noise level sigma (x in the sigma parametrisation)."""
  out = model_output.astype(jnp.float32)
  if prediction_type == "epsilon":
    return x - sigma * out
  return out * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)  # v_prediction


@serializable
class EulerState(NamedTuple):
  timesteps: jax.Array  # [S] float timesteps fed to the model
  sigmas: jax.Array     # [S + 1], ending in 0


@dataclasses.dataclass(frozen=True)
class EulerDiscrete:
  config: SchedulerConfig = SchedulerConfig(steps_offset=1)

  @classmethod
  def from_diffusers(cls, cfg: dict[str, Any]) -> "EulerDiscrete":
    fixed = {"interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
             "use_beta_sigmas": False, "timestep_type": "discrete", "final_sigmas_type": "zero",
             "sigma_min": None, "sigma_max": None}
    sc, own = split_config("EulerDiscreteScheduler", cfg, fixed)
    for k, v in own.items():
      if v != fixed[k]:
        raise ConfigError(f"EulerDiscreteScheduler config field {k!r} = {v!r} is not supported (only {fixed[k]!r})")
    if sc.prediction_type == "sample":
      raise ConfigError("EulerDiscreteScheduler config field 'prediction_type' = 'sample' is not supported")
    return cls(sc)

  def set_timesteps(self, num_steps: int) -> EulerState:
    ac = self.config.alphas_cumprod()
    if self.config.rescale_betas_zero_snr:
      ac[-1] = 2.0 ** -24  # zero SNR would make the first sigma infinite
    ts = self.config.spaced_timesteps(num_steps).astype(np.float32)
    sigmas = ((1 - ac) / ac) ** 0.5
    sigmas = np.interp(ts, np.arange(len(sigmas)), sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return EulerState(jnp.asarray(ts), jnp.asarray(sigmas))

  def init_noise_sigma(self, state: EulerState) -> jax.Array:
    m = jnp.max(state.sigmas)
    return m if self.config.timestep_spacing in ("linspace", "trailing") else jnp.sqrt(m ** 2 + 1)

  def scale_model_input(self, state: EulerState, i, x):
    return x / jnp.sqrt(state.sigmas[i] ** 2 + 1)

  def step(self, state: EulerState, i, x, model_output, **_):
    sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
    xf = x.astype(jnp.float32)
    derivative = (xf - predicted_x0(self.config.prediction_type, sigma, xf, model_output)) / sigma
    return (xf + derivative * (sigma_next - sigma)).astype(x.dtype)
