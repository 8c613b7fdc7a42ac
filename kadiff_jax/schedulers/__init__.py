"""Pure diffusion schedulers: `make(name, config_dict, num_steps)` -> (scheduler, state)."""

from kadiff_jax.schedulers.common import SchedulerConfig
from kadiff_jax.schedulers.ddim import DDIM
from kadiff_jax.schedulers.euler import EulerDiscrete
from kadiff_jax.schedulers.euler_ancestral import EulerAncestralDiscrete

SCHEDULERS = {"ddim": DDIM, "euler": EulerDiscrete}


def from_name(name: str, config: dict | None = None):
  """The scheduler called `name` built from a diffusers scheduler config dict."""
  if name not in SCHEDULERS:
    raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
  return SCHEDULERS[name].from_diffusers(config or {})


# EulerAncestralDiscrete needs per-job noise keys from its caller, which the pipelines do not pass yet (the
# model-families issue wires it for the turbo models), so it is not one of the selectable SCHEDULERS.
__all__ = ["DDIM", "EulerAncestralDiscrete", "EulerDiscrete", "SCHEDULERS", "SchedulerConfig", "from_name"]
