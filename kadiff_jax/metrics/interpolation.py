"""Interpolation quality (spec 6, the release's utils): smoothness, consistency and the largest jump.

With d_k = LPIPS(x_k, x_{k+1}) over consecutive frames: smoothness = 1 - Gini(d), Gini(d) =
sum_i sum_j |d_i - d_j| / (2 n^2 mean(d)) (0 when n < 2); consistency = mean(d); max = max(d).
The release feeds LPIPS frames in [0, 1] normalised with ImageNet's mean and std (its quirk, kept as
the default: `imagenet_normalize`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def gini(values) -> float:
  d = np.asarray(values, np.float64)
  n = d.size
  if n < 2 or d.mean() == 0:
    return 0.0
  return float(np.abs(d[:, None] - d[None, :]).sum() / (2 * n * n * d.mean()))


def frame_distances(lpips_params: Any, frames: np.ndarray, imagenet_normalize: bool = True) -> np.ndarray:
  """LPIPS between consecutive frames [N, H, W, 3] (uint8 or floats in [0, 1]): [N - 1]."""
  from kadiff_jax.metrics import lpips
  x = np.asarray(frames, np.float32)
  x = x / 255.0 if np.asarray(frames).dtype == np.uint8 else x
  x = (x - IMAGENET_MEAN) / IMAGENET_STD if imagenet_normalize else 2 * x - 1
  return np.asarray(lpips.distance(lpips_params, x[:-1], x[1:]), np.float64)


def summary(distances) -> dict[str, float]:
  d = np.asarray(distances, np.float64)
  return {"smoothness": 1.0 - gini(d), "consistency": float(d.mean()), "max_lpips": float(d.max())}
