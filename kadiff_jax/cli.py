"""The `kadiff` command: generate, make-tiny-model, benchmark."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np


class UsageError(ValueError):
  """Bad command-line input."""


def _generate(args) -> None:
  from kadiff_jax.pipelines import text_to_image as t2i
  from kadiff_jax.weights.sdxl import load_sdxl

  if args.num_images < 1:
    raise UsageError(f"--num-images {args.num_images}: expected at least 1")
  from kadiff_jax import schedulers
  if args.steps < 1:
    raise UsageError(f"--steps {args.steps}: expected at least 1")
  opts = t2i.GenerationOptions(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                               height=args.height, width=args.width, dtype=args.dtype)
  dtype = t2i.compute_dtype(args.dtype)  # fail on bad names before loading anything
  schedulers.from_name(args.scheduler)
  for name in ("height", "width"):
    v = getattr(args, name)
    if v is not None and (v <= 0 or v % 8):
      raise UsageError(f"--{name} {v}: expected a positive multiple of 8")
  init = None
  if args.init_latents:
    init = np.load(args.init_latents)
    if init.ndim != 4 or init.shape[0] != args.num_images:
      raise UsageError(f"--init-latents {args.init_latents}: shape {init.shape}, expected "
                       f"[num_images={args.num_images}, C, H/8, W/8] (NCHW, float32)")
    init = init.astype(np.float32).transpose(0, 2, 3, 1)
  if bool(args.ip_adapter) != bool(args.image_encoder) or bool(args.ip_adapter) != bool(args.reference):
    raise UsageError("--ip-adapter, --image-encoder and --reference go together (got "
                     f"ip_adapter={args.ip_adapter!r}, image_encoder={args.image_encoder!r}, "
                     f"reference={args.reference!r})")
  if args.reference:
    from kadiff_jax import image_io
    image_io.load_rgb(args.reference)  # a bad reference fails before any model loads
  cache_dir = Path(args.cache_dir) if args.cache_dir else None
  models = load_sdxl(args.model, dtype=dtype, variant=args.variant, cache_dir=cache_dir)
  adapter = None
  if args.ip_adapter:
    from kadiff_jax.weights.ip_adapter import load_ip_adapter
    adapter = load_ip_adapter(args.ip_adapter, args.image_encoder, models.unet_config, cache_dir=cache_dir)
  jobs = [t2i.ImageJob(args.prompt, args.negative_prompt, args.seed, i, args.reference, args.ip_scale)
          for i in range(args.num_images)]
  t2i.generate(models, jobs, opts, args.out, init_latents=init, batch_size=args.batch_size, adapter=adapter)
  print(f"wrote {len(jobs)} image(s) to {args.out}")


def _make_tiny(args) -> None:
  from kadiff_jax.tiny_model import make_tiny_model
  print(make_tiny_model(args.dir, args.seed))


def _benchmark(args) -> None:
  if args.what == "unet":
    from kadiff_jax.benchmarks import unet
    unet.main(args)
  elif args.what == "correspondence":
    from kadiff_jax.benchmarks import correspondence
    correspondence.main(args)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="kadiff", description="KA-Diff in JAX: knowledge-augmented text-to-image.")
  p.add_argument("-v", "--verbose", action="store_true", help="log which weights path was taken, timings")
  sub = p.add_subparsers(dest="command", required=True)

  g = sub.add_parser("generate", help="SDXL text-to-image")
  g.add_argument("--model", default="tiny", help="diffusers SDXL folder, Hub id, or 'tiny' (built on first use)")
  g.add_argument("--prompt", required=True)
  g.add_argument("--negative-prompt", default=None)
  g.add_argument("--out", required=True, help="output folder for PNGs")
  g.add_argument("--steps", type=int, default=50)
  g.add_argument("--guidance", type=float, default=5.0)
  g.add_argument("--scheduler", default="euler", help="euler (SDXL default) or ddim")
  g.add_argument("--height", type=int, default=None)
  g.add_argument("--width", type=int, default=None)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--num-images", type=int, default=1)
  g.add_argument("--batch-size", type=int, default=None, help="images per device batch (default: all, up to 8)")
  g.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 for the UNet and text encoders")
  g.add_argument("--variant", default=None, help="weight file variant, e.g. fp16")
  g.add_argument("--init-latents", default=None, help=".npy of [num_images, 4, H/8, W/8] float32 (NCHW)")
  g.add_argument("--cache-dir", default=None, help="where converted params and the tiny model are cached")
  g.add_argument("--ip-adapter", default=None, help="IP-Adapter file (.safetensors or .bin), Plus or base")
  g.add_argument("--image-encoder", default=None, help="its CLIP image encoder folder (CLIPVisionModelWithProjection)")
  g.add_argument("--reference", default=None, help="reference image for the IP-Adapter")
  g.add_argument("--ip-scale", type=float, default=None, help="IP-Adapter scale (default 0.5 Plus, 0.6 base)")
  g.set_defaults(func=_generate)

  t = sub.add_parser("make-tiny-model", help="write a tiny random SDXL pipeline in diffusers format")
  t.add_argument("dir")
  t.add_argument("--seed", type=int, default=0)
  t.set_defaults(func=_make_tiny)

  b = sub.add_parser("benchmark", help="timings vs the PyTorch reference; JSON on the last line")
  bsub = b.add_subparsers(dest="what", required=True)
  bu = bsub.add_parser("unet", help="one UNet step, ours vs diffusers")
  bu.add_argument("--config", default="tiny", choices=["tiny", "mid", "sdxl"])
  bu.add_argument("--batch", type=int, default=2)
  bu.add_argument("--iters", type=int, default=5)
  bu.add_argument("--size", type=int, default=None, help="latent size (default: the config's sample_size)")
  bu.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
  bu.add_argument("--torch-dtype", default=None, choices=["fp32", "bf16", "fp16"])
  bc = bsub.add_parser("correspondence", help="spec 6.3 correspondence, ours vs the reference's per-source loop")
  bc.add_argument("--iters", type=int, default=5)
  b.set_defaults(func=_benchmark)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
  from kadiff_jax.models.config_util import ConfigError
  from kadiff_jax.weights.convert import WeightsError
  from kadiff_jax.weights.files import CheckpointNotFound
  try:
    args.func(args)
  except (UsageError, ConfigError, WeightsError, CheckpointNotFound, FileNotFoundError, ValueError) as e:
    print(f"kadiff: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
