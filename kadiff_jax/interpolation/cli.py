"""`kadiff interpolate`: AID / PAID frames between two prompts, as PNGs, a captioned strip, a GIF and a record."""

from __future__ import annotations

import io
import json

import numpy as np

from kadiff_jax import cli_args, config
from kadiff_jax.cli_args import UsageError


def _coefficients(args) -> list[float]:
  from kadiff_jax.interpolation import coefficients
  chosen = [name for name, given in (("--coefs", args.coefs), ("--frames", args.frames and not args.dynamic),
                                     ("--dynamic", args.dynamic or None)) if given]
  if len(chosen) > 1:
    raise UsageError(f"{' and '.join(chosen)}: give the coefficients one way")
  if args.coefs is not None:
    try:
      return coefficients.check_coefficients(float(c) for c in args.coefs.split(","))
    except ValueError as e:
      raise UsageError(f"--coefs {args.coefs!r}: {e}") from None
  if args.frames is not None:
    if args.frames < 3:
      raise UsageError(f"--frames {args.frames}: expected at least 3 (A, a middle frame, B)")
    return coefficients.beta_prior(args.frames, 6.0 if args.alpha is None else args.alpha,
                                   3.0 if args.beta is None else args.beta)
  return [0.5]  # interpolate_single's default: one middle at t = 0.5


def strip(images, coefs) -> np.ndarray:
  """The frames side by side with each one's coefficient written under it."""
  from kadiff_jax.image_grid import labelled_row
  return labelled_row([(f"t = {c:.3f}", im) for c, im in zip(coefs, images)], titles_below=True)


def gif_bytes(images, ms_per_frame: int = 400) -> bytes:
  """An endlessly looping GIF of the frames, A to B."""
  from PIL import Image
  frames = [Image.fromarray(im) for im in images]
  buf = io.BytesIO()
  frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
  return buf.getvalue()


def write_frames(out, result, metadata: dict) -> list[str]:
  """Writes frame_NN.png (each with its coefficient in the PNG text), strip.png and interpolation.gif into the
  output folder `out`; returns the frames' names."""
  from kadiff_jax import image_io
  names = [f"frame_{k:02d}.png" for k in range(len(result.images))]
  for name, im, c in zip(names, result.images, result.coefficients):
    out.write_bytes(name, image_io.png_bytes(im, {**metadata, "coefficient": f"{c:.6f}"}))
  out.write_bytes("strip.png", image_io.png_bytes(strip(result.images, result.coefficients)))
  out.write_bytes("interpolation.gif", gif_bytes(result.images))
  return names


def record(models, adapter, opts, result, names: list[str], *, prompt_a, prompt_b, guide_prompt, negative_prompt,
           seed, init_latents, mode, image_a, image_b, **extra) -> dict:
  """interpolation.json: the model, the request, the coefficients, the frames' names, `extra` (exploration,
  selection) and the resolved options."""
  gen = opts.generation(models)
  return {"model": str(models.source), "family": models.family.name, "prompt_a": prompt_a, "prompt_b": prompt_b,
          "guide_prompt": guide_prompt, "negative_prompt": negative_prompt, "seed": seed,
          "init_latents": init_latents, "coefficients": result.coefficients, "mode": mode,
          "ip_adapter": adapter.source if adapter else None, "image_a": image_a, "image_b": image_b,
          "frames": names, "warmup_steps": opts.warmup(), **extra,
          "options": {**config.asdict(opts), "steps": gen.steps, "guidance": gen.guidance,
                      "scheduler": gen.scheduler, "height": gen.height, "width": gen.width}}


def _interpolate(args) -> None:
  from kadiff_jax import image_io
  from kadiff_jax.interpolation.pipeline import Interpolation, InterpolationOptions, interpolate
  from kadiff_jax.outputs import OutputDir
  from kadiff_jax.weights.options import ModelOptions
  coefs = _coefficients(args)
  if args.dynamic and args.exploration < (args.frames or 7):
    raise UsageError(f"--exploration {args.exploration}: expected at least --frames ({args.frames or 7})")
  opts = config.build(InterpolationOptions, args)
  model_opts = config.build(ModelOptions, args)
  init = None
  if args.init_latents:
    init = cli_args.read_init_latents(args.init_latents, 2)
  if args.select and not args.guide_prompt:
    raise UsageError("--select clip picks the frame closest to --guide-prompt; give one")
  scorer = None
  if args.dynamic or args.select:
    from kadiff_jax.metrics.clip_score import CLIPScorer
    scorer = CLIPScorer(args.clip)
  images = {"image_a": args.image_a, "image_b": args.image_b}
  if args.mode == "text" and any(images.values()):
    raise UsageError("--image-a/--image-b need --mode morph or scale-control")
  if args.mode != "text" and not args.image_b:
    raise UsageError(f"--mode {args.mode} needs --image-b (the end frame's image)")
  if args.mode == "scale-control" and args.image_a:
    raise UsageError("--mode scale-control reads --image-b only; --image-a is for morph")
  if args.mode == "morph" and args.guide_prompt:
    raise UsageError("--guide-prompt with --mode morph: morphing interpolates images, a guide prompt would replace "
                     "the middle frames' text; use it with --mode text (PAID)")
  for path in images.values():
    cli_args.check_image(path)  # a bad image fails before any model loads
  models = model_opts.load()
  adapter = model_opts.load_adapter(models, required=True) if args.mode != "text" else None
  pil = {k: image_io.load_rgb(v) if v else None for k, v in images.items()}
  out = OutputDir(args.out)
  run = lambda ts: interpolate(models, args.prompt_a, args.prompt_b, ts, opts, negative_prompt=args.negative_prompt,
                               guide_prompt=args.guide_prompt, seed=args.seed, init_latents=init, mode=args.mode,
                               adapter=adapter, **pil)
  extra = {}
  if args.dynamic:
    from kadiff_jax.interpolation import selection
    frames = args.frames or 7
    found = selection.explore(lambda t: tuple(run([t]).images), scorer.image_embeds, frames=frames,
                              exploration=args.exploration, alpha=3.0 if args.alpha is None else args.alpha,
                              beta=3.0 if args.beta is None else args.beta, uniform=args.uniform)
    result = Interpolation([found.coefficients[i] for i in found.chosen],
                           np.stack([found.images[i] for i in found.chosen]), None)
    extra["explored"] = {"coefficients": found.coefficients, "chosen": found.chosen, "alpha": found.alpha,
                         "beta": found.beta, "clip": args.clip}
  else:
    result = run(coefs)
  names = write_frames(out, result, {"prompt_a": args.prompt_a, "prompt_b": args.prompt_b, "seed": str(args.seed)})
  if args.select:
    middles = list(range(1, len(names) - 1))
    scores = scorer.clip_t([result.images[k] for k in middles], [args.guide_prompt] * len(middles))
    best = middles[int(np.argmax(scores))]
    out.write_bytes("selected.png", image_io.png_bytes(result.images[best]))
    extra["selected"] = {"by": "clip", "frame": names[best], "coefficient": result.coefficients[best],
                         "clip_t": [float(x) for x in scores]}
  rec = record(models, adapter, opts, result, names, prompt_a=args.prompt_a, prompt_b=args.prompt_b,
               guide_prompt=args.guide_prompt, negative_prompt=args.negative_prompt, seed=args.seed,
               init_latents=args.init_latents, mode=args.mode, **images, **extra)
  out.write_text("interpolation.json", json.dumps(rec, indent=1))
  cli_args.write_config(args.out, args, model=model_opts, interpolation=opts)
  print(json.dumps({"out": str(args.out), "frames": len(names), "coefficients": [round(c, 6) for c in
                                                                                result.coefficients]}))


def add_parsers(sub) -> None:
  from kadiff_jax.interpolation.pipeline import InterpolationOptions
  from kadiff_jax.weights.options import ModelOptions
  p = sub.add_parser("interpolate", help="attention interpolation between two prompts (AID; PAID with "
                     "--guide-prompt): frames, a strip, a GIF and interpolation.json")
  p.add_argument("--prompt-a", required=True, help="the start frame's prompt")
  p.add_argument("--prompt-b", required=True, help="the end frame's prompt")
  p.add_argument("--guide-prompt", default=None, help="PAID: the middle frames' prompt")
  p.add_argument("--negative-prompt", default=None, help="default: none (zeros on SDXL, as the release)")
  p.add_argument("--coefs", default=None, help="the middle frames' coefficients, e.g. 0.3,0.6 (default: 0.5)")
  p.add_argument("--frames", type=int, default=None, help="frames in all, endpoints included: coefficients from "
                 "the Beta prior")
  p.add_argument("--alpha", type=float, default=None, help="Beta prior alpha (default: the app's 6 with --frames; "
                 "the initial 3 with --dynamic)")
  p.add_argument("--beta", type=float, default=None, help="Beta prior beta (default: the app's 3 with --frames; the "
                 "initial 3 with --dynamic)")
  p.add_argument("--dynamic", action="store_true", help="choose the coefficients by exploring (spec 5): --frames "
                 "frames (default 7) out of --exploration explored ones, by CLIP image distances")
  p.add_argument("--exploration", type=int, default=16, help="frames explored with --dynamic (one call each)")
  p.add_argument("--uniform", action="store_true", help="--dynamic without the Beta prior: split gaps at midpoints")
  p.add_argument("--select", choices=["clip"], default=None, help="compositional generation: also write "
                 "selected.png, the middle frame with the highest CLIP score to --guide-prompt")
  p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIPModel folder or Hub id for --dynamic "
                 "and --select ('tiny': a random one, offline)")
  p.add_argument("--seed", type=int, default=0, help="z_A and z_B are images 0 and 1 of this seed")
  p.add_argument("--init-latents", default=None, help=".npy of the start and end noises [2, 4, H/8, W/8] (NCHW, "
                 "float32, before init_noise_sigma)")
  from kadiff_jax.interpolation.pipeline import MODES
  p.add_argument("--mode", choices=MODES, default="text", help="text (AID/PAID), morph (between --image-a and "
                 "--image-b with the IP-Adapter) or scale-control (toward --image-b, its scale rising with t)")
  p.add_argument("--image-a", default=None, help="morph: the start frame's image (default: none, the unconditional "
                 "image tokens)")
  p.add_argument("--image-b", default=None, help="morph and scale-control: the end frame's image")
  p.add_argument("--out", required=True)
  cli_args.add_config_arg(p)
  config.add_options(p, ModelOptions, group="model")
  config.add_options(p, InterpolationOptions, group="interpolation")
  cli_args.leaf(p, ("interpolate",), _interpolate)
