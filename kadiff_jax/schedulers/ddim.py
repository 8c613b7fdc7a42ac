"""DDIM (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler computes it."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.programs import serializable
from kadiff_jax.schedulers.common import SchedulerConfig, split_config


@serializable
class DDIMState(NamedTuple):
  timesteps: jax.Array   # [S] descending training timesteps
  alpha_t: jax.Array     # [S] alphas_cumprod[t]
  alpha_prev: jax.Array  # [S] alphas_cumprod[t - N/S], or the final alpha when that is < 0


@dataclasses.dataclass(frozen=True)
class DDIM:
  config: SchedulerConfig = SchedulerConfig()
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = False

  @classmethod
  def from_diffusers(cls, cfg: dict[str, Any]) -> "DDIM":
    sc, own = split_config("DDIMScheduler", cfg, {"clip_sample": True, "clip_sample_range": 1.0,
                                                  "set_alpha_to_one": True, "thresholding": False})
    if own.pop("thresholding"):
      raise ConfigError("DDIMScheduler config field 'thresholding' = True is not supported")
    return cls(sc, **own)

  def set_timesteps(self, num_steps: int) -> DDIMState:
    ac = self.config.alphas_cumprod()
    ts = np.round(self.config.spaced_timesteps(num_steps)).astype(np.int64)  # DDIM rounds linspace spacing
    prev = ts - self.config.num_train_timesteps // num_steps
    final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
    alpha_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
    return DDIMState(jnp.asarray(ts, jnp.int32), jnp.asarray(ac[ts]), jnp.asarray(alpha_prev))

  def init_noise_sigma(self, state: DDIMState) -> jax.Array:
    return jnp.float32(1.0)

  def scale_model_input(self, state: DDIMState, i, x):
    return x

  def predict_x0_eps(self, alpha, x, model_output):
    """(x0, eps) implied by the model output at cumulative alpha `alpha`."""
    if self.config.prediction_type == "epsilon":
      eps = model_output
      x0 = (x - jnp.sqrt(1 - alpha) * eps) / jnp.sqrt(alpha)
    elif self.config.prediction_type == "sample":
      x0 = model_output
      eps = (x - jnp.sqrt(alpha) * x0) / jnp.sqrt(1 - alpha)
    else:  # v_prediction
      x0 = jnp.sqrt(alpha) * x - jnp.sqrt(1 - alpha) * model_output
      eps = jnp.sqrt(alpha) * model_output + jnp.sqrt(1 - alpha) * x
    if self.clip_sample:
      x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
    return x0, eps

  def step(self, state: DDIMState, i, x, model_output, *, eta: float = 0.0, key=None):
    """x_{t-1} from x_t and the model output at step index `i`."""
    a_t, a_prev = state.alpha_t[i], state.alpha_prev[i]
    xf = x.astype(jnp.float32)
    x0, eps = self.predict_x0_eps(a_t, xf, model_output.astype(jnp.float32))
    std = 0.0
    if eta:
      variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
      std = eta * jnp.sqrt(variance)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std ** 2) * eps
    if eta:
      if key is None:
        raise ValueError("DDIM with eta > 0 needs a PRNG key")
      prev = prev + std * jax.random.normal(key, x.shape, jnp.float32)
    return prev.astype(x.dtype)

  def invert_step(self, state: DDIMState, i, z, eps):
    """One DDIM inversion step (spec 4): from the level of alpha_prev[i] up to alpha_t[i].

    x0 = (z - sqrt(1 - a_prev) eps) / sqrt(a_prev);  z' = sqrt(a_t) x0 + sqrt(1 - a_t) eps.
    Inversion visits the schedule backwards: i = S-1 (t = 0) first.
    """
    a_t, a_prev = state.alpha_t[i], state.alpha_prev[i]
    x0 = (z - jnp.sqrt(1 - a_prev) * eps) / jnp.sqrt(a_prev)
    return jnp.sqrt(a_t) * x0 + jnp.sqrt(1 - a_t) * eps
