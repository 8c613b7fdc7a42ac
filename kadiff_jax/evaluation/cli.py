"""`kadiff evaluate dreambooth` and `kadiff evaluate interpolation`: generate and score (CSV, Markdown, chart)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kadiff_jax import cli_args, config
from kadiff_jax.cli_args import UsageError
from kadiff_jax.kadiff.options import KADiffOptions
from kadiff_jax.weights.options import ModelOptions

log = logging.getLogger("kadiff_jax")


def _csv_list(value, name: str, kind=str):
  if value is None:
    return None
  if isinstance(value, (list, tuple)):
    value = ",".join(map(str, value))
  try:
    return [kind(v.strip()) for v in str(value).split(",") if v.strip()]
  except ValueError:
    raise UsageError(f"--{name} {value!r}: expected a comma-separated list of {kind.__name__}") from None


def _evaluate(args) -> None:
  from kadiff_jax.evaluation import dreambooth as db
  from kadiff_jax.evaluation import report
  from kadiff_jax.kadiff.cli import _pipeline
  from kadiff_jax.metrics.clip_score import CLIPScorer
  from kadiff_jax.metrics.dino import DINOScorer
  dataset = db.load_dataset(args.data)
  items = db.plan(dataset, _csv_list(args.subjects, "subjects"), _csv_list(args.prompts, "prompts", int),
                  _csv_list(args.seeds, "seeds", int) or [0], args.unique_token, args.reference_index)
  methods = _csv_list(args.methods, "methods")
  if not methods or set(methods) - set(db.METHODS):
    raise UsageError(f"--methods {args.methods!r}: expected a comma-separated subset of {','.join(db.METHODS)}")
  config.build(KADiffOptions, args)  # bad options fail before the metric models load
  from kadiff_jax.metrics.clip_score import DEFAULT_CLIP
  from kadiff_jax.metrics.dino import DEFAULT_DINO
  from kadiff_jax.progress import step
  tiny = config.build(ModelOptions, args).model == "tiny"  # the tiny model is scored by tiny metric models
  args.clip = args.clip or ("tiny" if tiny else DEFAULT_CLIP)
  args.dino = args.dino or ("tiny" if tiny else DEFAULT_DINO)
  with step("loading the metric models: CLIP %s, DINO %s", args.clip, args.dino):
    clip, dino = CLIPScorer(args.clip), DINOScorer(args.dino)  # unreadable metric models fail before generating
  mask = None if args.mask in (None, "none") else args.mask
  cli_args.check_image(mask)
  pipe, options = _pipeline(args)
  cli_args.write_config(args.out, args, model=pipe.model_options, kadiff=options)
  generated = db.generate(pipe.models, pipe.adapter, items, options, args.out, mask=mask, methods=methods,
                          batch_size=args.batch_size, overwrite=args.overwrite)
  rows = db.score(items, args.out, clip, dino, methods)
  paths = report.write_reports(rows, args.out, clip=args.clip, dino=args.dino)
  table = report.summary(rows)
  print(report.markdown(rows, clip=args.clip, dino=args.dino), end="")
  print(json.dumps({"items": len(items), "generated": generated, **{k: str(v) for k, v in paths.items()},
                    "summary": {m: {k: round(v[0], 6) for k, v in s.items()} for m, s in table.items()}}))


def _evaluate_interpolation(args) -> None:
  from kadiff_jax.evaluation import interpolation as ev
  from kadiff_jax.interpolation.cli import _coefficients
  from kadiff_jax.interpolation.pipeline import InterpolationOptions
  from kadiff_jax.metrics import lpips
  from kadiff_jax.metrics.clip_score import DEFAULT_CLIP, CLIPScorer
  from kadiff_jax.progress import step
  try:
    pairs = ev.read_pairs(args.pairs)
  except FileNotFoundError:
    raise UsageError(f"--pairs {args.pairs}: no such file") from None
  methods = _csv_list(args.methods, "methods")
  if not methods or set(methods) - set(ev.METHODS):
    raise UsageError(f"--methods {args.methods!r}: expected a comma-separated subset of {','.join(ev.METHODS)}")
  args.dynamic = False
  coefs = _coefficients(args)
  options = config.build(InterpolationOptions, args)
  model_opts = config.build(ModelOptions, args)
  args.clip = args.clip or ("tiny" if model_opts.model.startswith("tiny") else DEFAULT_CLIP)
  with step("loading the metric models: CLIP %s, LPIPS %s", args.clip, args.lpips_backbone or "none"):
    clip, lpips_params = CLIPScorer(args.clip), lpips.load_named(args.lpips_backbone, args.lpips_lin)
  note = (f"LPIPS: AlexNet `{args.lpips_backbone}`" if lpips_params is not None else
          "no LPIPS weights given (--lpips-backbone/--lpips-lin, or --lpips-backbone tiny): smoothness and "
          "consistency not computed")
  if lpips_params is None:
    log.warning(note)
  models = model_opts.load()
  cli_args.write_config(args.out, args, model=model_opts, interpolation=options)
  rows = ev.run(models, pairs, methods, coefs, options, args.out, clip=clip, lpips_params=lpips_params,
                overwrite=args.overwrite)
  paths = ev.write_reports(rows, args.out, lpips_note=note)
  print((Path(args.out) / "summary.md").read_text(), end="")
  print(json.dumps({"pairs": len(pairs), "rows": len(rows), **paths}))


def _evaluate_rag_turbo(args) -> None:
  from kadiff_jax.evaluation import rag_turbo as ev
  from kadiff_jax.metrics.clip_score import DEFAULT_CLIP, CLIPScorer
  from kadiff_jax.pipelines.text_to_image import GenerationOptions
  from kadiff_jax.progress import step
  from kadiff_jax.ragturbo.database import HSpaceDatabase
  from kadiff_jax.ragturbo.pipeline import RagTurboOptions
  from kadiff_jax.ragturbo.train import read_prompts
  prompts = read_prompts(args.prompts)
  seeds = _csv_list(args.seeds, "seeds", int)
  options = config.build(GenerationOptions, args)
  rag = config.build(RagTurboOptions, args)
  model_opts = config.build(ModelOptions, args)
  args.clip = args.clip or ("tiny" if model_opts.model.startswith("tiny") else DEFAULT_CLIP)
  with step("loading CLIP %s", args.clip):
    clip = CLIPScorer(args.clip)
  models = model_opts.load()
  db = HSpaceDatabase.load(args.database, models)
  db.check_k(rag.k)
  cli_args.write_config(args.out, args, model=model_opts, generation=options, rag_turbo=rag)
  rows = ev.run(models, db, prompts, seeds, options, rag, args.out, clip=clip, adapter=args.hspace_adapter,
                overwrite=args.overwrite)
  summary = ev.write_reports(rows, args.out, clip_name=args.clip)
  print((Path(args.out) / "summary.md").read_text(), end="")
  print(json.dumps({"prompts": len(prompts), "seeds": seeds, "clip": summary}))


def add_parsers(sub) -> None:
  from kadiff_jax.pipelines.cli import add_common, add_overwrite_arg
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
  ed.add_argument("--clip", default=None, help="CLIPModel folder or Hub id for CLIP-T/I, or 'tiny' (a random one, "
                  "offline); default: openai/clip-vit-base-patch32, or tiny with --model tiny")
  ed.add_argument("--dino", default=None, help="ViTModel folder or Hub id for DINO, or 'tiny' (a random one, "
                  "offline); default: facebook/dino-vits16, or tiny with --model tiny")
  ed.add_argument("--mask", default="auto", help="'auto' (default), 'none', or one mask image for every reference")
  add_common(ed, KADiffOptions, group="KA-Diff")
  add_overwrite_arg(ed)
  cli_args.leaf(ed, ("evaluate", "dreambooth"), _evaluate)

  from kadiff_jax.evaluation.interpolation import METHODS
  from kadiff_jax.interpolation.pipeline import InterpolationOptions
  ei = evsub.add_parser("interpolation", help="attention interpolation methods over prompt pairs, scored for "
                        "smoothness, consistency (LPIPS) and CLIP fidelity")
  ei.add_argument("--pairs", required=True, help="JSONL of {prompt_a, prompt_b, guide_prompt?, id?, seed?}, or "
                  "tab-separated lines A<TAB>B[<TAB>guide]")
  ei.add_argument("--out", required=True, help="folder for frames, strips, records, CSVs, summary.md and chart.png")
  ei.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  ei.add_argument("--coefs", default=None, help="middle coefficients, e.g. 0.25,0.5,0.75")
  ei.add_argument("--frames", type=int, default=5, help="frames from the Beta prior when --coefs is not given")
  ei.add_argument("--alpha", type=float, default=1.0, help="Beta prior alpha (default 1: evenly spaced)")
  ei.add_argument("--beta", type=float, default=1.0, help="Beta prior beta (default 1: evenly spaced)")
  ei.add_argument("--clip", default=None, help="CLIPModel for fidelity (default: openai/clip-vit-base-patch32, or "
                  "tiny with a tiny model)")
  ei.add_argument("--lpips-backbone", default=None, help="torchvision AlexNet weights (alexnet-owt-7be5be79.pth), or "
                  "'tiny' (random weights, offline)")
  ei.add_argument("--lpips-lin", default=None, help="the lpips package's weights/v0.1/alex.pth")
  cli_args.add_config_arg(ei)
  config.add_options(ei, ModelOptions, group="model")
  config.add_options(ei, InterpolationOptions, group="interpolation")
  add_overwrite_arg(ei)
  cli_args.leaf(ei, ("evaluate", "interpolation"), _evaluate_interpolation)

  from kadiff_jax.pipelines.text_to_image import GenerationOptions
  from kadiff_jax.ragturbo.pipeline import RagTurboOptions
  er = evsub.add_parser("rag-turbo", help="CLIP score of one-step generations over a prompt file: plain, slerp "
                        "injection and (with --hspace-adapter) the trained adapter")
  er.add_argument("--database", required=True, help="H-space database of the model (`kadiff hspace build`)")
  er.add_argument("--prompts", required=True, help="text file, one prompt a line")
  er.add_argument("--seeds", default="0", help="comma-separated seeds")
  er.add_argument("--hspace-adapter", default=None, help="a trained adapter file: adds the 'adapter' method")
  er.add_argument("--clip", default=None, help="CLIPModel folder or Hub id (the paper: OpenCLIP ViT-bigG-14; "
                  "default openai/clip-vit-base-patch32, or 'tiny' with a tiny model)")
  er.add_argument("--out", required=True, help="folder for images, records, scores.csv, summary.md/json")
  cli_args.add_config_arg(er)
  config.add_options(er, ModelOptions, group="model")
  config.add_options(er, GenerationOptions, group="generation")
  config.add_options(er, RagTurboOptions, group="RAG-Turbo", exclude=("hspace",))
  add_overwrite_arg(er)
  cli_args.leaf(er, ("evaluate", "rag-turbo"), _evaluate_rag_turbo)
