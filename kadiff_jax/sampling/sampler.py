"""The sampler: every scheduler step of every method, as one `lax.scan`.

A method is a denoiser over this loop (k-diffusion's design):

    denoiser(x, t, i, state) -> (eps, state, aux)

x is the scheduler-scaled model input [B, h, w, C] of step index i at
timestep t; `state` is whatever the method carries from step to step (a
pytree, e.g. the previous step's features); `aux` is a dict of per-step
outputs, stacked over steps by the scan. Denoising visits the schedule in
order with `scheduler.step`; inversion (`invert=True`, DDIM inversion, spec 4)
visits it backwards with `scheduler.invert_step`. Everything here is traced:
call it inside a jitted function.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Denoiser = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any, dict]]


def sample(denoiser: Denoiser, scheduler, sched_state, x, state=None, *, invert: bool = False,
           trajectory: bool = False) -> tuple[jax.Array, dict]:
  """Runs every step from x; returns (final x, aux) with aux's values stacked over steps [S, ...].

  With `trajectory`, aux["x"] holds the latent after every step [S, B, ...].
  """
  n = sched_state.timesteps.shape[0]
  if not invert:
    x = x * scheduler.init_noise_sigma(sched_state)

  def body(carry, k):
    x, state = carry
    i = n - 1 - k if invert else k  # inversion climbs from the last (smallest) timestep
    t = sched_state.timesteps[i]
    eps, state, aux = denoiser(scheduler.scale_model_input(sched_state, i, x), t, i, state)
    x = (scheduler.invert_step(sched_state, i, x, eps) if invert else scheduler.step(sched_state, i, x, eps))
    if trajectory:
      aux = {**aux, "x": x}
    return (x, state), aux

  (x, _), aux = jax.lax.scan(body, (x, state), jnp.arange(n))
  return x, aux
