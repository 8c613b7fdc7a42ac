"""`kadiff evaluate interpolation`: methods x prompt pairs, scored for smoothness, consistency and fidelity.

Methods: `text` (the conditioning interpolated, attention plain: warm-up 0), `aid_outer` / `aid_inner`
(fused outer / fused inner attention interpolation) and `paid` (fused outer with the pair's guide
prompt; pairs without one are skipped). Per (pair, method) the frames, a strip and a JSON record
(`{pair}__{method}.json`, the resume rule of `kadiff_jax.records`) are written; scores: smoothness,
consistency and the largest jump from LPIPS over consecutive frames (spec 6; when LPIPS weights are
given), and CLIP fidelity: CLIP-T of A to prompt A, B to prompt B and, for PAID, of the middles to the
guide prompt, averaged.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import numpy as np
from PIL import Image

from kadiff_jax import image_io, records
from kadiff_jax.interpolation.cli import strip
from kadiff_jax.interpolation.pipeline import InterpolationOptions, Request, interpolate_many
from kadiff_jax.outputs import OutputDir, check_id

METHODS = ("text", "aid_outer", "aid_inner", "paid")
METHOD_NAMES = {"text": "text only", "aid_outer": "AID-O", "aid_inner": "AID-I", "paid": "PAID"}
METRICS = ("smoothness", "consistency", "max_lpips", "clip_fidelity")
METRIC_NAMES = {"smoothness": "smoothness", "consistency": "LPIPS mean", "max_lpips": "LPIPS max",
                "clip_fidelity": "CLIP fidelity"}


class Pair(NamedTuple):
  id: str
  prompt_a: str
  prompt_b: str
  guide_prompt: str | None = None
  seed: int = 0


def read_pairs(path: str | Path) -> list[Pair]:
  """JSONL of {prompt_a, prompt_b, guide_prompt?, id?, seed?}, or tab-separated lines `A<TAB>B[<TAB>guide]`."""
  pairs = []
  for n, line in enumerate(Path(path).read_text().splitlines(), 1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    try:
      if line.lstrip().startswith("{"):
        d = json.loads(line)
        pair = Pair(str(d.get("id", f"pair{n:03d}")), d["prompt_a"], d["prompt_b"], d.get("guide_prompt"),
                    int(d.get("seed", 0)))
      else:
        cols = line.split("\t")
        if len(cols) not in (2, 3):
          raise ValueError(f"expected 2 or 3 tab-separated columns, got {len(cols)}")
        pair = Pair(f"pair{n:03d}", cols[0].strip(), cols[1].strip(), cols[2].strip() if len(cols) == 3 else None)
    except (KeyError, ValueError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}:{n}: {e if not isinstance(e, KeyError) else f'missing field {e}'}") from None
    check_id(pair.id, f"{path}:{n}")
    pairs.append(pair)
  if not pairs:
    raise ValueError(f"{path}: no prompt pairs")
  return pairs


def method_options(method: str, base: InterpolationOptions) -> InterpolationOptions:
  if method == "text":
    return dataclasses.replace(base, warmup_steps=0)
  if method == "aid_inner":
    return dataclasses.replace(base, variant="fused_inner")
  return dataclasses.replace(base, variant="fused_outer")


def run(models, pairs: Sequence[Pair], methods: Sequence[str], coefs: Sequence[float], options: InterpolationOptions,
        out_dir, *, clip, lpips_params=None, overwrite: bool = False) -> list[dict]:
  """Generates what is missing (resuming by record), scores every (pair, method); returns the score rows."""
  from kadiff_jax.metrics import interpolation as metrics
  out = OutputDir(out_dir)
  jobs = [(p, m) for p in pairs for m in methods if m != "paid" or p.guide_prompt]
  ids = [f"{p.id}__{m}" for p, m in jobs]
  inputs = [{"model": str(models.source), "family": models.family.name, "method": m, "prompt_a": p.prompt_a,
             "prompt_b": p.prompt_b, "guide_prompt": p.guide_prompt if m == "paid" else None, "seed": p.seed,
             "coefficients": list(coefs), "options": dataclasses.asdict(method_options(m, options))}
            for p, m in jobs]
  plan = records.plan_resume(out, ids, inputs, overwrite=overwrite)
  frames_of: dict[int, np.ndarray] = {}
  per_call = len(jax.devices())  # one interpolation per device per call (whole frame groups per device)
  for method in methods:  # one batched call per method and chunk: the options are the method's
    todo = [n for n in plan.todo if jobs[n][1] == method]
    for start in range(0, len(todo), per_call):
      chunk = todo[start:start + per_call]
      requests = [Request(jobs[n][0].prompt_a, jobs[n][0].prompt_b, inputs[n]["guide_prompt"], seed=jobs[n][0].seed)
                  for n in chunk]
      for n, result in zip(chunk, interpolate_many(models, requests, coefs, method_options(method, options))):
        job_id = ids[n]
        names = [f"{job_id}_frame_{k:02d}.png" for k in range(len(coefs) + 2)]
        for name, im in zip(names, result.images):
          out.write_bytes(name, image_io.png_bytes(im))
        out.write_bytes(f"{job_id}_strip.png", image_io.png_bytes(strip(result.images, result.coefficients)))
        out.write_text(f"{job_id}.json", json.dumps(records.record(
            job_id, inputs[n], outputs={"strip": f"{job_id}_strip.png", **{f"frame_{k:02d}": f for k, f in
                                                                          enumerate(names)}}), indent=1))
        frames_of[n] = result.images
  rows = []
  for n, ((pair, method), job_id) in enumerate(zip(jobs, ids)):
    names = [f"{job_id}_frame_{k:02d}.png" for k in range(len(coefs) + 2)]
    frames = frames_of.get(n)
    if frames is None:
      frames = np.stack([np.asarray(Image.open(io.BytesIO(out.read_bytes(f))).convert("RGB")) for f in names])
    targets = [pair.prompt_a] + ([pair.guide_prompt] * len(coefs) if method == "paid" else []) + [pair.prompt_b]
    chosen = [0] + (list(range(1, len(coefs) + 1)) if method == "paid" else []) + [len(frames) - 1]
    row = {"pair": pair.id, "method": method,
           "clip_fidelity": float(np.mean(clip.clip_t([frames[k] for k in chosen], targets)))}
    if lpips_params is not None:
      row.update(metrics.summary(metrics.frame_distances(lpips_params, frames)))
    rows.append(row)
  return rows


def write_reports(rows: Sequence[dict], out_dir, *, lpips_note: str) -> dict[str, str]:
  """scores.csv, summary.csv, summary.md and chart.png in out_dir."""
  from kadiff_jax.evaluation import report
  from kadiff_jax.plots import grouped_bars
  out = Path(out_dir)
  present = [k for k in METRICS if rows and all(k in r for r in rows)]
  report.write_csv(out / "scores.csv", rows, ["pair", "method", *present])
  table = report.summary(rows, present)
  report.write_csv(out / "summary.csv", [{"method": m, **{k: v[0] for k, v in s.items()}} for m, s in table.items()],
                   ["method", *present])
  lines = ["# Interpolation evaluation", "", f"{len({r['pair'] for r in rows})} prompt pair(s); {lpips_note}", "",
           "| method | " + " | ".join(METRIC_NAMES[k] for k in present) + " |",
           "|---|" + "---|" * len(present)]
  for m, s in table.items():
    lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(f"{s[k][0]:.4f} ± {s[k][1]:.4f}" for k in present)
                 + " |")
  (out / "summary.md").write_text("\n".join(lines) + "\n")
  image_io.write_png(out / "chart.png", grouped_bars(table, present, title="Interpolation evaluation (mean ± s.e.)",
                                                     ylabel="score", metric_names=METRIC_NAMES,
                                                     method_names=METHOD_NAMES))
  return {"scores": str(out / "scores.csv"), "summary": str(out / "summary.csv"), "chart": str(out / "chart.png")}
