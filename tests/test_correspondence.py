"""dift_correspondence vs a plain-loop transcription of spec 6.3 (ties and empty masks included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kadiff_jax.kadiff.correspondence import dift_correspondence, resize_bilinear, resize_nearest_mask


def spec_loop(f_ref, f_gen, mask, r, threshold=0.7):
  """Spec 6.3 written as loops, with torch's resampling as the reference for steps 1-2."""
  t = lambda a: torch.tensor(a).permute(2, 0, 1)[None]
  ref = F.interpolate(t(f_ref), size=(r, r), mode="bilinear", align_corners=False)[0].reshape(f_ref.shape[2], -1).T
  gen = F.interpolate(t(f_gen), size=(r, r), mode="bilinear", align_corners=False)[0].reshape(f_gen.shape[2], -1).T
  m = F.interpolate(torch.tensor(mask, dtype=torch.float32)[None, None], size=(r, r), mode="nearest")[0, 0]
  m = m.reshape(-1).numpy() > 0.5
  ref, gen = ref.numpy().astype(np.float64), gen.numpy().astype(np.float64)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  gen /= np.linalg.norm(gen, axis=1, keepdims=True)
  n = r * r
  kept = {}  # target -> (distance, source)
  for i in range(n):
    if not m[i]:
      continue
    d = 1.0 - gen @ ref[i]
    j = int(np.argmin(d))  # lowest j on ties
    if j not in kept or d[j] < kept[j][0]:  # strictly smaller: the earlier source wins ties
      kept[j] = (d[j], i)
  inject = np.zeros(n, bool)
  source = np.zeros(n, np.int64)
  for j, (d, i) in kept.items():
    source[j] = i
    inject[j] = d < threshold
  return source, inject, kept


@pytest.mark.parametrize("r", [32, 64])
@pytest.mark.parametrize("kind", ["random", "ties", "empty"])
def test_matches_spec_loop(r, kind):
  rng = np.random.default_rng(r)
  c = 24
  f_ref = rng.standard_normal((64, 64, c)).astype(np.float32)
  f_gen = rng.standard_normal((64, 64, c)).astype(np.float32)
  if kind == "ties":
    # unit vectors with four entries of +-0.5: every dot product is exact in any summation order, so
    # equal distances are truly equal; constant over 2x2 blocks, so the r=32 resampling is exact too
    book = np.zeros((6, c), np.float32)
    for k in range(6):
      book[k, rng.choice(c, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    up = lambda idx: np.repeat(np.repeat(book[idx], 2, 0), 2, 1)
    f_ref = up(rng.integers(0, 6, (32, 32)))
    f_gen = up(rng.integers(0, 6, (32, 32)))
  mask = np.zeros((256, 256), bool)
  if kind != "empty":
    mask[40:200, 60:230] = True
  src, inject, kept = spec_loop(f_ref, f_gen, mask, r)
  out = dift_correspondence(f_ref, f_gen, mask, r)
  got_inject = np.asarray(out.inject)
  if kind == "empty":
    assert not got_inject.any() and not inject.any()
    return
  # float32 (ours) vs float64 (loop) distances: compare only where the decision is not a float near-tie
  np.testing.assert_array_equal(got_inject, inject)
  matched = np.asarray(out.distance) < np.inf
  assert set(np.flatnonzero(matched)) == set(kept)
  np.testing.assert_array_equal(np.asarray(out.source)[inject], src[inject])
  if kind == "ties":
    assert len(kept) < mask.sum() // ((256 // r) ** 2)  # sources really did collide on targets


@pytest.mark.parametrize("kind", ["random", "ties", "empty", "full"])
def test_chunked_forward_match_equals_whole_matrix(kind):
  rng = np.random.default_rng(7)
  f_ref = rng.standard_normal((32, 32, 16)).astype(np.float32)
  f_gen = rng.standard_normal((32, 32, 16)).astype(np.float32)
  if kind == "ties":  # few distinct vectors: many exactly equal distances
    f_ref = np.eye(16, dtype=np.float32)[rng.integers(0, 3, (32, 32))]
    f_gen = np.eye(16, dtype=np.float32)[rng.integers(0, 3, (32, 32))]
  mask = np.zeros((128, 128), bool)
  if kind in ("random", "ties"):
    mask[10:90, 30:120] = True
    mask[100:, :20] = True
  elif kind == "full":
    mask[:] = True
  whole = dift_correspondence(f_ref, f_gen, mask, 32, chunk=None)
  for chunk in (64, 100, 1023):
    got = dift_correspondence(f_ref, f_gen, mask, 32, chunk=chunk)
    np.testing.assert_array_equal(np.asarray(got.inject), np.asarray(whole.inject))
    np.testing.assert_array_equal(np.asarray(got.source), np.asarray(whole.source))
    np.testing.assert_allclose(np.asarray(got.distance), np.asarray(whole.distance), rtol=0, atol=1e-6)
  assert np.asarray(whole.inject).any() == (kind != "empty")


def test_resampling_matches_torch():
  x = np.random.default_rng(0).standard_normal((64, 48, 5)).astype(np.float32)
  for size in (32, 20, 64, 100):
    ref = F.interpolate(torch.tensor(x).permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(resize_bilinear(x, size)), ref, atol=1e-5)
  m = np.random.default_rng(1).random((100, 90)) > 0.5
  ref = F.interpolate(torch.tensor(m, dtype=torch.float32)[None, None], size=(32, 32), mode="nearest")[0, 0] > 0.5
  np.testing.assert_array_equal(np.asarray(resize_nearest_mask(m, 32)), ref.numpy())
