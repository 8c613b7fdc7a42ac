"""`kadiff evaluate dreambooth`: generate and score the DreamBooth evaluation (CSV, Markdown, chart)."""

from __future__ import annotations

import json

from kadiff_jax import cli_args, config
from kadiff_jax.cli_args import UsageError
from kadiff_jax.kadiff.options import KADiffOptions
from kadiff_jax.weights.options import ModelOptions


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
