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
from PIL import Image, ImageDraw

METRICS = ("clip_t", "clip_i", "dino")
METRIC_NAMES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO"}
METHOD_NAMES = {"kadiff": "KA-Diff (ours)", "baseline": "IP-Adapter", "masactrl": "MasaCtrl-style"}
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


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


def summary(rows: Sequence[dict]) -> dict[str, dict[str, tuple[float, float]]]:
  """{method: {metric: (mean, standard error)}} over all images, methods in first-seen order."""
  by_method: dict[str, list[dict]] = {}
  for r in rows:
    by_method.setdefault(r["method"], []).append(r)
  return {m: {k: _mean_sem([r[k] for r in rs]) for k in METRICS} for m, rs in by_method.items()}


def markdown(rows: Sequence[dict], title: str = "DreamBooth evaluation") -> str:
  table = summary(rows)
  subjects = sorted({r["subject"] for r in rows})
  n = {m: sum(r["method"] == m for r in rows) for m in table}
  lines = [f"# {title}", "",
           f"{len(subjects)} subjects, {len({(r['subject'], r['prompt_index']) for r in rows})} subject-prompt "
           f"pairs, {len({r['seed'] for r in rows})} seed(s). Mean ± standard error over images. "
           "CLIP-T = 2.5·max(cos(image, prompt), 0) with CLIP ViT-B/32; CLIP-I and DINO = cosine with the "
           "subject's reference image (CLIP ViT-B/32, DINO ViT-S/16).", "",
           "| method | images | " + " | ".join(METRIC_NAMES[k] for k in METRICS) + " |",
           "|---|---|" + "---|" * len(METRICS)]
  for m, stats in table.items():
    cells = " | ".join(f"{stats[k][0]:.4f} ± {stats[k][1]:.4f}" for k in METRICS)
    lines.append(f"| {METHOD_NAMES.get(m, m)} | {n[m]} | {cells} |")
  return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[dict], width: int = 720, height: int = 360) -> np.ndarray:
  """Grouped bars: one group per metric, one bar per method (mean, with a standard-error whisker)."""
  table = summary(rows)
  methods = list(table)
  img = Image.new("RGB", (width, height), (255, 255, 255))
  d = ImageDraw.Draw(img)
  left, right, top, bottom = 50, width - 20, 30, height - 60
  top_value = max(1.0, max(s[k][0] + s[k][1] for s in table.values() for k in METRICS))
  lo_value = min(0.0, min(s[k][0] - s[k][1] for s in table.values() for k in METRICS))
  y_of = lambda v: bottom - (v - lo_value) / (top_value - lo_value) * (bottom - top)
  for frac in np.linspace(0, 1, 6):  # axis and grid
    v = lo_value + frac * (top_value - lo_value)
    d.line([(left, y_of(v)), (right, y_of(v))], fill=(225, 225, 225))
    d.text((4, y_of(v) - 6), f"{v:.2f}", fill=(0, 0, 0))
  d.line([(left, y_of(0)), (right, y_of(0))], fill=(0, 0, 0))
  group_w = (right - left) / len(METRICS)
  bar_w = group_w * 0.8 / max(len(methods), 1)
  for g, k in enumerate(METRICS):
    x0 = left + g * group_w + group_w * 0.1
    for b, m in enumerate(methods):
      mean, sem = table[m][k]
      x = x0 + b * bar_w
      colour = _COLOURS[b % len(_COLOURS)]
      d.rectangle([x, min(y_of(mean), y_of(0)), x + bar_w - 3, max(y_of(mean), y_of(0))], fill=colour)
      cx = x + (bar_w - 3) / 2
      d.line([(cx, y_of(mean - sem)), (cx, y_of(mean + sem))], fill=(0, 0, 0), width=1)
      d.text((x, y_of(max(mean, 0)) - 12), f"{mean:.3f}", fill=(0, 0, 0))
    d.text((x0 + group_w * 0.3, bottom + 6), METRIC_NAMES[k], fill=(0, 0, 0))
  for b, m in enumerate(methods):  # legend
    x = left + b * 170
    d.rectangle([x, height - 24, x + 12, height - 12], fill=_COLOURS[b % len(_COLOURS)])
    d.text((x + 18, height - 25), METHOD_NAMES.get(m, m), fill=(0, 0, 0))
  return np.asarray(img)


PER_IMAGE_FIELDS = ("id", "subject", "cls", "prompt_index", "prompt", "seed", "method", "image", "clip_t", "clip_i",
                    "dino")
PER_SUBJECT_FIELDS = ("subject", "class", "method", "images", "clip_t", "clip_i", "dino")


def write_reports(rows: Sequence[dict], out_dir: str | Path) -> dict[str, Path]:
  """per_image.csv, per_subject.csv, summary.md and chart.png in out_dir."""
  out_dir = Path(out_dir)
  if not rows:
    raise ValueError("no evaluated images to report")
  paths = {"per_image": out_dir / "per_image.csv", "per_subject": out_dir / "per_subject.csv",
           "summary": out_dir / "summary.md", "chart": out_dir / "chart.png"}
  write_csv(paths["per_image"], rows, PER_IMAGE_FIELDS)
  write_csv(paths["per_subject"], per_subject(rows), PER_SUBJECT_FIELDS)
  _write_atomic(paths["summary"], markdown(rows).encode())
  buf = io.BytesIO()
  Image.fromarray(bar_chart(rows)).save(buf, format="PNG")
  _write_atomic(paths["chart"], buf.getvalue())
  return paths
