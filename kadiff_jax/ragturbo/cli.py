"""`kadiff hspace build|upsert|delete|query` (the H-space database) and `kadiff generate --mode rag-turbo`."""

from __future__ import annotations

import json
import logging

from kadiff_jax import cli_args, config
from kadiff_jax.cli_args import UsageError

log = logging.getLogger("kadiff_jax")


def _models(args):
  from kadiff_jax.weights.options import ModelOptions
  return config.build(ModelOptions, args).load()


def _read_corpus(path: str, skip_invalid: bool):
  from retrieval.cli import _read_entries
  return _read_entries(path, skip_invalid)


def _entries(args):
  return _read_corpus(args.corpus, args.skip_invalid)


def _build(args) -> None:
  from retrieval import store
  from kadiff_jax.ragturbo import database
  store.check_destination(args.database, database.FORMAT, database.WHAT)  # before any work
  entries = _entries(args)
  models = _models(args)
  db = database.HSpaceDatabase.build(entries, models, cache=args.cache, text_key=args.text_key, size=args.size,
                                     batch_size=args.batch_size, backend=args.backend,
                                     image_cache_dir=args.image_cache, progress=True)
  db.save(args.database)
  print(f"wrote H-space database {args.database}: {len(db)} entries, cache {db.cache} "
        f"{tuple(db.features.shape[1:])}, text key {db.text_key}, model {models.source}")


def _open(args, models):
  from kadiff_jax.ragturbo import database
  return database.HSpaceDatabase.load(args.database, models, verify=not args.no_verify)


def _upsert(args) -> None:
  models = _models(args)
  db = _open(args, models)
  entries = _entries(args)
  db.upsert(entries, models, batch_size=args.batch_size, image_cache_dir=args.image_cache)
  db.save(args.database)
  print(f"{args.database}: upserted {len(entries)} entries; {len(db)} in all")


def _delete(args) -> None:
  models = _models(args)
  db = _open(args, models)
  db.delete(args.ids)
  db.save(args.database)
  print(f"{args.database}: deleted {len(args.ids)} entries; {len(db)} left")


def _query(args) -> None:
  from kadiff_jax.ragturbo import pipeline
  models = _models(args)
  db = _open(args, models)
  found = pipeline.retrieve(models, db, [args.text], args.k)[0]
  if args.json:
    print(json.dumps({"query": args.text, "neighbours": [n.to_json() for n in found]}))
    return
  for rank, n in enumerate(found, 1):
    print(f"{rank}. {n.id}  λ={n.score:.4f}  {n.caption}")


def _evaluate(args) -> None:
  """Top-1 / top-k accuracy of the database's search on {query, id} pairs; JSON on the last line."""
  from kadiff_jax.ragturbo import pipeline
  from retrieval.cli import _read_queries
  queries = _read_queries(args.queries)
  models = _models(args)
  db = _open(args, models)
  found = pipeline.retrieve(models, db, [q["query"] for q in queries], args.k)
  top1 = sum(row[0].id == q["id"] for row, q in zip(found, queries)) / len(queries)
  topk = sum(any(n.id == q["id"] for n in row) for row, q in zip(found, queries)) / len(queries)
  print(json.dumps({"queries": len(queries), "k": args.k, "top1": round(top1, 4), f"top{args.k}": round(topk, 4),
                    "entries": len(db), "text_key": db.text_key}))


def generate_rag_turbo(args) -> None:
  """`kadiff generate --mode rag-turbo --database DIR`: one-step generation with retrieved H-space features."""
  from kadiff_jax.job import Job
  from kadiff_jax.pipelines.cli import done_line
  from kadiff_jax.pipelines.text_to_image import GenerationOptions
  from kadiff_jax.ragturbo import pipeline
  from kadiff_jax.ragturbo.database import HSpaceDatabase
  from kadiff_jax.weights.options import ModelOptions
  if args.prompt is None:
    raise UsageError("--prompt is required")
  if not args.database:
    raise UsageError("--mode rag-turbo needs --database DIR (an H-space database: `kadiff hspace build`)")
  if args.reference or args.ip_adapter:
    raise UsageError("--mode rag-turbo retrieves its own references: drop --reference / --ip-adapter")
  if args.num_images < 1:
    raise UsageError(f"--num-images {args.num_images}: expected at least 1")
  opts = config.build(GenerationOptions, args)
  rag = config.build(pipeline.RagTurboOptions, args)
  model_opts = config.build(ModelOptions, args)
  init = cli_args.read_init_latents(args.init_latents, args.num_images)
  models = model_opts.load()
  db = HSpaceDatabase.load(args.database, models)
  db.check_k(rag.k)
  injection = pipeline.Injection.load(rag, models)
  jobs = [Job.numbered(args.prompt, args.seed, i, negative_prompt=args.negative_prompt)
          for i in range(args.num_images)]

  def on_plan(plan):
    if plan.done or plan.redo:
      log.info("%s: %s", args.out, plan.describe())
    cli_args.write_config(args.out, args, model=model_opts, generation=opts, rag_turbo=rag)

  resume, _ = pipeline.write_jobs(models, jobs, opts, rag, db, args.out, injection=injection, init_latents=init,
                                  batch_size=args.batch_size, overwrite=args.overwrite, on_plan=on_plan)
  print(done_line(args.out, len(resume.todo), resume.done, resume.redo))


def _train(args) -> None:
  from kadiff_jax.ragturbo import train
  from kadiff_jax.ragturbo.database import HSpaceDatabase
  from kadiff_jax.weights.models import load_models
  from kadiff_jax.weights.options import ModelOptions
  options = config.build(train.TrainOptions, args)  # bad options fail before any model loads
  prompts = train.read_prompts(args.prompts) if args.prompts else []
  real = _read_corpus(args.images, args.skip_invalid) if args.images else []
  if not prompts and not real:
    raise UsageError("give --prompts FILE (teacher generations) and/or --images CORPUS (real image-caption pairs)")
  model_opts = config.build(ModelOptions, args)
  student = model_opts.load()
  log.info("loading the teacher %s", args.teacher)
  teacher = load_models(args.teacher, dtype=_dtype(student), cache_dir=model_opts.cache_path)
  db = HSpaceDatabase.load(args.database, student)
  result = train.train(student, teacher, db, args.out, options, prompts=prompts, real_entries=real,
                       latent_lpips=args.latent_lpips,
                       on_start=lambda: cli_args.write_config(args.out, args, model=model_opts, train=options))
  last = result["losses"]
  shown = ", ".join(f"{k} {last[k]}" for k in ("loss_g", "distill", "loss_d") if k in last)
  print(f"trained to step {result['step']}: {result['adapter']} ({shown})")


def _dtype(models):
  import jax
  return jax.tree_util.tree_leaves(models.unet_params)[0].dtype


def add_parsers(sub) -> None:
  from kadiff_jax.ragturbo.database import CACHES
  from kadiff_jax.ragturbo.text_key import TEXT_KEYS
  h = sub.add_parser("hspace", help="the H-space database of RAG-Turbo (`kadiff generate --mode rag-turbo`)")
  hs = h.add_subparsers(dest="hspace_command", required=True)

  def common(p, corpus: bool):
    p.add_argument("--database", required=True, help="H-space database directory")
    if corpus:
      p.add_argument("--corpus", required=True, help=".jsonl, WIT .tsv(.gz), .parquet, or a DreamBooth folder")
      p.add_argument("--skip-invalid", action="store_true", help="leave out entries without image or title")
      p.add_argument("--image-cache", default=None, help="folder for downloaded corpus images")
      p.add_argument("--batch-size", type=int, default=8, help="images per feature batch")
    add_common_model(p)
    return p

  def add_common_model(p):
    cli_args.add_config_arg(p)
    from kadiff_jax.weights.options import ModelOptions
    config.add_options(p, ModelOptions, group="model")

  b = common(hs.add_parser("build", help="corpus -> caption keys (the model's text encoder) and h0_r -> database "
                           "directory (replaced atomically)"), True)
  b.add_argument("--cache", choices=CACHES, default="h", help="store h0_r maps (exact, larger) or clean latents "
                 "(h0_r recomputed per query)")
  b.add_argument("--text-key", choices=TEXT_KEYS, default="pooled", help="the prompt vector searched with (Q4)")
  b.add_argument("--size", type=int, default=None, help="image side entries are resized to (default: the model's)")
  b.add_argument("--backend", choices=["scann", "exact"], default=None, help="default: scann where installed")
  cli_args.leaf(b, ("hspace", "build"), _build)
  u = common(hs.add_parser("upsert", help="add or replace entries (same id)"), True)
  u.add_argument("--no-verify", action="store_true", help="skip the checksum check of the database files")
  cli_args.leaf(u, ("hspace", "upsert"), _upsert)
  d = common(hs.add_parser("delete", help="remove entries by id"), False)
  d.add_argument("ids", nargs="+")
  d.add_argument("--no-verify", action="store_true", help="skip the checksum check of the database files")
  cli_args.leaf(d, ("hspace", "delete"), _delete)
  q = common(hs.add_parser("query", help="the neighbours and λ of one prompt"), False)
  q.add_argument("text")
  q.add_argument("-k", type=int, default=1)
  q.add_argument("--json", action="store_true")
  q.add_argument("--no-verify", action="store_true", help="skip the checksum check of the database files")
  cli_args.leaf(q, ("hspace", "query"), _query)
  e = common(hs.add_parser("evaluate", help="top-1 / top-k accuracy on {query, id} pairs; JSON on the last line"),
             False)
  e.add_argument("--queries", default="dreambooth", help="JSONL of {query, id}, or 'dreambooth' (built-in set)")
  e.add_argument("-k", type=int, default=5)
  e.add_argument("--no-verify", action="store_true", help="skip the checksum check of the database files")
  cli_args.leaf(e, ("hspace", "evaluate"), _evaluate)

  from kadiff_jax.ragturbo.train import TrainOptions
  t = sub.add_parser("train", help="train models of the methods here")
  ts = t.add_subparsers(dest="train_command", required=True)
  a = ts.add_parser("hspace-adapter", help="train RAG-Turbo's H-space adapter with decoder LoRA against a "
                    "teacher-encoder discriminator (HSPACE_SPEC §6); resumes the run in --out")
  a.add_argument("--teacher", required=True, help="the teacher pipeline (SD2.1-base for SD-Turbo; 'tiny-sd21')")
  a.add_argument("--database", required=True, help="H-space database of the student (`kadiff hspace build`)")
  a.add_argument("--prompts", default=None, help="text file, one prompt a line: the teacher's synthetic pairs")
  a.add_argument("--images", default=None, help="a corpus of real image-caption pairs (any `kadiff retrieve build` "
                 "corpus)")
  a.add_argument("--skip-invalid", action="store_true", help="leave out corpus entries without image or title")
  a.add_argument("--latent-lpips", default=None, help="E-LatentLPIPS weights: the elatentlpips release's "
                 "sd21_latest_vgg16_tuned.pth (not bundled; without them the latent LPIPS term is off)")
  a.add_argument("--out", required=True, help="run folder: checkpoints, log.csv, losses.png, adapter.safetensors")
  add_common_model(a)
  config.add_options(a, TrainOptions, group="training")
  cli_args.leaf(a, ("train", "hspace-adapter"), _train)
