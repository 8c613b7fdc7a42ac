"""Runs our SDXL pipeline and diffusers' on the same folder, prompts and initial latents; prints the gap.

  python scripts/compare_with_diffusers.py --model tiny --steps 10
  python scripts/compare_with_diffusers.py --model stabilityai/stable-diffusion-xl-base-1.0 --height 1024 --width 1024

Needs the `test` extra (torch, diffusers). The last line is one JSON object:
max |latents_ours - latents_diffusers| (and relative to the latents' scale)
and the largest uint8 pixel difference.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="tiny")
  p.add_argument("--prompt", default="a photo of a cat")
  p.add_argument("--negative-prompt", default=None)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--guidance", type=float, default=5.0)
  p.add_argument("--scheduler", default="euler", choices=["euler", "ddim"])
  p.add_argument("--height", type=int, default=None)
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  import torch
  from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

  from kadiff_jax.job import Job
  from kadiff_jax.pipelines import text_to_image as t2i
  from kadiff_jax.weights.models import load_models

  models = load_models(args.model)
  opts = t2i.GenerationOptions(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                               height=args.height, width=args.width)
  h, w = opts.size(models)
  f = models.vae_scale_factor
  noise = np.random.default_rng(args.seed).standard_normal((1, 4, h // f, w // f)).astype(np.float32)
  ours_lat, ours_img = t2i.generate(models, [Job.numbered(args.prompt, args.seed, 0, negative_prompt=args.negative_prompt)], opts,
                                    init_latents=noise.transpose(0, 2, 3, 1), progress=False)
  pipe = StableDiffusionXLPipeline.from_pretrained(str(models.source))
  cls = EulerDiscreteScheduler if args.scheduler == "euler" else DDIMScheduler
  pipe.scheduler = cls.from_config(pipe.scheduler.config)
  kw = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
            guidance_scale=args.guidance, height=h, width=w, latents=torch.tensor(noise))
  ref_lat = pipe(output_type="latent", **kw).images.float().numpy()
  ref_img = (pipe(output_type="np", **kw).images * 255).round().astype(int)
  err = np.abs(ours_lat.transpose(0, 3, 1, 2) - ref_lat).max()
  print(json.dumps({"model": str(models.source), "steps": args.steps, "scheduler": args.scheduler,
                    "latent_max_abs_err": float(err), "latent_rel_err": float(err / np.abs(ref_lat).max()),
                    "image_max_uint8_diff": int(np.abs(ours_img.astype(int) - ref_img).max())}))


if __name__ == "__main__":
  main()
