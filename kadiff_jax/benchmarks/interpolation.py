"""`kadiff benchmark interpolation`: one interpolation's denoising, batched frames vs the release's calls.

On a UNet config (tiny, mid, sdxl) with random weights and random conditioning, this times the
attention-interpolation pass (`interpolation_denoise`, fused outer, CFG) for `frames` frames in one
batch of (frames x 2) rows, against the release's scheme measured in the same run: one call of
3 frames (6 rows) per middle frame, frames - 2 calls. Compile and first call are reported apart
from the warm median of 3. Prints one JSON object last.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.benchmarks.rows import VAE_FACTOR, _cond, model_inputs
from kadiff_jax.benchmarks.unet import CONFIGS
from kadiff_jax.interpolation.pipeline import frames_layout, interpolation_denoise
from kadiff_jax.weights.options import DTYPES
from kadiff_jax.schedulers import EulerDiscrete, SchedulerConfig


def _run_once(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def run(config: str = "tiny", frames: int = 5, steps: int = 10, size: int | None = None, dtype: str = "fp32") -> dict:
  cfg = CONFIGS[config]()
  dt = DTYPES[dtype]
  latent = (size // VAE_FACTOR) if size else cfg.sample_size
  params, _ = model_inputs(cfg, dt, abstract=False)
  sched = EulerDiscrete(SchedulerConfig(steps_offset=1))
  state = sched.set_timesteps(steps)
  rng = np.random.default_rng(0)

  def program(n):
    layout = frames_layout(n, 5.0)
    noise = jnp.asarray(rng.standard_normal((n, latent, latent, cfg.in_channels)), jnp.float32)
    cond = _cond(cfg, layout.rows, rng, False)
    coefs = jnp.linspace(0.0, 1.0, n)
    return lambda: interpolation_denoise(params, noise, cond, state, jnp.float32(5.0), coefs, jnp.int32(steps // 2),
                                         unet_config=cfg, scheduler=sched, layout=layout, dtype=dt,
                                         variant="fused_outer", interp_uncond=False)

  batched, single = program(frames), program(3)
  first_batched, first_single = _run_once(batched), _run_once(single)
  t_batched = sorted(_run_once(batched) for _ in range(3))[1]
  t_single = sorted(_run_once(single) for _ in range(3))[1]
  calls = frames - 2
  out = {"benchmark": "interpolation", "config": config, "frames": frames, "steps": steps,
         "size": latent * VAE_FACTOR, "dtype": dtype, "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind,
         "batched": {"rows": frames * 2, "compile_and_first_s": round(first_batched, 3), "s": round(t_batched, 4)},
         "release_scheme": {"calls": calls, "rows_per_call": 6, "compile_and_first_s": round(first_single, 3),
                            "s": round(t_single * calls, 4)},
         "speedup": round(t_single * calls / t_batched, 3), "row_ratio": round(calls * 6 / (frames * 2), 3)}
  return out


def main(args) -> None:
  print(json.dumps(run(args.config, args.frames, args.steps, args.size, args.dtype)))
