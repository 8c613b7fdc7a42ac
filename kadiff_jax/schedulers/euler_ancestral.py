"""Ancestral Euler (Karras et al. 2022's Euler step plus fresh noise): diffusers' EulerAncestralDiscreteScheduler.

The turbo models' scheduler. Each step goes from sigma to sigma_down with
the Euler derivative, then adds noise of scale sigma_up, where

    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),  sigma_down = sqrt(sigma_next^2 - sigma_up^2)

The noise is explicit: `step(..., noise=z)` takes it from the caller, or it
is drawn from per-row keys in the state (`with_keys`), row b at step i from
`fold_in(keys[b], i)`, so a row's noise depends on its own key and the step,
not on how rows are batched. Timesteps, sigmas and input scaling are
EulerDiscrete's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.programs import serializable
from kadiff_jax.schedulers.common import SchedulerConfig, split_config
from kadiff_jax.schedulers.euler import EulerDiscrete, predicted_x0


@serializable
class EulerAncestralState(NamedTuple):
  timesteps: jax.Array         # [S] float timesteps fed to the model
  sigmas: jax.Array            # [S + 1], ending in 0
  keys: jax.Array | None = None  # [B, 2] uint32 per-row PRNG keys for the step noise


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscrete:
  config: SchedulerConfig = SchedulerConfig(steps_offset=1)

  @classmethod
  def from_diffusers(cls, cfg: dict[str, Any]) -> "EulerAncestralDiscrete":
    sc, _ = split_config("EulerAncestralDiscreteScheduler", cfg, {})
    if sc.prediction_type == "sample":
      raise ConfigError("EulerAncestralDiscreteScheduler config field 'prediction_type' = 'sample' is not supported")
    return cls(sc)

  def _euler(self) -> EulerDiscrete:
    return EulerDiscrete(self.config)

  def set_timesteps(self, num_steps: int) -> EulerAncestralState:
    s = self._euler().set_timesteps(num_steps)
    return EulerAncestralState(s.timesteps, s.sigmas)

  @staticmethod
  def with_keys(state: EulerAncestralState, keys) -> EulerAncestralState:
    """The state with per-row keys [B, 2] for the step noise (e.g. one per job, split from its seed)."""
    return state._replace(keys=jnp.asarray(keys, jnp.uint32))

  def init_noise_sigma(self, state: EulerAncestralState) -> jax.Array:
    return self._euler().init_noise_sigma(state)

  def scale_model_input(self, state: EulerAncestralState, i, x):
    return self._euler().scale_model_input(state, i, x)

  def step(self, state: EulerAncestralState, i, x, model_output, noise=None, **_):
    sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
    xf = x.astype(jnp.float32)
    x0 = predicted_x0(self.config.prediction_type, sigma, xf, model_output)
    sigma_up = jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    sigma_down = jnp.sqrt(sigma_next ** 2 - sigma_up ** 2)
    prev = xf + (xf - x0) / sigma * (sigma_down - sigma)
    if noise is None:
      if state.keys is None:
        raise ValueError("EulerAncestralDiscrete.step needs noise= or a state with per-row keys (with_keys)")
      draw = lambda key: jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], jnp.float32)
      noise = jax.vmap(draw)(state.keys)
    return (prev + noise.astype(jnp.float32) * sigma_up).astype(x.dtype)
