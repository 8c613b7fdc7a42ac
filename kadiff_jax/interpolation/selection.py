"""Dynamic coefficient selection (spec 5, the release's BetaPriorPipeline) as pure functions.

Exploration: start from the frames at 0, 0.5 and 1; repeatedly split the widest perceptual gap
(cosine distance of CLIP image features) at the Beta prior's midpoint in CDF space, refitting the
prior to the cumulative distances after every new frame. Selection: among the explored frames,
the increasing path from the first to the last with `frames` nodes whose edge distances spread
least (max - min), found by bisection on the spread with a window feasibility test.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np


def cosine_distances(features: np.ndarray) -> np.ndarray:
  """[m, m] 1 - cos between every pair of feature rows."""
  f = np.asarray(features, np.float64)
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  return 1.0 - f @ f.T


def fit_beta(xs: Sequence[float], gaps: Sequence[float]) -> tuple[float, float]:
  """(alpha, beta) of the Beta CDF fitted at xs to the normalised cumulative distances (0, d0/S, ..., 1)."""
  from scipy import optimize, stats
  cum = np.concatenate([[0.0], np.cumsum(np.asarray(gaps, np.float64))])
  cum = cum / cum[-1]
  (a, b), _ = optimize.curve_fit(lambda x, a, b: stats.beta.cdf(x, a, b), np.asarray(xs, np.float64), cum,
                                 p0=(1.0, 1.0), bounds=([1e-6, 1e-6], [np.inf, np.inf]))
  return float(a), float(b)


def next_coefficient(xs: Sequence[float], gaps: Sequence[float], alpha: float, beta: float,
                     uniform: bool = False) -> tuple[int, float]:
  """(j, t): the widest gap j (the first of equals) and the new coefficient inside it: the Beta prior's CDF
  midpoint of xs[j], xs[j+1] (uniform: their midpoint)."""
  from scipy import stats
  j = int(np.argmax(gaps))
  if uniform:
    return j, (xs[j] + xs[j + 1]) / 2
  cdf = lambda x: stats.beta.cdf(x, alpha, beta)
  return j, float(stats.beta.ppf((cdf(xs[j]) + cdf(xs[j + 1])) / 2, alpha, beta))


def _path_in_window(w: np.ndarray, n: int, lo: float, hi: float) -> list[int] | None:
  """An increasing path 0 = i_1 < ... < i_n = m-1 whose every edge weight lies in [lo, hi], or None."""
  m = w.shape[0]
  ok = (w >= lo) & (w <= hi)
  prev = np.full((n, m), -1)  # prev[k, j]: the node before j on a k+1-node path ending at j (reachable if != -1)
  reach = np.zeros((n, m), bool)
  reach[0, 0] = True
  for k in range(1, n):
    for j in range(1, m):
      for i in range(j):
        if reach[k - 1, i] and ok[i, j]:
          reach[k, j], prev[k, j] = True, i
          break
  if not reach[n - 1, m - 1]:
    return None
  path, j = [m - 1], m - 1
  for k in range(n - 1, 0, -1):
    j = int(prev[k, j])
    path.append(j)
  return path[::-1]


def min_spread_path(distances: np.ndarray, n: int, tol: float = 1e-6) -> list[int]:
  """The increasing path of n nodes from the first to the last explored frame minimising the spread of its edge
  distances (bisection on the spread D; D is feasible when some window [w, w + D], w over the distinct edge
  weights ascending, admits a path)."""
  d = np.asarray(distances, np.float64)
  m = d.shape[0]
  if not 2 <= n <= m:
    raise ValueError(f"frames={n}: expected 2..{m} (the explored frames)")
  weights = np.unique(d[np.triu_indices(m, 1)])
  top = weights.max()

  def feasible(spread):
    for w in weights:
      if w + spread > top and w != weights[0]:  # (the first window always counts: w0 + (top - w0) may round up)
        break
      path = _path_in_window(d, n, w, w + spread)
      if path is not None:
        return path
    return None

  lo, hi = 0.0, float(top - weights.min())
  best = feasible(hi)
  while hi - lo >= tol:
    mid = (lo + hi) / 2
    path = feasible(mid)
    if path is not None:
      hi, best = mid, path
    else:
      lo = mid
  return best


class Exploration(NamedTuple):
  coefficients: list[float]  # explored, ascending, 0 .. 1
  images: list                # one per coefficient
  chosen: list[int]           # indices of the selected frames (first and last included)
  alpha: float
  beta: float


def explore(frames_at: Callable[[float], tuple], features: Callable[[list], np.ndarray], *, frames: int,
            exploration: int = 16, alpha: float = 3.0, beta: float = 3.0, uniform: bool = False) -> Exploration:
  """Spec 5 over callables: `frames_at(t)` -> (A, M(t), B) images of one interpolation call; `features(images)` ->
  [k, D] image features. Returns the explored frames and the chosen path through them."""
  if exploration < 3 or frames > exploration:
    raise ValueError(f"exploration={exploration}, frames={frames}: expected 3 <= frames <= exploration")
  a, mid, b = frames_at(0.5)
  xs, images = [0.0, 0.5, 1.0], [a, mid, b]
  feats = list(np.asarray(features(images), np.float64))
  gap = lambda i, j: float(cosine_distances(np.stack([feats[i], feats[j]]))[0, 1])
  gaps = [gap(0, 1), gap(1, 2)]
  while len(xs) < exploration:
    j, t = next_coefficient(xs, gaps, alpha, beta, uniform)
    image = frames_at(t)[1]
    xs.insert(j + 1, t)
    images.insert(j + 1, image)
    feats.insert(j + 1, np.asarray(features([image]), np.float64)[0])
    gaps[j:j + 1] = [gap(j, j + 1), gap(j + 1, j + 2)]
    alpha, beta = (1.0, 1.0) if uniform else fit_beta(xs, gaps)
  chosen = min_spread_path(cosine_distances(np.stack(feats)), frames)
  return Exploration(xs, images, chosen, alpha, beta)
