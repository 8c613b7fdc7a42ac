"""`kadiff visualize correspondence`: generate one job and draw what the injection did.

Writes into the output folder:
  ours.png            the KA-Diff image
  matches.png         reference (mask outlined) | ours, matched pixels joined at one step and resolution
  distance.png        kept cosine distance per target, one tile per injecting step (red: below threshold)
  injected.png        injected target positions per injecting step over the generated image
  cross_attention.png the reference with the chosen words' inversion cross-attention overlaid, the mask
                      outlined (left), and the mask itself (right)
  correspondence.json per-step counts (sources, matched, injected) and mean kept distance per resolution
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from kadiff_jax import image_io
from kadiff_jax.kadiff import concept_mask as CM
from kadiff_jax.kadiff import correspondence as corr_lib
from kadiff_jax.kadiff import generate as G
from kadiff_jax.job import Job
from kadiff_jax.kadiff import jobs as kjobs
from kadiff_jax.kadiff import reference as R
from kadiff_jax.kadiff import visualize as V
from kadiff_jax.kadiff.options import KADiffOptions


def step_summary(corrs: dict[int, corr_lib.Correspondence], masks: dict[int, np.ndarray]) -> dict:
  """{r: [{step, sources, matched, injected, mean_distance}]} for job 0 of per-step correspondences."""
  out = {}
  for r, c in corrs.items():
    rows = []
    for s in range(c.inject.shape[0]):
      d = c.distance[s, 0]
      matched = np.isfinite(d)
      rows.append({"step": s, "sources": int(masks[r].sum()), "matched": int(matched.sum()),
                   "injected": int(c.inject[s, 0].sum()),
                   "mean_distance": round(float(d[matched].mean()), 6) if matched.any() else None})
    out[str(r)] = rows
  return out


def correspondence_figures(models, adapter, job: Job, options: KADiffOptions, out_dir: str | os.PathLike, *,
                           resolution: int | None = None, step: int | None = None,
                           words: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
                           size: int = 512) -> dict:
  """Generates `job` with KA-Diff, writes the figures listed in the module docstring, returns the summary."""
  options = options.for_model(models)
  if options.mode != "kadiff":
    raise ValueError(f"visualize correspondence needs mode 'kadiff', got {options.mode!r}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  prepared = R.prepare_reference(models, adapter, job.reference, job.ref_prompt, options, auto_mask=True,
                                 cache_dir=cache_dir)
  mask, mask_record = kjobs.job_mask(job, prepared, models.tokenizer, options)
  item = G.GenerationItem(job, prepared, mask, kjobs.job_noise(job, models, options))
  generated = G.run_jobs(models, adapter, [item], options, record=("correspondence",))
  images, corrs = generated.images, generated.aux["correspondence"]
  r = resolution or max(corrs)
  if r not in corrs:
    raise ValueError(f"resolution {r}: this run injects at {sorted(corrs)}")
  lo, hi = options.step_range()
  steps = [s for s in range(max(lo, 1), hi + 1)]
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"step {step}: injection runs at steps {steps[0]}-{steps[-1]}")
  c = corrs[r]
  ours = images[0]
  ref_np = np.asarray(prepared.image)
  sources = {rr: np.asarray(corr_lib.resize_nearest_mask(mask, rr)) for rr in corrs}
  write = lambda name, im: image_io.write_png(out_dir / name, im)
  write("ours.png", ours)
  write("matches.png", V.matches_image(ref_np, ours, c.source[step, 0], c.inject[step, 0], r, mask, size))
  write("distance.png", V.distance_panels(c.distance[:, 0], steps, r, options.threshold))
  write("injected.png", V.injected_panels(c.inject[:, 0], steps, r, ours))
  positions, used = CM.subject_positions(models.tokenizer, job.ref_prompt, words)
  heat = CM.concept_heatmap(prepared.cross_attention, positions, size)
  mask_big = V.resize_square(mask.astype(np.uint8) * 255, size, nearest=True) > 127
  overlay = V.outline(V.heatmap_overlay(ref_np, heat, size=size), mask_big, (255, 255, 255))
  write("cross_attention.png", np.concatenate([overlay, np.repeat(mask_big[..., None] * np.uint8(255), 3, -1)], 1))
  summary = {"job": job.id, "prompt": job.prompt, "ref_prompt": job.ref_prompt, "mask": mask_record,
             "resolution": r, "step": step, "injecting_steps": [steps[0], steps[-1]], "threshold": options.threshold,
             "attention_words": list(used), "per_step": step_summary(corrs, sources)}
  tmp = out_dir / f".correspondence.json.tmp{os.getpid()}"
  tmp.write_text(json.dumps(summary, indent=1))
  os.replace(tmp, out_dir / "correspondence.json")
  return summary
