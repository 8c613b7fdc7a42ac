"""`kadiff benchmark unet`: our UNet step vs diffusers' (torch) on the same config, weights and device.

Both models get the same weights (the torch module's random init, converted).
Prints one JSON object on its last line with both step times and their ratio.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax import sharding
from kadiff_jax.models import unet
from kadiff_jax.weights import convert

CONFIGS = {
    "tiny": unet.tiny_sdxl,
    "mid": lambda: dataclasses.replace(
        unet.tiny_sdxl(), sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=(2, 2, 2),
        transformer_layers_per_block=(1, 2, 4), attention_heads=(2, 4, 8), cross_attention_dim=(256,) * 3,
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + 128, norm_num_groups=32),
    "sdxl": unet.sdxl_base,
}


def _time(fn, iters: int) -> float:
  fn()  # warm-up / compile
  t0 = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters


def run(config: str = "tiny", batch: int = 2, iters: int = 5, dtype: str = "fp32", size: int | None = None,
        torch_dtype: str | None = None) -> dict:
  import torch
  from diffusers import UNet2DConditionModel

  cfg = CONFIGS[config]()
  s = size or cfg.sample_size
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[torch_dtype or dtype]
  jdt = {"fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}[dtype]
  d = cfg.to_diffusers()
  d.pop("_class_name")
  tm = UNet2DConditionModel(**d).eval()
  params = convert.torch_to_params({k: v.float().numpy() for k, v in tm.state_dict().items()},
                                   unet.init_shapes(cfg), component="unet", dtype=np.dtype(jdt))
  tm = tm.to(device=device, dtype=tdt)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, cfg.in_channels, s, s)).astype(np.float32)
  ehs = rng.standard_normal((batch, 77, cfg.cross_attention_dim[0])).astype(np.float32)
  pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
  te = rng.standard_normal((batch, pooled)).astype(np.float32)
  tid = np.tile(np.array([[s * 8, s * 8, 0, 0, s * 8, s * 8]], np.float32), (batch, 1))

  params = jax.device_put(params)
  cond = unet.UNetCond(jnp.asarray(ehs), jnp.asarray(te), jnp.asarray(tid))
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  attention = sharding.attention_implementation(jdt)
  step = jax.jit(lambda p, x_, t_, c_: unet.apply(p, x_, t_, c_, config=cfg, dtype=jdt, implementation=attention)[0])
  ours = _time(lambda: step(params, xj, jnp.float32(500), cond).block_until_ready(), iters)

  tx = lambda a: torch.tensor(a, device=device, dtype=tdt)
  targs = (tx(x), torch.tensor(500.0, device=device), tx(ehs))
  added = {"text_embeds": tx(te), "time_ids": tx(tid)}

  def torch_step():
    with torch.no_grad():
      tm(*targs, added_cond_kwargs=added)
    if device == "cuda":
      torch.cuda.synchronize()

  theirs = _time(torch_step, iters)
  return {"benchmark": "unet", "config": config, "batch": batch, "size": s, "ours_dtype": dtype,
          "torch_dtype": torch_dtype or dtype, "jax_backend": jax.default_backend(), "torch_device": device,
          "attention": attention,
          "ours_step_s": round(ours, 6), "diffusers_step_s": round(theirs, 6),
          "speedup_vs_diffusers": round(theirs / ours, 3)}


def main(args) -> None:
  print(json.dumps(run(args.config, args.batch, args.iters, args.dtype, args.size, args.torch_dtype)))
