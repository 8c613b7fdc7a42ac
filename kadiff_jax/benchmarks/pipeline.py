"""`kadiff benchmark pipeline`: KA-Diff per-phase timings, with diffusers' IP-Adapter pass as reference.

Phases (median of 3 calls after a warm-up call, so compile time is reported apart):
inversion (with the reference's text and image tokens), the KA-Diff injection
pass (3 rows for one image), the plain IP-Adapter pass (2 rows), and VAE decode.
With `--config` it accounts row layouts instead (`benchmarks/rows.py`). The reference figure is diffusers'
StableDiffusionXLPipeline + load_ip_adapter generating from the same folder,
steps and size (needs the `test` extra). Prints one JSON object last.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from PIL import Image


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0


def _median(fn, n=3):
  """(last output, median seconds) over n warm calls."""
  runs = [_timed(fn) for _ in range(n)]
  return runs[-1][0], sorted(t for _, t in runs)[n // 2]


def run(model: str = "tiny", steps: int = 10, inject_layers: str | None = None, ip_adapter=None,
        image_encoder=None, torch_reference: bool = True) -> dict:
  from kadiff_jax import sharding
  from kadiff_jax.job import Job
  from kadiff_jax.kadiff import generate as G
  from kadiff_jax.kadiff import reference as R
  from kadiff_jax.kadiff.options import KADiffOptions
  from kadiff_jax.pipelines import text_to_image as t2i
  from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
  from kadiff_jax.weights.ip_adapter import load_ip_adapter
  from kadiff_jax.weights.models import load_models

  (models, t_load) = _timed(lambda: load_models(model))
  ip_adapter = ip_adapter or models.source / TINY_IP_ADAPTER
  image_encoder = image_encoder or models.source / TINY_IMAGE_ENCODER
  adapter = load_ip_adapter(ip_adapter, image_encoder, models.unet_config)
  opts = KADiffOptions(steps=steps, inject_layers=inject_layers).for_model(models)
  layers = opts.inject_layers
  rng = np.random.default_rng(0)
  ref = Image.fromarray(rng.integers(0, 256, (opts.size, opts.size, 3)).astype(np.uint8))
  out = {"benchmark": "pipeline", "model": str(models.source), "size": opts.size, "steps": steps,
         "inject_layers": layers, "backend": jax.default_backend(), "load_s": round(t_load, 3)}
  placed, placed_adapter = t2i.place_params(models, adapter, sharding.data_mesh())  # as the job runner does
  prepare = lambda: R.prepare_reference(placed, placed_adapter, ref, "a photo", opts).latents
  _, first = _timed(prepare)
  _, t_inv = _median(prepare)
  prepared = R.prepare_reference(placed, placed_adapter, ref, "a photo", opts)
  latent = opts.size // models.vae_scale_factor
  noise = rng.standard_normal((latent, latent, models.unet_config.in_channels)).astype(np.float32)
  item = G.GenerationItem(Job("bench", "a photo in the snow", ref_prompt="a photo"), prepared,
                          np.ones((opts.size, opts.size), bool), noise)
  run_mode = lambda mode: G.run_jobs(placed, placed_adapter, [item], opts, mode=mode).latents
  _, first_k = _timed(lambda: run_mode("kadiff"))
  z, t_kadiff = _median(lambda: run_mode("kadiff"))
  _, first_b = _timed(lambda: run_mode("baseline"))
  _, t_base = _median(lambda: run_mode("baseline"))
  vae_dtype = jax.tree_util.tree_leaves(models.vae_params)[0].dtype
  dec = lambda: t2i.decode(models.vae_params, z, config=models.vae_config, dtype=vae_dtype)
  _timed(dec)
  _, t_dec = _median(dec)
  out.update({"inversion_s": round(t_inv, 3), "kadiff_pass_s": round(t_kadiff - t_dec, 3),
              "baseline_pass_s": round(t_base - t_dec, 3), "decode_s": round(t_dec, 3),
              "first_call_s (compile+run)": {"inversion": round(first, 2), "kadiff": round(first_k, 2),
                                             "baseline": round(first_b, 2)},
              "injection_overhead": round((t_kadiff - t_dec) / max(t_base - t_dec, 1e-9), 3)})
  if torch_reference:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(models.source)).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=0, set_alpha_to_one=False)
    pipe.load_ip_adapter(str(ip_adapter.parent.parent), subfolder=ip_adapter.parent.name,
                         weight_name=ip_adapter.name, image_encoder_folder=str(image_encoder.relative_to(
                             ip_adapter.parent.parent)))
    call = lambda: pipe("a photo in the snow", ip_adapter_image=ref.resize((opts.size // 2,) * 2),
                        num_inference_steps=steps, height=opts.size, width=opts.size, output_type="latent")
    call()
    _, t_ref = _median(call)
    out.update({"diffusers_ip_adapter_pass_s": round(t_ref, 3),
                "baseline_speedup_vs_diffusers": round(t_ref / max(t_base - t_dec, 1e-9), 2),
                "note": "our KA-Diff pass runs 3 UNet rows for one image (uncond_gen, cond_gen, cond_ref), the "
                "baseline 2, as diffusers; --config compares row layouts at several jobs per reference"})
  return out


def main(args) -> None:
  if args.config:
    from kadiff_jax.benchmarks import rows
    ks = tuple(int(k) for k in args.group_sizes.split(","))
    print(json.dumps(rows.run(args.config, ks, args.steps, args.size, args.dtype, args.abstract)))
    return
  print(json.dumps(run(args.model, args.steps, args.inject_layers, args.ip_adapter, args.image_encoder,
                       not args.no_torch)))
