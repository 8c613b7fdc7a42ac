"""`kadiff visualize correspondence`: generate one job and draw what the injection did.

Writes into the output folder:
  ours.png            the KA-Diff image
  matches.png         reference (mask outlined) | ours, matched pixels joined at one step and resolution,
                      titled with the step and grid
  distance.png        kept cosine distance per target, one panel per injecting step, with a colour bar
                      (red contour: below the threshold)
  injected.png        injected target positions per injecting step over the generated image
  cross_attention.png the reference with the chosen words' inversion cross-attention overlaid and a colour
                      bar, the mask outlined (left), and the mask itself (right)
  correspondence.json per-step counts (sources, matched, injected) and mean kept distance per resolution
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from kadiff_jax import image_io, plots
from kadiff_jax.kadiff import concept_mask as CM
from kadiff_jax.kadiff import correspondence as corr_lib
from kadiff_jax.kadiff import generate as G
from kadiff_jax.job import Job
from kadiff_jax.kadiff import jobs as kjobs
from kadiff_jax.kadiff import reference as R
from kadiff_jax.kadiff import visualize as V
from kadiff_jax.kadiff.options import KADiffOptions
from kadiff_jax import progress


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
  with progress.step("generating %s with KA-Diff, recording its correspondences (%d steps)", job.id, options.steps):
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
  shown = min(int(c.inject[step, 0].sum()), 96)
  write("matches.png", plots.titled(
      V.matches_image(ref_np, ours, c.source[step, 0], c.inject[step, 0], r, mask, size),
      f"DIFT matches at step {step}, {r}x{r} grid: reference (mask outlined) -> generated",
      f"{shown} of {int(c.inject[step, 0].sum())} injected targets drawn; colour = source position "
      f"(x red, y green); threshold {options.threshold}"))
  d = np.where(np.isfinite(c.distance[:, 0]), c.distance[:, 0], np.nan)
  write("distance.png", plots.heatmap_panels(
      [d[s].reshape(r, r) for s in steps], [f"step {s}" for s in steps],
      suptitle=f"Kept cosine distance per target, {r}x{r} grid (blank: no source; red: under threshold "
               f"{options.threshold})", colorbar="cosine distance", vmin=0.0,
      vmax=max(1.0, float(np.nanmax(d)) if np.isfinite(d).any() else 1.0),
      contours=[(np.isfinite(d[s]) & (np.nan_to_num(d[s], nan=9) < options.threshold)).reshape(r, r)
                for s in steps]))
  dim = (V.resize_square(ours, 128).astype(np.float64) * 0.5).astype(np.uint8)
  write("injected.png", plots.heatmap_panels(
      [c.inject[s, 0].reshape(r, r).astype(float) for s in steps],
      [f"step {s}: {int(c.inject[s, 0].sum())}" for s in steps], backgrounds=[dim] * len(steps),
      suptitle=f"Injected target positions per step, {r}x{r} grid (yellow), over the generated image",
      colorbar=None, vmin=0.0, vmax=1.0))
  positions, used = CM.subject_positions(models.tokenizer, job.ref_prompt, words)
  heat = CM.concept_heatmap(prepared.cross_attention, positions, size)
  mask_big = V.resize_square(mask.astype(np.uint8) * 255, size, nearest=True) > 127
  write("cross_attention.png", plots.overlay_figure(
      V.resize_square(ref_np, size), heat, mask=mask_big, colorbar="attention (normalised)",
      title=f"Inversion cross-attention of {', '.join(repr(w) for w in used)} (mask outlined)",
      side=mask_big.astype(float), side_title=f"concept mask ({mask_record.get('source', 'none')})"))
  summary = {"job": job.id, "prompt": job.prompt, "ref_prompt": job.ref_prompt, "mask": mask_record,
             "resolution": r, "step": step, "injecting_steps": [steps[0], steps[-1]], "threshold": options.threshold,
             "attention_words": list(used), "per_step": step_summary(corrs, sources)}
  tmp = out_dir / f".correspondence.json.tmp{os.getpid()}"
  tmp.write_text(json.dumps(summary, indent=1))
  os.replace(tmp, out_dir / "correspondence.json")
  return summary
