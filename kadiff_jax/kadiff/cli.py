"""`kadiff generate --mode`, `kadiff invert`, `kadiff run`, `kadiff mask`, `kadiff visualize correspondence`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from kadiff_jax import cli_args, config
from kadiff_jax.cli_args import UsageError
from kadiff_jax.kadiff.options import DEFAULT_PROMPT, KADiffOptions
from kadiff_jax.weights.options import ModelOptions


def _options(args, **fixed) -> KADiffOptions:
  return config.build(KADiffOptions, args, **fixed)


def _pipeline(args, **fixed):
  """(the API's KADiffPipeline, options resolved for its model); bad options fail before loading."""
  from kadiff_jax.pipeline import KADiffPipeline
  options = _options(args, **fixed)
  pipe = KADiffPipeline.from_options(config.build(ModelOptions, args))
  return pipe, pipe.options(options)


def generate_kadiff(args) -> None:
  """`kadiff generate --mode ...`: KA-Diff jobs from --jobs or from one --reference / --reference-cache."""
  from kadiff_jax.job import Job
  from kadiff_jax.kadiff import jobs as kjobs
  from kadiff_jax.kadiff import reference as R
  from kadiff_jax.pipelines.cli import done_line
  options = _options(args)
  if args.jobs:
    if args.reference or args.prompt or args.reference_cache:
      raise UsageError("--jobs replaces --prompt/--reference/--reference-cache/--mask/--ref-prompt; give one or "
                       "the other")
    jobs = kjobs.read_jobs(args.jobs)
  elif args.reference_cache:
    if args.reference or args.ref_prompt:
      raise UsageError("--reference-cache names its reference and ref_prompt; drop --reference/--ref-prompt")
    manifest = R.load_inversion(args.reference_cache).manifest
    jobs = [Job.numbered(args.prompt or DEFAULT_PROMPT, args.seed, i, reference=manifest.get("reference_path"),
                         ref_prompt=manifest.get("ref_prompt", ""), mask=args.mask)
            for i in range(args.num_images)]
  else:
    if not args.reference:
      raise UsageError(f"--mode {options.mode} needs --reference IMG (and --ref-prompt, --mask), "
                       "--reference-cache FILE or --jobs FILE")
    jobs = [Job.numbered(args.prompt or DEFAULT_PROMPT, args.seed, i, reference=args.reference,
                         ref_prompt=args.ref_prompt or "", mask=args.mask) for i in range(args.num_images)]
  for j in jobs:  # bad images fail before any model loads
    if not args.reference_cache:
      cli_args.check_image(j.reference)
    cli_args.check_image(j.mask)
  init = cli_args.read_init_latents(args.init_latents, len(jobs))
  pipe, options = _pipeline(args)
  references = None
  if args.reference_cache:
    prepared = R.from_cache_file(pipe.models, pipe.adapter, args.reference_cache, options)
    references = {(prepared.path, prepared.ref_prompt): prepared}
  cli_args.write_config(args.out, args, model=pipe.model_options, kadiff=options)
  ran = pipe.write_jobs(jobs, args.out, options, baseline=args.baseline, overwrite=args.overwrite,
                        batch_size=args.batch_size, init_latents=init, references=references)
  print(done_line(args.out, ran.ran, ran.skipped, ran.redone))


def _invert(args) -> None:
  cli_args.check_image(args.reference)
  pipe, options = _pipeline(args)
  prepared = pipe.invert(args.reference, args.ref_prompt, options, auto_mask=args.auto_mask)
  print(prepared.inversion.save(args.out))


def _visualize(args) -> None:
  from kadiff_jax.job import Job
  from kadiff_jax.kadiff import figures
  cli_args.check_image(args.reference)
  cli_args.check_image(args.mask)
  if _options(args).mode != "kadiff":
    raise UsageError(f"--mode {args.mode}: visualize correspondence draws KA-Diff's injection (--mode kadiff)")
  pipe, options = _pipeline(args)
  job = Job(f"seed{args.seed}", args.prompt, args.seed, reference=args.reference, ref_prompt=args.ref_prompt,
            mask=args.mask)
  words = config.csv_tuple(args.words) if args.words else None
  cli_args.write_config(args.out, args, model=pipe.model_options, kadiff=options)
  summary = figures.correspondence_figures(pipe.models, pipe.adapter, job, options, args.out,
                                           resolution=args.resolution, step=args.step, words=words,
                                           cache_dir=pipe.reference_cache_dir())
  print(json.dumps({k: summary[k] for k in ("resolution", "step", "mask", "attention_words")}))


def _mask(args) -> None:
  from kadiff_jax import image_io
  from kadiff_jax.job import Job
  from kadiff_jax.kadiff import concept_mask as CM
  from kadiff_jax.kadiff import jobs as kjobs
  from kadiff_jax.kadiff import reference as R
  from kadiff_jax.kadiff import visualize as V
  cli_args.check_image(args.reference)
  cli_args.check_image(args.compare)
  pipe, options = _pipeline(args)
  job = Job("mask", "", reference=args.reference, ref_prompt=args.ref_prompt, mask=kjobs.AUTO_MASK)
  prepared = pipe.invert(args.reference, args.ref_prompt, options, auto_mask=True)
  m, record = kjobs.job_mask(job, prepared, pipe.models.tokenizer, options)
  out = Path(args.out)
  image_io.write_png(out, np.repeat(m[..., None] * np.uint8(255), 3, -1), {"mask": json.dumps(record)})
  from kadiff_jax import plots
  heat = CM.concept_heatmap(prepared.cross_attention, record["token_positions"], options.size)
  image_io.write_png(out.with_name(out.stem + "_heatmap.png"), plots.overlay_figure(
      V.resize_square(np.asarray(prepared.image), options.size), heat, mask=m, colorbar="attention (normalised)",
      title=f"Cross-attention of {', '.join(repr(w) for w in record['words'])}; mask (threshold "
            f"{record.get('threshold', options.mask_threshold)}) outlined"))
  if args.compare:
    truth = R.load_mask(args.compare, options.size, options.mask_padding)
    union = np.logical_or(m, truth).sum()
    record["iou"] = round(float(np.logical_and(m, truth).sum() / union), 6) if union else 1.0
  print(json.dumps(record))


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
    cli_args.check_image(q.mask)
  _options(args)  # bad options fail before the index and models load
  retriever = open_retriever(args, rerank=args.rerank, expand=args.expand)
  pipe, options = _pipeline(args)
  cli_args.write_config(args.out, args, model=pipe.model_options, kadiff=options)
  summary = krun.run(pipe.models, pipe.adapter, retriever, queries, options, args.out, k=args.k,
                     min_score=args.min_score, on_no_match=args.on_no_match, cache_dir=pipe.reference_cache_dir(),
                     baseline=args.baseline, batch_size=args.batch_size, overwrite=args.overwrite)
  for line in summary.pop("decisions"):
    print(line)
  print(json.dumps(summary))


def add_parsers(sub) -> None:
  from kadiff_jax.kadiff import run as run_defaults
  from kadiff_jax.pipelines.cli import add_common, add_overwrite_arg
  from retrieval.cli import add_verify_arg, add_web_args

  inv = sub.add_parser("invert", help="DDIM-invert a reference into a cache file that `generate "
                       "--reference-cache` reads")
  inv.add_argument("--reference", required=True)
  inv.add_argument("--ref-prompt", required=True)
  inv.add_argument("--out", required=True, help="cache file (.npz; the manifest is inside)")
  inv.add_argument("--auto-mask", action="store_true", help="also record the cross-attention maps (for mask auto)")
  add_common(inv, KADiffOptions, group="KA-Diff")
  cli_args.leaf(inv, ("invert",), _invert)

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
  add_verify_arg(r)
  r.add_argument("--min-score", type=float, default=run_defaults.MIN_SCORE, help="best dense score below this is a "
                 "weak match (recorded as weak_match; skipped unless --on-no-match top1); measured with "
                 "`kadiff retrieve calibrate` on the bundled embedder")
  r.add_argument("--on-no-match", choices=["skip", "top1"], default="skip")
  r.add_argument("--seed", type=int, default=0)
  r.add_argument("--mask", default=None, help="concept mask for the chosen reference (white = concept); 'auto': "
                 "from its cross-attention")
  r.add_argument("--baseline", action="store_true", help="also write the plain IP-Adapter image from the same "
                 "noise (costs a second pass)")
  add_common(r, KADiffOptions, group="KA-Diff")
  add_overwrite_arg(r)
  add_web_args(r)
  cli_args.leaf(r, ("run",), _run)

  v = sub.add_parser("visualize", help="pictures of a KA-Diff run (correspondence, distances, attention)")
  vsub = v.add_subparsers(dest="what", required=True)
  vc = vsub.add_parser("correspondence", help="generate one image and draw its matches, distances, injected "
                       "positions and cross-attention")
  vc.add_argument("--reference", required=True)
  vc.add_argument("--prompt", required=True)
  vc.add_argument("--ref-prompt", required=True)
  vc.add_argument("--mask", default=None, help="concept mask of the reference (white = concept); 'auto'")
  vc.add_argument("--out", required=True, help="folder for the PNGs and correspondence.json")
  vc.add_argument("--seed", type=int, default=0)
  vc.add_argument("--resolution", type=int, default=None, help="attention grid to draw (default: the largest)")
  vc.add_argument("--step", type=int, default=None, help="step for matches.png (default: the last injecting one)")
  vc.add_argument("--words", default=None, help="ref_prompt words for the cross-attention overlay "
                  "(default: its content words)")
  add_common(vc, KADiffOptions, group="KA-Diff")
  cli_args.leaf(vc, ("visualize", "correspondence"), _visualize)

  mk = sub.add_parser("mask", help="the automatic concept mask of a reference (from its inversion's cross-attention)")
  mk.add_argument("--reference", required=True)
  mk.add_argument("--ref-prompt", required=True)
  mk.add_argument("--out", required=True, help="mask PNG (white = concept); OUT_heatmap.png shows the map")
  mk.add_argument("--compare", default=None, help="a hand-made mask: print the IoU with it")
  add_common(mk, KADiffOptions, group="KA-Diff")
  cli_args.leaf(mk, ("mask",), _mask)
