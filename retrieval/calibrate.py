"""The no-match threshold, chosen from measured scores: top-1 dense scores of on-topic and off-topic queries.

`kadiff run` calls a query whose best dense score is under `min_score` a
weak match (skipped by default). The threshold is measured, not guessed:
`kadiff retrieve calibrate` embeds queries that have a right answer in the
index (DreamBooth's by default) and queries that have none (the built-in
off-topic list, or a file), reports both distributions of the top-1 score,
and picks the threshold that misclassifies the fewest queries, the midpoint
of the widest such gap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

OFF_TOPIC = Path(__file__).parent / "data" / "off_topic_queries.txt"


def off_topic_queries(path: str | Path | None = None) -> list[str]:
  """One query a line (the built-in list when `path` is None)."""
  lines = Path(path or OFF_TOPIC).read_text().splitlines()
  return [line.strip() for line in lines if line.strip()]


def top_scores(retriever, queries: Sequence[str]) -> np.ndarray:
  """The best dense score of each query (no re-ranking)."""
  return np.asarray([cands[0].score for _, cands in retriever.search(list(queries), k=1)], np.float64)


def distribution(scores: np.ndarray) -> dict[str, float]:
  q = np.percentile(scores, [0, 5, 50, 95, 100])
  return {"n": int(len(scores)), **{k: round(float(v), 4) for k, v in zip(("min", "p5", "median", "p95", "max"), q)}}


def choose_threshold(on_topic: np.ndarray, off_topic: np.ndarray) -> tuple[float, int]:
  """(threshold, errors): the cut with the fewest on-topic scores under it plus off-topic scores at or over it,
  at the middle of the widest gap among such cuts."""
  values = np.unique(np.concatenate([on_topic, off_topic]))
  cuts = np.concatenate([[values[0] - 1e-3], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-3]])
  errors = np.array([(on_topic < c).sum() + (off_topic >= c).sum() for c in cuts])
  best = errors.min()
  # among the best cuts, the one in the widest gap between neighbouring scores
  gaps = [(values[i] - values[i - 1]) if 0 < i < len(values) else 0.0 for i in range(len(cuts))]
  pick = max((i for i in range(len(cuts)) if errors[i] == best), key=lambda i: gaps[i])
  return float(cuts[pick]), int(best)


def calibrate(retriever, on_topic: Sequence[str], off_topic: Sequence[str]) -> dict:
  on, off = top_scores(retriever, on_topic), top_scores(retriever, off_topic)
  threshold, errors = choose_threshold(on, off)
  lowest = [(on_topic[i], round(float(on[i]), 4)) for i in np.argsort(on)[:3]]
  highest = [(off_topic[i], round(float(off[i]), 4)) for i in np.argsort(-off)[:3]]
  return {"on_topic": distribution(on), "off_topic": distribution(off), "threshold": round(threshold, 4),
          "misclassified": errors, "on_topic_under": int((on < threshold).sum()),
          "off_topic_over": int((off >= threshold).sum()), "on_topic_lowest": lowest,
          "off_topic_highest": highest}
