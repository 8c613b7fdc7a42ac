"""Choosing interpolation coefficients (spec 5): the Beta prior, and its fit to observed frame distances.

Pure functions over numbers (float64, as the release computes them with scipy).
"""

from __future__ import annotations

from typing import Sequence



def beta_prior(frames: int, alpha: float = 6.0, beta: float = 3.0) -> list[float]:
  """The middle coefficients of `frames` frames (endpoints excluded): t_k = F^-1(k / (frames - 1); alpha, beta),
  k = 1 .. frames - 2, with F the Beta CDF (alpha = beta = 1: evenly spaced)."""
  from scipy import stats
  if frames < 3:
    raise ValueError(f"frames={frames}: expected at least 3 (two endpoints and a middle)")
  if alpha <= 0 or beta <= 0:
    raise ValueError(f"alpha={alpha}, beta={beta}: expected positive Beta parameters")
  return [float(stats.beta.ppf(k / (frames - 1), alpha, beta)) for k in range(1, frames - 1)]


def check_coefficients(coefs: Sequence[float]) -> list[float]:
  """Middle coefficients as given (--coefs): each strictly inside (0, 1)."""
  out = [float(c) for c in coefs]
  if not out:
    raise ValueError("coefs: expected at least one coefficient")
  bad = [c for c in out if not 0 < c < 1]
  if bad:
    raise ValueError(f"coefs {bad}: each must lie strictly between 0 (A) and 1 (B)")
  return out
