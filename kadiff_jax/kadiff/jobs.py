"""KA-Diff batch jobs: read a JSONL/TSV of jobs, invert each reference once, generate, write, resume.

Each finished job leaves `{id}.png` (ours), `{id}_baseline.png` (plain
IP-Adapter from the same noise, if asked), `{id}_grid.png` (labelled:
reference | mask | baseline | ours) and, last, `{id}.json`: the job's record
with the fingerprint of its inputs (`kadiff_jax.records`). Each file is
written whole. A rerun skips jobs whose record matches, refuses jobs whose
inputs changed unless `overwrite`, and runs the rest. The output folder is a
path or an fsspec URL. In a multi-process run every process writes the jobs
its own devices computed (nothing is gathered to one host), so a rerun after
a lost host redoes just the jobs it had not written. Reference caches are
keyed by reference content, ref_prompt and options.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from kadiff_jax import image_io, records, sharding
from kadiff_jax.image_grid import labelled_row
from kadiff_jax.job import Job, check_seed
from kadiff_jax.outputs import OutputDir
from kadiff_jax.kadiff import concept_mask
from kadiff_jax.kadiff import generate as G
from kadiff_jax.kadiff import reference as R
from kadiff_jax.kadiff.options import DEFAULT_PROMPT, KADiffOptions
from kadiff_jax.pipelines.text_to_image import initial_noise, place_params

log = logging.getLogger("kadiff_jax")
_FIELDS = ("id", "prompt", "reference", "mask", "ref_prompt", "seed")
AUTO_MASK = "auto"  # a job's mask field: derive the mask from the reference's cross-attention


def read_jobs(path: str | Path) -> list[Job]:
  """Jobs from JSONL (one object per line) or TSV (header row), fields: id, prompt, reference, mask,
  ref_prompt, seed. Relative image paths are taken from the job file's folder."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"jobs file {path} does not exist")
  rows = []
  try:
    text = path.read_text()
  except UnicodeDecodeError as e:
    raise ValueError(f"jobs file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  if path.suffix == ".tsv":
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))
  else:
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
  jobs, seen = [], set()
  for n, row in enumerate(rows, 1):
    if not isinstance(row, dict):
      raise ValueError(f"{path}: job {n} is {json.dumps(row)}, expected an object with fields {list(_FIELDS)}")
    unknown = set(row) - set(_FIELDS)
    if unknown:
      raise ValueError(f"{path}: job {n} has unknown fields {sorted(unknown)} (expected {list(_FIELDS)})")
    if not row.get("reference"):
      raise ValueError(f"{path}: job {n} has no 'reference' image")
    for field in ("prompt", "reference", "mask", "ref_prompt"):
      if row.get(field) is not None and not isinstance(row[field], str):
        raise ValueError(f"{path}: job {n}: {field} is {json.dumps(row[field])}, expected a string")
    resolve = lambda p: (p if p == AUTO_MASK or Path(p).is_absolute() else str(path.parent / p)) if p else None
    try:
      job = Job(id=str(row.get("id") or f"job{n:05d}"), prompt=row.get("prompt") or DEFAULT_PROMPT,
                reference=resolve(row["reference"]), ref_prompt=row.get("ref_prompt") or "",
                mask=resolve(row.get("mask")), seed=check_seed(row.get("seed") or 0))
    except ValueError as e:
      raise ValueError(f"{path}: job {n}: {e}") from None
    if job.id in seen:
      raise ValueError(f"{path}: duplicate job id {job.id!r}")
    seen.add(job.id)
    jobs.append(job)
  return jobs


def job_mask(job: Job, reference: R.PreparedReference, tokenizer, options: KADiffOptions) -> tuple[np.ndarray, dict]:
  """The job's concept mask [size, size] bool and a record of where it came from (a user mask wins)."""
  if job.mask == AUTO_MASK:
    if reference.cross_attention is None:
      raise ValueError(f"job {job.id}: mask 'auto' needs the reference prepared with auto_mask=True "
                       "(its inversion's cross-attention maps)")
    cm = concept_mask.concept_mask(reference.cross_attention, tokenizer, job.ref_prompt, options.size,
                                   job.mask_words or options.mask_words, options.mask_threshold)
    return cm.mask, cm.record()
  if job.mask:
    return R.load_mask(job.mask, options.size, options.mask_padding), {"source": "user", "path": job.mask}
  return np.ones((options.size, options.size), bool), {"source": "none"}


def job_noise(job: Job, models, options: KADiffOptions) -> np.ndarray:
  """The job's seeded initial latents [h, w, C]."""
  latent = options.size // models.vae_scale_factor
  return np.asarray(initial_noise(job.seed, [job.index], (latent, latent, models.unet_config.in_channels)))[0]


def mask_input(job: Job, digests: dict | None = None) -> str:
  """What the job's mask is, for its fingerprint: "auto", "none", or "sha256:" of the mask image's pixels."""
  if job.mask == AUTO_MASK:
    return AUTO_MASK
  if not job.mask:
    return "none"
  if digests is not None and job.mask in digests:
    return digests[job.mask]
  digest = "sha256:" + records.array_sha256(np.asarray(image_io.Image.open(job.mask).convert("L")))
  if digests is not None:
    digests[job.mask] = digest
  return digest


def reference_digest(reference, digests: dict | None = None) -> str:
  """sha256 of a reference's RGB pixels as read (a path, memoised in `digests`, or a PIL image)."""
  if isinstance(reference, (str, Path)) and digests is not None and str(reference) in digests:
    return digests[str(reference)]
  image = image_io.load_rgb(reference) if isinstance(reference, (str, Path)) else reference.convert("RGB")
  digest = records.image_sha256(image)  # the reference cache's own content key
  if isinstance(reference, (str, Path)) and digests is not None:
    digests[str(reference)] = digest
  return digest


def job_inputs(job: Job, models, adapter, options: KADiffOptions, *, reference_sha256: str, mask: str,
               init_latents: np.ndarray | None = None, baseline: bool = False) -> dict:
  """Everything that decides a KA-Diff job's pixels (its fingerprint's inputs; options resolved for the model)."""
  return {"model": str(models.source), "family": models.family.name,
          "dtype": str(jax.tree_util.tree_leaves(models.unet_params)[0].dtype),
          "ip_adapter": str(adapter.source), "options": dataclasses.asdict(options), "prompt": job.prompt,
          "seed": job.seed, "index": job.index, "ref_prompt": job.ref_prompt, "reference_sha256": reference_sha256,
          "mask": mask, "mask_words": list(job.mask_words) if job.mask == AUTO_MASK else [],
          "init_latents_sha256": None if init_latents is None else records.array_sha256(init_latents),
          "baseline": baseline}


def job_fields(job: Job) -> dict:
  """A job's record fields besides its inputs: what a reader looks for first."""
  return {"prompt": job.prompt, "seed": job.seed, "index": job.index, "reference": job.reference,
          "ref_prompt": job.ref_prompt, "mask_file": job.mask}


def grid(reference: np.ndarray, mask: np.ndarray, mask_info: dict, baseline: np.ndarray | None, ours: np.ndarray,
         mode: str, caption: str) -> np.ndarray:
  """reference | mask | baseline | ours, titled, the prompt under them: the same columns in every mode."""
  size = ours.shape[0]
  ref = np.asarray(image_io.Image.fromarray(reference).resize((size, size)))
  shown = np.where(mask[..., None], ref, (ref * 0.25).astype(np.uint8))  # the concept kept, the rest dimmed
  return labelled_row([("reference", ref), (f"mask ({mask_info.get('source', 'none')})", shown),
                       ("baseline", baseline), (f"ours ({mode})", ours)], caption,
                      missing="baseline not asked for (--baseline)")


class JobsRun(NamedTuple):
  records: dict[str, dict]   # {id: record} of the jobs this process wrote
  ran: int                   # jobs run now, by all processes
  skipped: list[str]         # ids whose outputs already matched their inputs
  redone: dict[str, list[str]]  # ids redone (overwrite) -> what changed


def run(models, adapter, jobs: Sequence[Job], options: KADiffOptions, out_dir: str | Path, *,
        cache_dir: str | Path | None = None, baseline: bool = False, batch_size: int | None = None,
        init_latents: np.ndarray | None = None, mesh=None, progress: bool = True, overwrite: bool = False,
        references: dict[tuple[str, str], R.PreparedReference] | None = None,
        extra_fields: dict[str, dict] | None = None) -> "JobsRun":
  """Runs the jobs without matching outputs; returns what it ran, skipped and redid.

  Jobs are grouped by reference; each batch prepares (inverts, over the mesh) the references it
  newly needs, and a reference is dropped once no later batch uses it. `references` supplies
  prepared ones by (path, ref_prompt), e.g. from `kadiff invert` outputs. `extra_fields` adds
  fields to a job's record (by id). Jobs whose outputs were made from other inputs raise
  `records.ChangedOutputs` unless `overwrite`.
  """
  options = options.for_model(models)
  out = OutputDir(out_dir)
  cache_dir = Path(cache_dir) if cache_dir else None
  digests = {str(path): reference_digest(p.image) for (path, _), p in (references or {}).items()}
  mask_digests: dict[str, str] = {}
  inputs = [job_inputs(j, models, adapter, options, reference_sha256=reference_digest(j.reference, digests),
                       mask=mask_input(j, mask_digests), baseline=baseline,
                       init_latents=None if init_latents is None else init_latents[i])
            for i, j in enumerate(jobs)]
  resume = records.plan_resume(out, [j.id for j in jobs], inputs, overwrite=overwrite)
  todo = [(i, jobs[i]) for i in resume.todo]
  sharding.barrier("kadiff-jobs-todo")  # every process saw the same finished jobs before any writes more
  if resume.done or resume.redo:
    log.info("%s: %s", out, resume.describe())
  # group by reference so each is prepared once and batches share it as often as possible
  todo.sort(key=lambda ij: (ij[1].reference, ij[1].ref_prompt))
  auto = any(j.mask == AUTO_MASK for _, j in todo)
  mesh = mesh or sharding.data_mesh()
  bs = batch_size or G.auto_batch_size(models, adapter, options, mesh)
  log.info("%d job(s) per batch over %d device(s)%s", bs, mesh.size, "" if batch_size else " (automatic)")
  placed, placed_adapter = place_params(models, adapter, mesh)
  prepared: dict[tuple[str, str], R.PreparedReference] = dict(references or {})
  done: dict[str, dict] = {}
  bar = tqdm(total=len(todo), unit="img", disable=not progress or not todo, desc=options.mode)
  t0 = time.perf_counter()
  for start in range(0, len(todo), bs):
    chunk = todo[start:start + bs]
    keys = [(j.reference, j.ref_prompt) for _, j in chunk]
    new = sorted({k for k in keys if k not in prepared})
    prepared.update(zip(new, R.prepare_references(placed, placed_adapter, new, options, auto_mask=auto,
                                                  cache_dir=cache_dir, mesh=mesh)))
    mask_info = [job_mask(j, prepared[k], models.tokenizer, options) for (_, j), k in zip(chunk, keys)]
    items = [G.GenerationItem(j, prepared[k], m, init_latents[i] if init_latents is not None
                              else job_noise(j, models, options))
             for (i, j), k, (m, _) in zip(chunk, keys, mask_info)]
    # the baseline follows ours' plan, so each job's images are made (and written) by the same process
    plan = G.plan_batch(placed_adapter, items, options, options.mode, mesh.size)
    ours = G.run_jobs(placed, placed_adapter, items, options, mesh=mesh, plan=plan, gather=False)
    base = G.run_jobs(placed, placed_adapter, items, options, mode="baseline", mesh=mesh, plan=plan,
                      gather=False) if baseline and options.mode != "baseline" else None
    later = {(j.reference, j.ref_prompt) for _, j in todo[start + bs:]}
    for k in [k for k in prepared if k not in later and references is None]:
      del prepared[k]  # sorted by reference: no later batch needs it
    for row, k in enumerate(ours.items):  # the jobs this process's devices computed
      i, j = chunk[k]
      meta = {"prompt": j.prompt, "reference": j.reference, "ref_prompt": j.ref_prompt, "mask": j.mask or "",
              "mask_source": json.dumps(mask_info[k][1]), "seed": str(j.seed),
              "fingerprint": records.fingerprint(inputs[i])}
      png = lambda name, image, extra={}: out.write_bytes(name, image_io.png_bytes(image, {**meta, **extra}))
      outputs = {"ours": f"{j.id}.png", "grid": f"{j.id}_grid.png"}
      if j.mask == AUTO_MASK:
        png(f"{j.id}_mask.png", np.repeat(items[k].mask[..., None] * np.uint8(255), 3, -1))
        outputs["mask"] = f"{j.id}_mask.png"
      ours_im = ours.images[row]
      base_im = base.images[base.items.index(k)] if base is not None else None
      if base is not None:
        png(f"{j.id}_baseline.png", base_im, {"mode": "baseline"})
        outputs["baseline"] = f"{j.id}_baseline.png"
      png(f"{j.id}.png", ours_im, {"mode": options.mode})
      png(f"{j.id}_grid.png", grid(np.asarray(items[k].reference.image), items[k].mask, mask_info[k][1], base_im,
                                   ours_im, options.mode, f"{j.prompt}  (seed {j.seed})"))
      rec = records.record(j.id, inputs[i], **(extra_fields or {}).get(j.id, {}), **job_fields(j),
                           mask=mask_info[k][1], outputs=outputs)
      out.write_text(f"{j.id}.json", json.dumps(rec, indent=1, default=str))  # last: marks the job done
      done[j.id] = rec
    if jax.process_count() > 1 and ours.items:
      log.info("process %d wrote %s", jax.process_index(), ",".join(chunk[k][1].id for k in ours.items))
    bar.update(len(chunk))
    bar.set_postfix(img_per_s=f"{(start + len(chunk)) / (time.perf_counter() - t0):.2f}")
  bar.close()
  sharding.barrier("kadiff-jobs-written")  # every process's files are there before anyone reports or records
  return JobsRun(done, len(todo), resume.done, resume.redo)
