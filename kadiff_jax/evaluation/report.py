"""Evaluation reports: per-image and per-subject CSV, a Markdown summary table and a bar chart PNG.

Every file is written next to its destination and renamed into place.
Summary numbers are means over images with their standard error (std / sqrt(n)).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

METRICS = ("clip_t", "clip_i", "dino")
METRIC_NAMES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO"}
METHOD_NAMES = {"kadiff": "KA-Diff (ours)", "baseline": "IP-Adapter", "masactrl": "MasaCtrl-style"}


def _write_atomic(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_csv(path: str | Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
  _write_atomic(Path(path), buf.getvalue().encode())


def _mean_sem(values) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  sem = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
  return float(a.mean()), sem


def per_subject(rows: Sequence[dict]) -> list[dict]:
  """Mean metrics per (subject, method)."""
  groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
  for r in rows:
    groups[(r["subject"], r["method"])].append(r)
  out = []
  for (subject, method), rs in sorted(groups.items()):
    out.append({"subject": subject, "class": rs[0]["cls"], "method": method, "images": len(rs),
                **{m: float(np.mean([r[m] for r in rs])) for m in METRICS}})
  return out


def summary(rows: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict[str, dict[str, tuple[float, float]]]:
  """{method: {metric: (mean, standard error)}} over all rows, methods in first-seen order."""
  by_method: dict[str, list[dict]] = {}
  for r in rows:
    by_method.setdefault(r["method"], []).append(r)
  return {m: {k: _mean_sem([r[k] for r in rs]) for k in metrics} for m, rs in by_method.items()}


def markdown(rows: Sequence[dict], title: str = "DreamBooth evaluation", *, clip: str = "openai/clip-vit-base-patch32",
             dino: str = "facebook/dino-vits16") -> str:
  """The summary table; `clip` and `dino` name the metric models that scored it."""
  table = summary(rows)
  subjects = sorted({r["subject"] for r in rows})
  n = {m: sum(r["method"] == m for r in rows) for m in table}
  lines = [f"# {title}", "",
           f"{len(subjects)} subjects, {len({(r['subject'], r['prompt_index']) for r in rows})} subject-prompt "
           f"pairs, {len({r['seed'] for r in rows})} seed(s). Mean ± standard error over images. "
           f"CLIP-T = 2.5·max(cos(image, prompt), 0) with CLIP `{clip}`; CLIP-I and DINO = cosine with the "
           f"subject's reference image (CLIP `{clip}`, DINO `{dino}`)."
           + (" These are random tiny models: the numbers exercise the pipeline and mean nothing."
              if "tiny" in (clip, dino) else ""), "",
           "| method | images | " + " | ".join(METRIC_NAMES[k] for k in METRICS) + " |",
           "|---|---|" + "---|" * len(METRICS)]
  for m, stats in table.items():
    cells = " | ".join(f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}" for k in METRICS)
    lines.append(f"| {METHOD_NAMES.get(m, m)} | {n[m]} | {cells} |")
  return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[dict], title: str = "DreamBooth evaluation") -> np.ndarray:
  """Grouped bars: one group per metric, one bar per method (mean, with a standard-error whisker)."""
  from kadiff_jax import plots
  subjects = len({r["subject"] for r in rows})
  return plots.grouped_bars(summary(rows), METRICS, title=f"{title}: {subjects} subject(s), {len(rows)} images",
                            ylabel="score (mean ± standard error)", metric_names=METRIC_NAMES,
                            method_names=METHOD_NAMES)


PER_IMAGE_FIELDS = ("id", "subject", "cls", "prompt_index", "prompt", "seed", "method", "image", "clip_t", "clip_i",
                    "dino")
PER_SUBJECT_FIELDS = ("subject", "class", "method", "images", "clip_t", "clip_i", "dino")


def write_reports(rows: Sequence[dict], out_dir: str | Path, *, clip: str = "openai/clip-vit-base-patch32",
                  dino: str = "facebook/dino-vits16") -> dict[str, Path]:
  """per_image.csv, per_subject.csv, summary.md and chart.png in out_dir."""
  out_dir = Path(out_dir)
  if not rows:
    raise ValueError("no evaluated images to report")
  paths = {"per_image": out_dir / "per_image.csv", "per_subject": out_dir / "per_subject.csv",
           "summary": out_dir / "summary.md", "chart": out_dir / "chart.png"}
  write_csv(paths["per_image"], rows, PER_IMAGE_FIELDS)
  write_csv(paths["per_subject"], per_subject(rows), PER_SUBJECT_FIELDS)
  _write_atomic(paths["summary"], markdown(rows, clip=clip, dino=dino).encode())
  buf = io.BytesIO()
  Image.fromarray(bar_chart(rows)).save(buf, format="PNG")
  _write_atomic(paths["chart"], buf.getvalue())
  return paths
