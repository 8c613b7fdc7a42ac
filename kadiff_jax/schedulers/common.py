"""Noise schedule shared by all schedulers (diffusers' betas / alphas_cumprod)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from kadiff_jax.models.config_util import ConfigError

# Fields that belong to other diffusers scheduler classes; a config written for
# one class is routinely reused for another (`DDIMScheduler.from_config(...)`).
_OTHER_CLASS_FIELDS = {
    "interpolation_type", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min",
    "sigma_max", "timestep_type", "final_sigmas_type", "clip_sample", "clip_sample_range", "set_alpha_to_one",
    "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "skip_prk_steps", "variance_type",
    "algorithm_type", "solver_order", "solver_type", "lower_order_final",
    "use_lu_lambdas", "euler_at_final", "lambda_min_clipped", "variance_type", "predict_x0", "solver_p",
    "disable_corrector", "use_flow_sigmas", "flow_shift", "sigma_data", "shift",
}


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """`torch.linspace(start, end, n, dtype=float32)` bit for bit: filled from both ends with fused multiply-add."""
  s32, e32 = np.float32(start), np.float32(end)
  step = np.float32((e32 - s32) / np.float32(max(n - 1, 1)))
  i = np.arange(n, dtype=np.float64)
  head = np.float64(s32) + np.float64(step) * i
  tail = np.float64(e32) - np.float64(step) * (n - 1 - i)
  return np.where(i < n // 2, head, tail).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  trained_betas: tuple[float, ...] | None = None
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  rescale_betas_zero_snr: bool = False

  def alphas_cumprod(self) -> np.ndarray:
    """float32 cumulative products, as diffusers computes them in torch float32.

    With `rescale_betas_zero_snr` (Lin et al. 2024, Alg. 1) sqrt(alphas_cumprod) is shifted and scaled so the
    last timestep has zero SNR and the first keeps its value; the schedulers that divide by the terminal
    level then use 2**-24 there, as diffusers does."""
    n = self.num_train_timesteps
    if self.trained_betas is not None:
      betas = np.asarray(self.trained_betas, np.float32)
    elif self.beta_schedule == "linear":
      betas = torch_linspace_f32(self.beta_start, self.beta_end, n)
    elif self.beta_schedule == "scaled_linear":
      betas = torch_linspace_f32(self.beta_start ** 0.5, self.beta_end ** 0.5, n) ** 2
    elif self.beta_schedule == "squaredcos_cap_v2":
      f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
      betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float32)
    else:
      raise ConfigError(f"scheduler config field 'beta_schedule' = {self.beta_schedule!r} is not supported "
                        "(expected linear, scaled_linear or squaredcos_cap_v2)")
    if self.rescale_betas_zero_snr:
      betas = _zero_terminal_snr(betas)
    # torch's CPU cumprod accumulates float32 in float64; doing the same makes the schedule bit-exact
    return np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)

  def spaced_timesteps(self, num_steps: int) -> np.ndarray:
    """Descending training timesteps for `num_steps` steps (float64, integral for DDIM)."""
    n = self.num_train_timesteps
    if not 1 <= num_steps <= n:
      raise ValueError(f"num_steps={num_steps}: expected 1..{n} (num_train_timesteps)")
    if self.timestep_spacing == "leading":
      return (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.float64) + self.steps_offset
    if self.timestep_spacing == "trailing":
      return np.round(np.arange(n, 0, -n / num_steps)).astype(np.float64) - 1
    if self.timestep_spacing == "linspace":
      return np.linspace(0, n - 1, num_steps)[::-1].copy()
    raise ConfigError(f"scheduler config field 'timestep_spacing' = {self.timestep_spacing!r} is not supported "
                      "(expected leading, trailing or linspace)")


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Betas whose cumulative alpha ends at exactly 0 (diffusers' `rescale_zero_terminal_snr`), in float32."""
  root = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
  first, last = root[0], root[-1]
  root = (root - last) * (first / (first - last))
  bar = root ** 2
  alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
  return (1.0 - alphas).astype(np.float32)


def split_config(cls_name: str, cfg: dict[str, Any], own: dict[str, Any]) -> tuple[SchedulerConfig, dict]:
  """Splits a diffusers scheduler config into the common part and this class's own fields.

  `own` maps this class's fields to their defaults. Fields of other classes
  are ignored (as diffusers' `from_config` does); unknown fields are rejected.
  """
  common_fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
  common, mine = {}, dict(own)
  for k, v in cfg.items():
    if k.startswith("_"):
      continue
    if k in common_fields:
      common[k] = tuple(v) if k == "trained_betas" and v is not None else v
    elif k in own:
      mine[k] = v
    elif k not in _OTHER_CLASS_FIELDS:
      raise ConfigError(f"{cls_name}: scheduler config field {k!r} = {v!r} is not known to kadiff-jax")
  sc = SchedulerConfig(**common)
  if sc.prediction_type not in ("epsilon", "v_prediction", "sample"):
    raise ConfigError(f"scheduler config field 'prediction_type' = {sc.prediction_type!r} is not supported")
  return sc, mine
