"""`kadiff generate` (text-to-image, IP-Adapter; KA-Diff with --mode) and `kadiff make-tiny-model`."""

from __future__ import annotations

import argparse
import logging

from kadiff_jax import cli_args, config
from kadiff_jax.cli_args import UsageError
from kadiff_jax.kadiff.options import KADiffOptions
from kadiff_jax.pipelines.text_to_image import GenerationOptions
from kadiff_jax.ragturbo.pipeline import RagTurboOptions
from kadiff_jax.sharding import DistributedOptions
from kadiff_jax.weights.options import ModelOptions

log = logging.getLogger("kadiff_jax")
_T2I_ONLY = sorted({f for f in GenerationOptions.__dataclass_fields__} - set(KADiffOptions.__dataclass_fields__))
_KADIFF_ONLY = sorted(set(KADiffOptions.__dataclass_fields__) - set(GenerationOptions.__dataclass_fields__)
                      - {"negative_prompt", "ip_scale"})
_RAG_ONLY = sorted(set(RagTurboOptions.__dataclass_fields__) | {"database"})
RAG_TURBO = "rag-turbo"


def _generate(args) -> None:
  if args.mode != RAG_TURBO:
    given = [k for k in _RAG_ONLY if getattr(args, k) is not None]
    if given:
      raise UsageError(f"{', '.join(given)}: RAG-Turbo options; pass --mode rag-turbo to use them")
  if args.mode == RAG_TURBO:
    given = [k for k in _KADIFF_ONLY if k != "mode" and getattr(args, k) is not None]
    if given:
      raise UsageError(f"{', '.join(given)}: KA-Diff options; --mode rag-turbo takes text-to-image and RAG-Turbo "
                       "options")
    from kadiff_jax.ragturbo.cli import generate_rag_turbo
    return generate_rag_turbo(args)
  if args.mode is not None:
    given = [k for k in _T2I_ONLY if getattr(args, k) is not None]
    if given:
      raise UsageError(f"{', '.join(given)}: text-to-image options; KA-Diff images are square (--size)")
    from kadiff_jax.kadiff.cli import generate_kadiff
    return generate_kadiff(args)
  given = [k for k in _KADIFF_ONLY if getattr(args, k) is not None]
  if given:
    raise UsageError(f"{', '.join(given)}: KA-Diff options; pass --mode kadiff|baseline|masactrl to use them")
  from kadiff_jax.job import Job
  from kadiff_jax.pipelines import text_to_image as t2i
  if args.prompt is None:
    raise UsageError("--prompt is required")
  if args.num_images < 1:
    raise UsageError(f"--num-images {args.num_images}: expected at least 1")
  opts = config.build(GenerationOptions, args)
  model_opts = config.build(ModelOptions, args)
  init = cli_args.read_init_latents(args.init_latents, args.num_images)
  encoder = model_opts.image_encoder or (model_opts.ip_adapter == "tiny")  # the tiny adapter brings its encoder
  if bool(model_opts.ip_adapter) != bool(args.reference) or bool(encoder) != bool(args.reference):
    raise UsageError("--ip-adapter, --image-encoder and --reference go together (got "
                     f"ip_adapter={model_opts.ip_adapter!r}, image_encoder={model_opts.image_encoder!r}, "
                     f"reference={args.reference!r})")
  cli_args.check_image(args.reference)  # a bad reference fails before any model loads
  models = model_opts.load()
  adapter = model_opts.load_adapter(models, required=False)
  jobs = [Job.numbered(args.prompt, args.seed, i, negative_prompt=args.negative_prompt, reference=args.reference,
                       ip_scale=args.ip_scale) for i in range(args.num_images)]
  from kadiff_jax import records
  from kadiff_jax.outputs import OutputDir
  inputs = [t2i.job_inputs(j, models, opts, adapter, None if init is None else init[i]) for i, j in enumerate(jobs)]
  resume = records.plan_resume(OutputDir(args.out), [j.id for j in jobs], inputs, overwrite=args.overwrite)
  if resume.done or resume.redo:
    log.info("%s: %s", args.out, resume.describe())
  todo = [jobs[i] for i in resume.todo]
  cli_args.write_config(args.out, args, model=model_opts, generation=opts)
  if todo:
    t2i.generate(models, todo, opts, args.out, init_latents=None if init is None else init[resume.todo],
                 batch_size=args.batch_size, adapter=adapter,
                 records={j.id: records.record(j.id, inputs[i], prompt=j.prompt, seed=j.seed, index=j.index,
                                               reference=j.reference, outputs={"image": f"{j.id}.png"})
                          for i, j in zip(resume.todo, todo)})
  print(done_line(args.out, len(todo), resume.done, resume.redo))


def done_line(out, ran: int, skipped, redone) -> str:
  """What a generate command did, in one line: written, skipped (already done) and redone."""
  again = f", {len(redone)} of them redone with new inputs" if redone else ""
  return f"wrote {ran} job(s) to {out}{again} ({len(skipped)} already done)"


def _make_tiny(args) -> None:
  from pathlib import Path
  from kadiff_jax import tiny_model
  print(tiny_model.make_tiny_model(args.dir, args.seed, args.family))
  base = Path(args.dir)
  for name, make in tiny_model.TINY_PARTS.items():
    print(make(base.with_name(f"{base.name}-{name}"), args.seed))
  try:
    from retrieval.tiny_mllm import make_tiny_mllm
    print(make_tiny_mllm(base.with_name(f"{base.name}-mllm"), args.seed))
  except ImportError:
    log.warning("no tiny re-ranker written: it needs the rerank extra (pip install 'kadiff-jax[rerank]')")


def add_common(p: argparse.ArgumentParser, *classes, group: str | None = None) -> None:
  """--config, the model and multi-process flags, and flags for `classes` (derived from their fields)."""
  cli_args.add_config_arg(p)
  config.add_options(p, ModelOptions, group="model")
  config.add_options(p, *classes, group=group)
  config.add_options(p, DistributedOptions, group="multi-process")
  p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: up to 8 per run; "
                 "KA-Diff: as many groups of 8 as fit the device)")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--overwrite", action="store_true", help="redo jobs whose outputs in --out were made from other "
                 "inputs (default: refuse, naming them); jobs whose outputs match are always skipped")


def add_parsers(sub) -> None:
  g = sub.add_parser("generate", help="text-to-image on any model family (IP-Adapter with --reference; KA-Diff "
                     "or RAG-Turbo with --mode)")
  g.add_argument("--prompt", default=None)
  g.add_argument("--out", required=True, help="output folder for PNGs (and config.yaml)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--num-images", type=int, default=1)
  g.add_argument("--init-latents", default=None, help=".npy of [num_images, 4, H/8, W/8] float32 (NCHW)")
  g.add_argument("--reference", default=None, help="reference image (IP-Adapter; KA-Diff's concept)")
  add_common(g, GenerationOptions, KADiffOptions, group="generation (KA-Diff's with --mode)")
  mode = next(a for a in g._actions if a.dest == "mode")  # KA-Diff's modes, and RAG-Turbo's
  mode.help = mode.help.replace(" (default:", f", {RAG_TURBO} (one-step generation with retrieved H-space "
                                "features, --database) (default:")
  config.add_options(g, RagTurboOptions, group="RAG-Turbo (with --mode rag-turbo)")
  g.add_argument("--database", default=None, help="--mode rag-turbo: an H-space database (`kadiff hspace build`)")
  k = g.add_argument_group("KA-Diff jobs (with --mode)")
  k.add_argument("--mask", default=None, help="concept mask of the reference (white = concept); 'auto': from the "
                 "reference's cross-attention")
  k.add_argument("--ref-prompt", default=None, help="text describing the reference")
  k.add_argument("--reference-cache", default=None, help="a `kadiff invert` output to use as the reference")
  k.add_argument("--jobs", default=None, help="JSONL or TSV of jobs: id, prompt, reference, mask, ref_prompt, seed")
  k.add_argument("--baseline", action="store_true", help="also write the plain IP-Adapter image from the same "
                 "noise (ID_baseline.png, and in the grid); costs a second pass")
  add_overwrite_arg(g)
  cli_args.leaf(g, ("generate",), _generate)

  t = sub.add_parser("make-tiny-model", help="write a tiny random pipeline of one model family in diffusers "
                     "format to DIR, and "
                     "tiny CLIP, DINO and LLaVA-OneVision models to DIR-clip, DIR-dino, DIR-mllm (what 'tiny' "
                     "names for --clip, --dino and --rerank, which make their own in the cache)")
  t.add_argument("dir")
  t.add_argument("--seed", type=int, default=0)
  from kadiff_jax.tiny_model import TINY_FAMILIES
  t.add_argument("--family", default="sdxl", choices=TINY_FAMILIES, help="the model family (default: sdxl)")
  cli_args.leaf(t, ("make-tiny-model",), _make_tiny)
