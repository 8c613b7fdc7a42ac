"""Pure diffusion schedulers: `from_name(name, diffusers_config)` -> scheduler; `set_timesteps(n)` -> state."""

from kadiff_jax.schedulers.common import SchedulerConfig
from kadiff_jax.schedulers.ddim import DDIM
from kadiff_jax.schedulers.euler import EulerDiscrete
from kadiff_jax.schedulers.euler_ancestral import EulerAncestralDiscrete

SCHEDULERS = {"ddim": DDIM, "euler": EulerDiscrete, "euler_ancestral": EulerAncestralDiscrete}
# diffusers scheduler classes -> our names (a folder's scheduler is the default of its pipeline)
DIFFUSERS_CLASSES = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler_ancestral"}


def from_name(name: str, config: dict | None = None):
  """The scheduler called `name` built from a diffusers scheduler config dict."""
  if name not in SCHEDULERS:
    raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
  return SCHEDULERS[name].from_diffusers(config or {})


def stochastic(scheduler) -> bool:
  """Whether the scheduler adds fresh noise every step (its state then needs per-row keys: `with_keys`)."""
  return isinstance(scheduler, EulerAncestralDiscrete)


__all__ = ["DDIM", "DIFFUSERS_CLASSES", "EulerAncestralDiscrete", "EulerDiscrete", "SCHEDULERS", "SchedulerConfig",
           "from_name", "stochastic"]
