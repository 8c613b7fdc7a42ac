"""Dense DIFT correspondence between the reference and the generated image (spec 6.3).

One pure, jittable function with static shapes: resample both feature maps to
r x r (bilinear, align_corners=False, no antialias), pick masked reference
pixels as sources, match every source to its nearest target by cosine
distance, keep the best source per target (segment-min), and inject targets
whose kept distance is below the threshold. The reference release does the
reverse step with a Python loop over source pixels; here it is two
segment-mins.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Correspondence(NamedTuple):
  source: jax.Array    # [r*r] int32: matched reference pixel for each target (0 where unmatched)
  inject: jax.Array    # [r*r] bool: matched and distance < threshold
  distance: jax.Array  # [r*r] float32: kept distance (inf where unmatched)


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bilinear resize (align_corners=False, no antialias) along one axis."""
  scale = np.float32(n_in / n_out)  # torch computes source coordinates in float32
  src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), i0] += 1 - lam
  m[np.arange(n_out), i1] += lam
  return m


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """[h, w, C] -> [size, size, C] with torch `F.interpolate(mode='bilinear', align_corners=False)`."""
  if x.shape[:2] == (size, size):
    return x
  mh = jnp.asarray(bilinear_matrix(x.shape[0], size))
  mw = jnp.asarray(bilinear_matrix(x.shape[1], size))
  return jnp.einsum("ph,hwc,qw->pqc", mh, x.astype(jnp.float32), mw)


def resize_nearest_mask(mask: jax.Array, size: int) -> jax.Array:
  """[H, W] -> [size, size] with torch's legacy nearest (src = floor(dst * in / out))."""
  hi = (np.arange(size) * mask.shape[0]) // size
  wi = (np.arange(size) * mask.shape[1]) // size
  return mask[hi][:, wi]


def dift_correspondence(ref_features: jax.Array, gen_features: jax.Array, mask: jax.Array, r: int,
                        threshold: float = 0.7) -> Correspondence:
  """Spec 6.3 for one image pair at resolution r.

  ref_features, gen_features: [h, w, C] DIFT maps; mask: [H, W] bool (reference foreground).
  """
  n = r * r
  f_ref = resize_bilinear(ref_features, r).reshape(n, -1)
  f_gen = resize_bilinear(gen_features, r).reshape(n, -1)
  sources = resize_nearest_mask(mask, r).reshape(n)
  unit = lambda f: f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-8)  # torch cosine_similarity eps
  dist = 1.0 - unit(f_ref) @ unit(f_gen).T  # [n_src, n_tgt]
  target = jnp.argmin(dist, axis=1)  # forward match; ties -> lowest target index
  d_min = jnp.where(sources, jnp.take_along_axis(dist, target[:, None], axis=1)[:, 0], jnp.inf)
  seg = jnp.where(sources, target, n)  # non-sources fall in an extra, discarded segment
  best = jax.ops.segment_min(d_min, seg, num_segments=n + 1)[:n]
  is_best = sources & (d_min == best[jnp.minimum(seg, n - 1)])
  first = jax.ops.segment_min(jnp.where(is_best, jnp.arange(n), n), seg, num_segments=n + 1)[:n]
  matched = first < n
  return Correspondence(jnp.where(matched, first, 0).astype(jnp.int32), matched & (best < threshold),
                        jnp.where(matched, best, jnp.inf).astype(jnp.float32))


def batched_correspondence(ref_features, gen_features, masks, r: int, threshold: float = 0.7) -> Correspondence:
  """`dift_correspondence` over a leading batch axis of jobs."""
  return jax.vmap(lambda a, b, m: dift_correspondence(a, b, m, r, threshold))(ref_features, gen_features, masks)
