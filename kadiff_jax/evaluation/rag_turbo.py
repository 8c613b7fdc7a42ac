"""RAG-Turbo evaluation (HSPACE_SPEC §8): CLIP score of one-step generations, plain vs slerp vs adapter.

For every prompt and seed it generates the plain one-step image (SD-Turbo),
the training-free slerp injection, and, given a trained adapter, the
adapter's, each as `{method}/{prompt#}_s{seed}.png` with its record (so a
rerun resumes), and scores each image with CLIP: the plain cosine of image
and prompt embeddings, as the paper's Table 1 (≈0.32 for SD-Turbo with
OpenCLIP ViT-bigG-14), with our Flax CLIP on any CLIPModel folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from kadiff_jax import records
from kadiff_jax.evaluation.report import _mean_sem, _write_atomic, write_csv
from kadiff_jax.job import Job
from kadiff_jax.outputs import OutputDir
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.ragturbo import pipeline as rt

FIELDS = ("prompt_index", "prompt", "seed", "method", "clip", "retrieved")


def _plain(models, jobs: Sequence[Job], options, out: Path, overwrite: bool) -> None:
  inputs = [t2i.job_inputs(j, models, options) for j in jobs]
  plan = records.plan_resume(OutputDir(out), [j.id for j in jobs], inputs, overwrite=overwrite)
  todo = [jobs[i] for i in plan.todo]
  if todo:
    t2i.generate(models, todo, options, out, progress=False,
                 records={j.id: records.record(j.id, inputs[i], prompt=j.prompt, seed=j.seed,
                                               outputs={"image": f"{j.id}.png"}) for i, j in zip(plan.todo, todo)})


def run(models, database, prompts: Sequence[str], seeds: Sequence[int], options: t2i.GenerationOptions,
        rag: rt.RagTurboOptions, out, *, clip, adapter: str | None = None, overwrite: bool = False) -> list[dict]:
  """Generates and scores every (prompt, seed, method); returns the score rows."""
  out = Path(out)
  jobs = [dataclasses.replace(Job.numbered(p, s, 0), id=f"p{i:04d}_s{s}") for i, p in enumerate(prompts)
          for s in seeds]
  methods = {"sd-turbo": None, "slerp": rag}
  if adapter:
    methods["adapter"] = dataclasses.replace(rag, hspace=f"adapter:{adapter}")
  rows = []
  for method, opts in methods.items():
    folder = out / method
    neighbours = {}
    if opts is None:
      _plain(models, jobs, options, folder, overwrite)
    else:
      _, neighbours = rt.write_jobs(models, jobs, options, opts, database, folder, overwrite=overwrite,
                                    progress=False)
    scores = clip.image_embeds([folder / f"{j.id}.png" for j in jobs]) * clip.text_embeds([j.prompt for j in jobs])
    for j, score in zip(jobs, scores.sum(-1)):
      rows.append({"prompt_index": j.id.split("_")[0][1:], "prompt": j.prompt, "seed": j.seed, "method": method,
                   "clip": round(float(score), 6),
                   "retrieved": ";".join(n.id for n in neighbours.get(j.id, []))})
  return rows


def write_reports(rows: Sequence[dict], out, *, clip_name: str) -> dict:
  out = Path(out)
  write_csv(out / "scores.csv", rows, FIELDS)
  lines = [f"# RAG-Turbo: CLIP score ({clip_name}, plain cosine)", "", "| method | images | CLIP ↑ |",
           "|---|---|---|"]
  summary = {}
  for method in dict.fromkeys(r["method"] for r in rows):
    values = [float(r["clip"]) for r in rows if r["method"] == method]
    mean, sem = _mean_sem(values)
    summary[method] = round(mean, 6)
    lines.append(f"| {method} | {len(values)} | {mean:.4f} ± {sem:.4f} |")
  _write_atomic(out / "summary.md", ("\n".join(lines) + "\n").encode())
  _write_atomic(out / "summary.json", json.dumps(summary, indent=1).encode())
  return summary
