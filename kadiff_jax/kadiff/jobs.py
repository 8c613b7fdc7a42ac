"""KA-Diff batch jobs: read a JSONL/TSV of jobs, invert each reference once, generate, write, resume.

Each finished job leaves `{id}.png` (ours), `{id}_baseline.png` (plain
IP-Adapter from the same noise, if asked) and `{id}_grid.png` (reference |
baseline | ours), each written whole, `{id}.png` last; a rerun skips jobs
whose `{id}.png` exists. The output folder is a path or an fsspec URL. In a
multi-process run every process writes the jobs its own devices computed
(nothing is gathered to one host), so a rerun after a lost host redoes just
the jobs it had not written. Reference caches are keyed by reference
content, ref_prompt and options.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from kadiff_jax import image_io, sharding
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
                                   options.mask_words, options.mask_threshold)
    return cm.mask, cm.record()
  if job.mask:
    return R.load_mask(job.mask, options.size, options.mask_padding), {"source": "user", "path": job.mask}
  return np.ones((options.size, options.size), bool), {"source": "none"}


def job_noise(job: Job, models, options: KADiffOptions) -> np.ndarray:
  """The job's seeded initial latents [h, w, C]."""
  latent = options.size // models.vae_scale_factor
  return np.asarray(initial_noise(job.seed, [job.index], (latent, latent, models.unet_config.in_channels)))[0]


def _grid(images: Sequence[np.ndarray]) -> np.ndarray:
  h = images[-1].shape[0]
  tiles = [np.asarray(image_io.Image.fromarray(im).resize((h, h))) if im.shape[0] != h else im for im in images]
  return np.concatenate(tiles, axis=1)


def run(models, adapter, jobs: Sequence[Job], options: KADiffOptions, out_dir: str | Path, *,
        cache_dir: str | Path | None = None, baseline: bool = False, batch_size: int | None = None,
        init_latents: np.ndarray | None = None, mesh=None, progress: bool = True,
        references: dict[tuple[str, str], R.PreparedReference] | None = None) -> dict[str, dict]:
  """Runs the jobs that have no output yet; returns {id: {"mask": where its mask came from}} for those.

  Jobs are grouped by reference; each batch prepares (inverts, over the mesh) the references it
  newly needs, and a reference is dropped once no later batch uses it. `references` supplies
  prepared ones by (path, ref_prompt), e.g. from `kadiff invert` outputs.
  """
  options = options.for_model(models)
  out = OutputDir(out_dir)
  cache_dir = Path(cache_dir) if cache_dir else None
  todo = [(i, j) for i, j in enumerate(jobs) if not out.exists(f"{j.id}.png")]
  sharding.barrier("kadiff-jobs-todo")  # every process saw the same finished jobs before any writes more
  if len(todo) < len(jobs):
    log.info("resuming: %d of %d jobs already done", len(jobs) - len(todo), len(jobs))
  # group by reference so each is prepared once and batches share it as often as possible
  todo.sort(key=lambda ij: (ij[1].reference, ij[1].ref_prompt))
  auto = any(j.mask == AUTO_MASK for _, j in todo)
  mesh = mesh or sharding.data_mesh()
  bs = batch_size or G.auto_batch_size(models, adapter, options, mesh)
  log.info("%d job(s) per batch over %d device(s)%s", bs, mesh.size, "" if batch_size else " (automatic)")
  placed, placed_adapter = place_params(models, adapter, mesh)
  prepared: dict[tuple[str, str], R.PreparedReference] = dict(references or {})
  done: dict[str, dict] = {}
  bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="kadiff")
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
      j = chunk[k][1]
      meta = {"prompt": j.prompt, "reference": j.reference, "ref_prompt": j.ref_prompt, "mask": j.mask or "",
              "mask_source": json.dumps(mask_info[k][1]),
              "seed": str(j.seed), "kadiff": {"model": str(models.source), "ip_adapter": adapter.source,
                                              **dataclasses.asdict(options)}}
      ref_small = np.asarray(items[k].reference.image.resize((options.size, options.size)))
      png = lambda name, image, extra={}: out.write_bytes(name, image_io.png_bytes(image, {**meta, **extra}))
      if j.mask == AUTO_MASK:
        png(f"{j.id}_mask.png", np.repeat(items[k].mask[..., None] * np.uint8(255), 3, -1))
      ours_im = ours.images[row]
      base_im = base.images[base.items.index(k)] if base is not None else None
      if base is not None:
        png(f"{j.id}_baseline.png", base_im, {"mode": "baseline"})
      png(f"{j.id}_grid.png", _grid([ref_small] + ([base_im] if base is not None else []) + [ours_im]))
      png(f"{j.id}.png", ours_im, {"mode": options.mode})  # last: marks done
    done.update((j.id, {"mask": info}) for (_, j), (_, info) in zip(chunk, mask_info))
    if jax.process_count() > 1 and ours.items:
      log.info("process %d wrote %s", jax.process_index(), ",".join(chunk[k][1].id for k in ours.items))
    bar.update(len(chunk))
    bar.set_postfix(img_per_s=f"{len(done) / (time.perf_counter() - t0):.2f}")
  bar.close()
  sharding.barrier("kadiff-jobs-written")  # every process's files are there before anyone reports or records
  return done
