"""The `kadiff` command: generate, invert, retrieve, make-tiny-model, benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np


class UsageError(ValueError):
  """Bad command-line input."""


def _kadiff_options(args):
  from kadiff_jax.kadiff.options import KADiffOptions
  steps = None
  if args.inject_steps:
    lo, _, hi = args.inject_steps.partition("-")
    try:
      steps = (int(lo), int(hi or lo))
    except ValueError:
      raise UsageError(f"--inject-steps {args.inject_steps!r}: expected START-END, e.g. 19-49") from None
  kw = dict(steps=args.steps, guidance=args.guidance, ip_scale=args.ip_scale, inject_layers=args.inject_layers,
            inject_steps=steps, threshold=args.threshold, use_init_latents=args.use_init_latents,
            mode=getattr(args, "mode", None) or "kadiff", size=args.height,
            mask_words=tuple(w.strip() for w in args.mask_words.split(",") if w.strip()) if args.mask_words else None,
            mask_threshold=_mask_threshold(args.mask_threshold), mask_layers=args.mask_layers)
  if args.negative_prompt is not None:
    kw["negative_prompt"] = args.negative_prompt
  if args.height is not None and args.width not in (None, args.height):
    raise UsageError(f"KA-Diff generates square images: --height {args.height} and --width {args.width} differ")
  return KADiffOptions(**kw)


def _mask_threshold(value: str):
  if value == "otsu":
    return value
  try:
    t = float(value)
  except ValueError:
    t = -1.0
  if not 0.0 <= t <= 1.0:
    raise UsageError(f"--mask-threshold {value!r}: expected 'otsu' or a number in [0, 1]")
  return t


def _check_mask(path):
  from kadiff_jax import image_io
  from kadiff_jax.kadiff.jobs import AUTO_MASK
  if path and path != AUTO_MASK:
    image_io.load_rgb(path)


def _add_mask_args(p, help_mask: str | None) -> None:
  if help_mask:
    p.add_argument("--mask", default=None, help=help_mask + "; 'auto': from the reference's cross-attention")
  p.add_argument("--mask-words", default=None,
                 help="with --mask auto: comma-separated subject words of the ref_prompt (default: its content words)")
  p.add_argument("--mask-threshold", default="otsu", help="with --mask auto: 'otsu' or a fraction in [0, 1]")
  p.add_argument("--mask-layers", default="*", help="with --mask auto: cross-attention layers whose maps are "
                 "averaged (numbers and/or module-path globs; default all)")


def _adapter_for(args, models, cache_dir):
  from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
  from kadiff_jax.weights.ip_adapter import load_ip_adapter
  ip, enc = args.ip_adapter, args.image_encoder
  if ip is None and (models.source / TINY_IP_ADAPTER).is_file():  # the tiny model carries its own adapter
    ip, enc = models.source / TINY_IP_ADAPTER, models.source / TINY_IMAGE_ENCODER
  if ip is None or enc is None:
    raise UsageError("KA-Diff needs an IP-Adapter: pass --ip-adapter FILE and --image-encoder DIR")
  return load_ip_adapter(ip, enc, models.unet_config, cache_dir=cache_dir)


def _kadiff(args) -> None:
  from kadiff_jax.kadiff import jobs as kjobs
  from kadiff_jax.pipelines import text_to_image as t2i
  from kadiff_jax.weights.sdxl import load_sdxl

  options = _kadiff_options(args)
  if args.jobs:
    if args.reference or args.prompt:
      raise UsageError("--jobs replaces --prompt/--reference/--mask/--ref-prompt; give one or the other")
    jobs = kjobs.read_jobs(args.jobs)
  else:
    if not args.reference:
      raise UsageError(f"--mode {args.mode} needs --reference IMG (and --ref-prompt, --mask) or --jobs FILE")
    jobs = [kjobs.Job(f"seed{args.seed}_{i:04d}", args.prompt or "best quality, high quality", args.reference,
                      args.ref_prompt or "", args.mask, args.seed, i) for i in range(args.num_images)]
  from kadiff_jax import image_io
  for j in jobs:  # bad images fail before any model loads
    image_io.load_rgb(j.reference)
    _check_mask(j.mask)
  init = _read_init_latents(args, len(jobs))
  cache_dir = Path(args.cache_dir) if args.cache_dir else None
  models = load_sdxl(args.model, dtype=t2i.compute_dtype(args.dtype), variant=args.variant, cache_dir=cache_dir)
  adapter = _adapter_for(args, models, cache_dir)
  done = kjobs.run(models, adapter, jobs, options, args.out,
                   cache_dir=(cache_dir or _default_cache()) / "references", baseline=not args.no_baseline,
                   batch_size=args.batch_size, init_latents=init)
  print(f"wrote {len(done)} job(s) to {args.out} ({len(jobs) - len(done)} already done)")


def _load_kadiff(args):
  """(models, adapter, options, cache_dir) for the commands built on `_add_kadiff_args`."""
  from kadiff_jax.models import unet
  from kadiff_jax.pipelines import text_to_image as t2i
  from kadiff_jax.weights.sdxl import load_sdxl
  _kadiff_options(args)  # bad options fail before any model loads
  cache_dir = Path(args.cache_dir) if args.cache_dir else None
  models = load_sdxl(args.model, dtype=t2i.compute_dtype(args.dtype), variant=args.variant, cache_dir=cache_dir)
  if args.inject_layers is None:  # SDXL's numbers where they exist, every up-block layer otherwise
    n_self = sum(s.kind == "self" for s in unet.attention_sites(models.unet_config).values())
    args.inject_layers = "44-70" if n_self > 70 else "up_blocks.*"
  options = _kadiff_options(args)
  adapter = _adapter_for(args, models, cache_dir)
  return models, adapter, options, cache_dir or _default_cache()


def _add_kadiff_args(p, mask_help: str | None) -> None:
  """Model, IP-Adapter and KA-Diff options shared by run, visualize, mask and evaluate."""
  p.add_argument("--model", default="tiny", help="SDXL pipeline folder or Hub id ('tiny': the built-in random one)")
  p.add_argument("--ip-adapter", default=None, help="IP-Adapter file (the tiny model carries its own)")
  p.add_argument("--image-encoder", default=None, help="its CLIP image encoder folder")
  p.add_argument("--ip-scale", type=float, default=None)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=5.0)
  p.add_argument("--negative-prompt", default=None)
  p.add_argument("--height", type=int, default=None)
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--mode", choices=["kadiff", "baseline", "masactrl"], default="kadiff")
  p.add_argument("--inject-layers", default=None, help="default: 44-70 (SDXL), up_blocks.* for smaller models")
  p.add_argument("--inject-steps", default=None, help="START-END (0-based, inclusive); default 19-49 of 50, scaled")
  p.add_argument("--threshold", type=float, default=0.7, help="cosine-distance threshold for injection")
  p.add_argument("--use-init-latents", action="store_true")
  p.add_argument("--dtype", default="fp32")
  p.add_argument("--variant", default=None)
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--cache-dir", default=None)
  _add_mask_args(p, mask_help)


def _visualize(args) -> None:
  from kadiff_jax.kadiff import figures
  from kadiff_jax.kadiff import jobs as kjobs
  from kadiff_jax import image_io
  image_io.load_rgb(args.reference)
  _check_mask(args.mask)
  if args.mode != "kadiff":
    raise UsageError(f"--mode {args.mode}: visualize correspondence draws KA-Diff's injection (--mode kadiff)")
  models, adapter, options, cache_dir = _load_kadiff(args)
  job = kjobs.Job(f"seed{args.seed}", args.prompt, args.reference, args.ref_prompt, args.mask, args.seed)
  words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
  summary = figures.correspondence_figures(models, adapter, job, options, args.out, resolution=args.resolution,
                                           step=args.step, words=words, cache_dir=cache_dir / "references")
  print(json.dumps({k: summary[k] for k in ("resolution", "step", "mask", "attention_words")}))


def _mask(args) -> None:
  from kadiff_jax import image_io
  from kadiff_jax.kadiff import concept_mask as CM
  from kadiff_jax.kadiff import jobs as kjobs
  from kadiff_jax.kadiff import reference as R
  from kadiff_jax.kadiff import visualize as V
  image_io.load_rgb(args.reference)
  _check_mask(args.compare)
  models, adapter, options, cache_dir = _load_kadiff(args)
  options = options.for_model(models)
  job = kjobs.Job("mask", "", args.reference, args.ref_prompt, kjobs.AUTO_MASK)
  cache = kjobs.reference_cache(models, adapter, job, options, cache_dir / "references")
  m, record = kjobs.job_mask(job, cache, models.tokenizer, options)
  out = Path(args.out)
  image_io.write_png(out, np.repeat(m[..., None] * np.uint8(255), 3, -1), {"mask": json.dumps(record)})
  heat = CM.concept_heatmap(cache.cross_attention, record["token_positions"], options.size)
  image_io.write_png(out.with_name(out.stem + "_heatmap.png"),
                     V.outline(V.heatmap_overlay(np.asarray(image_io.load_rgb(args.reference)), heat,
                                                 size=options.size), m, (255, 255, 255)))
  if args.compare:
    truth = R.load_mask(args.compare, options.size, options.mask_padding)
    union = np.logical_or(m, truth).sum()
    record["iou"] = round(float(np.logical_and(m, truth).sum() / union), 6) if union else 1.0
  print(json.dumps(record))


def _csv_list(value: str | None, name: str, kind=str):
  if value is None:
    return None
  try:
    return [kind(v.strip()) for v in value.split(",") if v.strip()]
  except ValueError:
    raise UsageError(f"--{name} {value!r}: expected a comma-separated list of {kind.__name__}") from None


def _evaluate(args) -> None:
  from kadiff_jax.evaluation import dreambooth as db
  from kadiff_jax.evaluation import report
  from kadiff_jax.metrics.clip_score import CLIPScorer
  from kadiff_jax.metrics.dino import DINOScorer
  dataset = db.load_dataset(args.data)
  items = db.plan(dataset, _csv_list(args.subjects, "subjects"), _csv_list(args.prompts, "prompts", int),
                  _csv_list(args.seeds, "seeds", int) or [0], args.unique_token, args.reference_index)
  methods = _csv_list(args.methods, "methods")
  if not methods or set(methods) - set(db.METHODS):
    raise UsageError(f"--methods {args.methods!r}: expected a comma-separated subset of {','.join(db.METHODS)}")
  clip, dino = CLIPScorer(args.clip), DINOScorer(args.dino)  # unreadable metric models fail before generating
  mask = None if args.mask in (None, "none") else args.mask
  _check_mask(mask)
  models, adapter, options, _ = _load_kadiff(args)
  generated = db.generate(models, adapter, items, options, args.out, mask=mask, methods=methods,
                          batch_size=args.batch_size)
  rows = db.score(items, args.out, clip, dino, methods)
  paths = report.write_reports(rows, args.out)
  table = report.summary(rows)
  print(report.markdown(rows), end="")
  print(json.dumps({"items": len(items), "generated": generated, **{k: str(v) for k, v in paths.items()},
                    "summary": {m: {k: round(v[0], 6) for k, v in s.items()} for m, s in table.items()}}))


def _run(args) -> None:
  from kadiff_jax.kadiff import run as krun
  from retrieval.cli import open_retriever

  if bool(args.prompt) == bool(args.queries):
    raise UsageError("give a prompt, e.g. kadiff run --index IDX \"a chow chow in the snow\", or --queries FILE")
  if args.queries:
    if args.concept or args.mask not in (None, "auto"):
      raise UsageError("--concept and --mask go into the queries file (fields concept, mask); "
                       "--mask auto applies to queries without a mask")
    queries = krun.read_queries(args.queries)
    if args.mask:
      queries = [q if q.mask else dataclasses.replace(q, mask=args.mask) for q in queries]
  else:
    queries = [krun.Query(f"seed{args.seed}_{krun.slug(args.prompt)}", args.prompt, args.concept or args.prompt,
                          args.seed, args.mask)]
  for q in queries:
    _check_mask(q.mask)
  retriever = open_retriever(args, rerank=args.rerank, expand=args.expand)
  models, adapter, options, cache_dir = _load_kadiff(args)
  summary = krun.run(models, adapter, retriever, queries, options, args.out, k=args.k, min_score=args.min_score,
                     on_no_match=args.on_no_match, cache_dir=cache_dir / "references",
                     baseline=not args.no_baseline, batch_size=args.batch_size)
  print(json.dumps(summary))


def _default_cache():
  from kadiff_jax.weights.load import default_cache_dir
  return default_cache_dir()


def _read_init_latents(args, n):
  if not args.init_latents:
    return None
  init = np.load(args.init_latents)
  if init.ndim != 4 or init.shape[0] != n:
    raise UsageError(f"--init-latents {args.init_latents}: shape {init.shape}, expected "
                     f"[num_images={n}, C, H/8, W/8] (NCHW, float32)")
  return init.astype(np.float32).transpose(0, 2, 3, 1)


def _invert(args) -> None:
  from kadiff_jax.kadiff.options import KADiffOptions
  from kadiff_jax.kadiff.reference import invert_reference
  from kadiff_jax.weights.sdxl import load_sdxl
  cache_dir = Path(args.cache_dir) if args.cache_dir else None
  models = load_sdxl(args.model, cache_dir=cache_dir)
  adapter = _adapter_for(args, models, cache_dir)
  options = KADiffOptions(steps=args.steps, size=args.size, ip_scale=args.ip_scale)
  path = invert_reference(models, adapter, args.reference, args.ref_prompt, options).save(args.out)
  print(path)


def _generate(args) -> None:
  from kadiff_jax.pipelines import text_to_image as t2i
  from kadiff_jax.weights.sdxl import load_sdxl

  if args.mode:
    return _kadiff(args)
  if args.prompt is None:
    raise UsageError("--prompt is required")

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
  init = _read_init_latents(args, args.num_images)
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
  elif args.what == "pipeline":
    from kadiff_jax.benchmarks import pipeline
    pipeline.main(args)
  elif args.what == "index":
    from kadiff_jax.benchmarks import index
    index.main(args)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="kadiff", description="KA-Diff in JAX: knowledge-augmented text-to-image.")
  p.add_argument("-v", "--verbose", action="store_true", help="log which weights path was taken, timings")
  p.add_argument("--coordinator", default=None, help="multi-process run: coordinator HOST:PORT (jax.distributed)")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  sub = p.add_subparsers(dest="command", required=True)

  g = sub.add_parser("generate", help="SDXL text-to-image")
  g.add_argument("--model", default="tiny", help="diffusers SDXL folder, Hub id, or 'tiny' (built on first use)")
  g.add_argument("--prompt", default=None)
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
  k = g.add_argument_group("KA-Diff (with --mode)")
  k.add_argument("--mode", choices=["kadiff", "baseline", "masactrl"], default=None,
                 help="KA-Diff injection, plain IP-Adapter from the same noise, or MasaCtrl-style mutual attention")
  _add_mask_args(k, "concept mask of the reference (white = concept)")
  k.add_argument("--ref-prompt", default=None, help="text describing the reference")
  k.add_argument("--use-init-latents", action="store_true", help="start from the inverted reference inside the mask")
  k.add_argument("--inject-layers", default="44-70", help="self-attention layers: numbers and/or globs")
  k.add_argument("--inject-steps", default=None, help="START-END (0-based, inclusive); default 19-49 of 50, scaled")
  k.add_argument("--threshold", type=float, default=0.7, help="cosine-distance threshold for injection")
  k.add_argument("--jobs", default=None, help="JSONL or TSV of jobs: id, prompt, reference, mask, ref_prompt, seed")
  k.add_argument("--no-baseline", action="store_true", help="skip the IP-Adapter baseline image")
  g.set_defaults(func=_generate)

  inv = sub.add_parser("invert", help="DDIM-invert a reference into a reusable cache (npz + JSON)")
  inv.add_argument("--model", default="tiny")
  inv.add_argument("--reference", required=True)
  inv.add_argument("--ref-prompt", required=True)
  inv.add_argument("--out", required=True, help="cache path (writes OUT.npz and OUT.json)")
  inv.add_argument("--steps", type=int, default=50)
  inv.add_argument("--size", type=int, default=None)
  inv.add_argument("--ip-adapter", default=None)
  inv.add_argument("--image-encoder", default=None)
  inv.add_argument("--ip-scale", type=float, default=None)
  inv.add_argument("--cache-dir", default=None)
  inv.set_defaults(func=_invert)

  from retrieval.cli import add_parser as add_retrieve_parser
  from retrieval.cli import add_web_args
  add_retrieve_parser(sub)

  r = sub.add_parser("run", help="knowledge-augmented generation: retrieve a reference, then KA-Diff")
  r.add_argument("prompt", nargs="?", default=None, help="what to generate, e.g. 'a chow chow in the snow'")
  r.add_argument("--queries", default=None, help="JSONL of {prompt, concept, id, seed, mask} (or one prompt a line)")
  r.add_argument("--concept", default=None, help="what to retrieve (default: the prompt)")
  r.add_argument("--index", required=True, help="retrieval index directory (kadiff retrieve build)")
  r.add_argument("--out", required=True)
  r.add_argument("-k", type=int, default=5, help="candidates retrieved (and re-ranked)")
  r.add_argument("--rerank", default=None, help="MLLM id or folder for re-ranking")
  r.add_argument("--scoring", choices=["logprob", "generate"], default="logprob")
  r.add_argument("--expand", action="store_true", help="web-augment the query before retrieval")
  r.add_argument("--embedder", default=None)
  r.add_argument("--backend", choices=["scann", "exact"], default=None)
  r.add_argument("--min-score", type=float, default=0.2, help="best dense score below this means no good match")
  r.add_argument("--on-no-match", choices=["skip", "top1"], default="skip")
  r.add_argument("--seed", type=int, default=0)
  _add_kadiff_args(r, "concept mask for the chosen reference (white = concept)")
  r.add_argument("--no-baseline", action="store_true")
  add_web_args(r)
  r.set_defaults(func=_run)

  v = sub.add_parser("visualize", help="pictures of a KA-Diff run (correspondence, distances, attention)")
  vsub = v.add_subparsers(dest="what", required=True)
  vc = vsub.add_parser("correspondence", help="generate one image and draw its matches, distances, injected "
                       "positions and cross-attention")
  vc.add_argument("--reference", required=True)
  vc.add_argument("--prompt", required=True)
  vc.add_argument("--ref-prompt", required=True)
  vc.add_argument("--out", required=True, help="folder for the PNGs and correspondence.json")
  vc.add_argument("--seed", type=int, default=0)
  vc.add_argument("--resolution", type=int, default=None, help="attention grid to draw (default: the largest)")
  vc.add_argument("--step", type=int, default=None, help="step for matches.png (default: the last injecting one)")
  vc.add_argument("--words", default=None, help="ref_prompt words for the cross-attention overlay "
                  "(default: its content words)")
  _add_kadiff_args(vc, "concept mask of the reference (white = concept)")
  vc.set_defaults(func=_visualize)

  ev = sub.add_parser("evaluate", help="evaluation runners (CSV, Markdown table, chart)")
  evsub = ev.add_subparsers(dest="what", required=True)
  ed = evsub.add_parser("dreambooth", help="subjects x their 25 prompts x seeds: KA-Diff, IP-Adapter and "
                        "MasaCtrl-style, scored with CLIP-T, CLIP-I and DINO")
  ed.add_argument("--data", required=True, help="DreamBooth-layout folder (subject folders + prompts_and_classes.txt)")
  ed.add_argument("--out", required=True, help="folder for images, caches, CSVs, summary.md and chart.png")
  ed.add_argument("--subjects", default=None, help="comma-separated subject names (default: all)")
  ed.add_argument("--prompts", default=None, help="comma-separated prompt indices 0-24 (default: all)")
  ed.add_argument("--seeds", default="0", help="comma-separated seeds")
  ed.add_argument("--unique-token", default="", help="DreamBooth's {0} (default: none, KA-Diff is training-free)")
  ed.add_argument("--reference-index", type=int, default=0, help="which image of a subject is its reference")
  ed.add_argument("--methods", default="kadiff,baseline,masactrl")
  ed.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIPModel folder or Hub id for CLIP-T/I")
  ed.add_argument("--dino", default="facebook/dino-vits16", help="ViTModel folder or Hub id for DINO")
  _add_kadiff_args(ed, "'auto' (default), 'none', or one mask image for every reference")
  ed.set_defaults(func=_evaluate, mask="auto")

  mk = sub.add_parser("mask", help="the automatic concept mask of a reference (from its inversion's cross-attention)")
  mk.add_argument("--reference", required=True)
  mk.add_argument("--ref-prompt", required=True)
  mk.add_argument("--out", required=True, help="mask PNG (white = concept); OUT_heatmap.png shows the map")
  mk.add_argument("--compare", default=None, help="a hand-made mask: print the IoU with it")
  _add_kadiff_args(mk, None)
  mk.set_defaults(func=_mask, mask=None)

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
  bp = bsub.add_parser("pipeline", help="KA-Diff per-phase timings; diffusers' IP-Adapter pass as reference")
  bp.add_argument("--model", default="tiny")
  bp.add_argument("--steps", type=int, default=10)
  bp.add_argument("--inject-layers", default=None, help="default: 44-70 for SDXL, up_blocks.* otherwise")
  bp.add_argument("--ip-adapter", default=None, type=__import__("pathlib").Path)
  bp.add_argument("--image-encoder", default=None, type=__import__("pathlib").Path)
  bp.add_argument("--no-torch", action="store_true", help="skip the diffusers reference")
  bi = bsub.add_parser("index", help="ScaNN vs exact search on random unit vectors: build, QPS, recall@10")
  bi.add_argument("--sizes", default="1e5,1e6", help="comma-separated corpus sizes")
  bi.add_argument("--dim", type=int, default=384)
  bi.add_argument("--queries", type=int, default=1000)
  bi.add_argument("--data", choices=["uniform", "clustered"], default="uniform",
                  help="random unit vectors (no structure: hardest for ANN) or clustered ones")
  b.set_defaults(func=_benchmark)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
  from kadiff_jax.models.config_util import ConfigError
  from kadiff_jax.weights.convert import WeightsError
  from kadiff_jax.weights.files import CheckpointNotFound
  try:
    if args.coordinator or args.num_processes:
      from kadiff_jax import sharding
      sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    args.func(args)
  except (UsageError, ConfigError, WeightsError, CheckpointNotFound, FileNotFoundError, ValueError) as e:
    print(f"kadiff: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
