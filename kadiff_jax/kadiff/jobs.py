"""KA-Diff batch jobs: read a JSONL/TSV of jobs, invert each reference once, generate, write, resume.

Each finished job leaves `{id}.png` (ours), `{id}_baseline.png` (plain
IP-Adapter from the same noise, if asked) and `{id}_grid.png` (reference |
baseline | ours), all written atomically; a rerun skips jobs whose outputs
exist. Reference caches are keyed by reference content, ref_prompt and options.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from kadiff_jax import image_io, sharding
from kadiff_jax.kadiff import concept_mask
from kadiff_jax.kadiff import generate as G
from kadiff_jax.kadiff import reference as R
from kadiff_jax.kadiff.options import DEFAULT_PROMPT, KADiffOptions
from kadiff_jax.pipelines.text_to_image import initial_noise, place_params

log = logging.getLogger("kadiff_jax")
_FIELDS = ("id", "prompt", "reference", "mask", "ref_prompt", "seed")
AUTO_MASK = "auto"  # a job's mask field: derive the mask from the reference's cross-attention


@dataclasses.dataclass(frozen=True)
class Job:
  id: str
  prompt: str
  reference: str
  ref_prompt: str
  mask: str | None = None  # a mask image, "auto" (from cross-attention), or None (the whole reference)
  seed: int = 0
  index: int = 0  # noise is normal(fold_in(PRNGKey(seed), index))


def read_jobs(path: str | Path) -> list[Job]:
  """Jobs from JSONL (one object per line) or TSV (header row), fields: id, prompt, reference, mask,
  ref_prompt, seed. Relative image paths are taken from the job file's folder."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"jobs file {path} does not exist")
  rows = []
  if path.suffix == ".tsv":
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f, delimiter="\t"))
  else:
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
  jobs, seen = [], set()
  for n, row in enumerate(rows, 1):
    unknown = set(row) - set(_FIELDS)
    if unknown:
      raise ValueError(f"{path}: job {n} has unknown fields {sorted(unknown)} (expected {list(_FIELDS)})")
    if not row.get("reference"):
      raise ValueError(f"{path}: job {n} has no 'reference' image")
    resolve = lambda p: (p if p == AUTO_MASK or Path(p).is_absolute() else str(path.parent / p)) if p else None
    job = Job(id=str(row.get("id") or f"job{n:05d}"), prompt=row.get("prompt") or DEFAULT_PROMPT,
              reference=resolve(row["reference"]), ref_prompt=row.get("ref_prompt") or "",
              mask=resolve(row.get("mask")), seed=int(row.get("seed") or 0))
    if job.id in seen:
      raise ValueError(f"{path}: duplicate job id {job.id!r}")
    seen.add(job.id)
    jobs.append(job)
  return jobs


def reference_cache(models, adapter, job: Job, options: KADiffOptions, cache_dir: Path | None) -> R.ReferenceCache:
  """The job's reference inverted, from `cache_dir` when it holds a matching cache (saved there if not)."""
  image = image_io.load_rgb(job.reference)
  sha = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
  expected = R.cache_manifest(models, adapter, sha, job.ref_prompt, options)
  if cache_dir is not None:
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / f"ref-{key}"
    if path.with_suffix(".npz").is_file():
      log.info("reference %s: cache %s", job.reference, path)
      return R.load_cache(path, expected)
  cache = R.invert_reference(models, adapter, image, job.ref_prompt, options)
  if cache_dir is not None and sharding.is_writer():
    cache.save(path)
  return cache


def job_mask(job: Job, cache: R.ReferenceCache, tokenizer, options: KADiffOptions) -> tuple[np.ndarray, dict]:
  """The job's concept mask [size, size] bool and a record of where it came from (a user mask wins)."""
  if job.mask == AUTO_MASK:
    if cache.cross_attention is None:
      raise ValueError(f"job {job.id}: --mask auto needs a reference cache with cross-attention maps "
                       f"(made by kadiff >= cache version {R.CACHE_VERSION}); delete the old cache")
    cm = concept_mask.concept_mask(cache.cross_attention, tokenizer, job.ref_prompt, options.size,
                                   options.mask_words, options.mask_threshold)
    return cm.mask, cm.record()
  if job.mask:
    return R.load_mask(job.mask, options.size, options.mask_padding), {"source": "user", "path": job.mask}
  return np.ones((options.size, options.size), bool), {"source": "none"}


def _grid(images: Sequence[np.ndarray]) -> np.ndarray:
  h = images[-1].shape[0]
  tiles = [np.asarray(image_io.Image.fromarray(im).resize((h, h))) if im.shape[0] != h else im for im in images]
  return np.concatenate(tiles, axis=1)


def run(models, adapter, jobs: Sequence[Job], options: KADiffOptions, out_dir: str | Path, *,
        cache_dir: str | Path | None = None, baseline: bool = True, batch_size: int | None = None,
        init_latents: np.ndarray | None = None, mesh=None, progress: bool = True) -> dict[str, dict]:
  """Runs the jobs that have no output yet; returns {id: {"mask": where its mask came from}} for those."""
  options = options.for_model(models)
  out_dir = Path(out_dir)
  cache_dir = Path(cache_dir) if cache_dir else None
  todo = [(i, j) for i, j in enumerate(jobs) if not (out_dir / f"{j.id}.png").is_file()]
  if len(todo) < len(jobs):
    log.info("resuming: %d of %d jobs already done", len(jobs) - len(todo), len(jobs))
  latent_shape = (options.size // models.vae_scale_factor,) * 2 + (models.unet_config.in_channels,)
  caches: dict[tuple[str, str], R.ReferenceCache] = {}
  # group by reference so each is inverted once and batches share it as often as possible
  todo.sort(key=lambda ij: (ij[1].reference, ij[1].ref_prompt))
  bs = batch_size or 1
  mesh = mesh or sharding.data_mesh()
  placed, placed_adapter = place_params(models, adapter, mesh)  # inversion keeps the unplaced params
  done: dict[str, dict] = {}
  bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="kadiff")
  t0 = time.perf_counter()
  for start in range(0, len(todo), bs):
    chunk = todo[start:start + bs]
    for _, j in chunk:
      if (j.reference, j.ref_prompt) not in caches:
        caches[(j.reference, j.ref_prompt)] = reference_cache(models, adapter, j, options, cache_dir)
    cs = [caches[(j.reference, j.ref_prompt)] for _, j in chunk]
    refs = [image_io.load_rgb(j.reference) for _, j in chunk]
    mask_info = [job_mask(j, c, models.tokenizer, options) for (_, j), c in zip(chunk, cs)]
    masks = np.stack([m for m, _ in mask_info])
    noise = (init_latents[[i for i, _ in chunk]] if init_latents is not None
             else np.stack([np.asarray(initial_noise(j.seed, [j.index], latent_shape))[0] for _, j in chunk]))
    kjobs = [G.KADiffJob(j.prompt, j.reference, j.ref_prompt, j.mask, j.seed) for _, j in chunk]
    _, ours = G.run_jobs(placed, placed_adapter, kjobs, cs, refs, masks, noise, options, mesh=mesh)
    base = G.run_jobs(placed, placed_adapter, kjobs, cs, refs, masks, noise, options, mode="baseline",
                      mesh=mesh)[1] \
        if baseline and options.mode != "baseline" else None
    for k, (_, j) in enumerate(chunk if sharding.is_writer() else ()):
      meta = {"prompt": j.prompt, "reference": j.reference, "ref_prompt": j.ref_prompt, "mask": j.mask or "",
              "mask_source": json.dumps(mask_info[k][1]),
              "seed": str(j.seed), "kadiff": {"model": str(models.source), "ip_adapter": adapter.source,
                                              **dataclasses.asdict(options)}}
      ref_small = np.asarray(refs[k].resize((options.size, options.size)))
      if j.mask == AUTO_MASK:
        image_io.write_png(out_dir / f"{j.id}_mask.png", np.repeat(masks[k][..., None] * np.uint8(255), 3, -1), meta)
      if base is not None:
        image_io.write_png(out_dir / f"{j.id}_baseline.png", base[k], {**meta, "mode": "baseline"})
      image_io.write_png(out_dir / f"{j.id}_grid.png", _grid([ref_small] + ([base[k]] if base is not None else [])
                                                               + [ours[k]]), meta)
      image_io.write_png(out_dir / f"{j.id}.png", ours[k], {**meta, "mode": options.mode})  # last: marks done
    done.update((j.id, {"mask": info}) for (_, j), (_, info) in zip(chunk, mask_info))
    bar.update(len(chunk))
    bar.set_postfix(img_per_s=f"{len(done) / (time.perf_counter() - t0):.2f}")
  bar.close()
  return done
