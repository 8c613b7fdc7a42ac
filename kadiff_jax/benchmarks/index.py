"""ScaNN vs exact search on random unit vectors: build time, batched QPS, recall@10.

Both sides run in the same process on the same vectors and queries; the exact
search is also the ground truth for recall. Prints one line per size and a
JSON object on the last line.
"""

from __future__ import annotations

import json
import time

import numpy as np


def _unit(rng, n: int, dim: int) -> np.ndarray:
  v = rng.standard_normal((n, dim), dtype=np.float32)
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def _clustered(rng, n: int, dim: int, centers: np.ndarray, spread: float = 0.35) -> np.ndarray:
  """Unit vectors around random centres: neighbourhoods like real embeddings have."""
  v = centers[rng.integers(0, len(centers), n)] + spread * _unit(rng, n, dim)
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def _timed(fn, repeats: int = 1):
  best, out = float("inf"), None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return out, best


def run(sizes=(100_000, 1_000_000), *, dim: int = 384, queries: int = 1000, k: int = 10, seed: int = 0,
        params=None, data: str = "uniform") -> dict:
  """`data`: "uniform" (random unit vectors: the hardest case, no structure) or "clustered"
  (4096 random centres plus noise)."""
  from retrieval import index as index_lib
  params = params or index_lib.ScannParams()
  if data not in ("uniform", "clustered"):
    raise ValueError(f"data = {data!r}; expected 'uniform' or 'clustered'")
  rng = np.random.default_rng(seed)
  centers = _unit(rng, 4096, dim)
  make = (lambda m: _unit(rng, m, dim)) if data == "uniform" else (lambda m: _clustered(rng, m, dim, centers))
  q = make(queries)
  out: dict = {"dim": dim, "queries": queries, "k": k, "data": data}
  for n in sizes:
    db = make(n)
    docids = [str(i) for i in range(n)]
    exact, exact_build = _timed(lambda: index_lib.ExactIndex(db, docids))
    (truth, _), exact_s = _timed(lambda: exact.search(q, k))
    scann, scann_build = _timed(lambda: index_lib.ScannIndex(db, docids, params))
    scann.search(q[:8], k)  # warm-up
    row = {"exact": {"build_s": round(exact_build, 3), "qps": round(queries / exact_s, 1), "recall@10": 1.0},
           "scann": {"build_s": round(scann_build, 2), "config": scann.config, "operating_points": []}}
    leaves = scann.config.get("num_leaves")
    # The built setting, then more leaves / re-ordering: same index, settings changed per search call.
    points = [(None, None)] + ([(leaves // 4, 500), (leaves // 2, 1000)] if leaves else [])
    for to_search, reorder in points:
      (got, _), scann_s = _timed(lambda: scann.search(q, k, leaves_to_search=to_search, reorder=reorder),
                                 repeats=3)
      recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
      point = {"leaves_to_search": to_search or scann.config.get("num_leaves_to_search"),
               "reorder": reorder or scann.config.get("reorder"), "qps": round(queries / scann_s, 1),
               "recall@10": round(recall, 4), "qps_vs_exact": round(exact_s / scann_s, 1)}
      row["scann"]["operating_points"].append(point)
      print(f"{data} n={n}: exact {row['exact']['qps']} q/s | scann {point['qps']} q/s (x{point['qps_vs_exact']}), "
            f"recall@{k} {recall:.4f} [leaves {point['leaves_to_search']}, reorder {point['reorder']}], "
            f"build {scann_build:.1f}s ({scann.config['kind']})", flush=True)
    out[str(n)] = row
    del db, exact, scann
  return out


def main(args) -> None:
  sizes = tuple(int(float(s)) for s in args.sizes.split(","))
  print(json.dumps(run(sizes, dim=args.dim, queries=args.queries, data=args.data)))
