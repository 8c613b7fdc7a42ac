"""Dense DIFT correspondence between the reference and the generated image (spec 6.3).

One pure, jittable function with static shapes: resample both feature maps to
r x r (bilinear, align_corners=False, no antialias), pick masked reference
pixels as sources, match every source to its nearest target by cosine
distance (source rows only, a chunk at a time), keep the best source per
target (segment-min), and inject targets whose kept distance is below the
threshold. The reference release does this with a Python loop over source
pixels; here it is chunked matrix products and two segment-mins.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.programs import serializable


@serializable
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
  rows = jnp.einsum("ph,hwc->pwc", mh, x.astype(jnp.float32))  # one axis at a time: 3x faster than one einsum
  return jnp.einsum("qw,pwc->pqc", mw, rows)


def resize_nearest_mask(mask: jax.Array, size: int) -> jax.Array:
  """[H, W] -> [size, size] with torch's legacy nearest (src = floor(dst * in / out))."""
  hi = (np.arange(size) * mask.shape[0]) // size
  wi = (np.arange(size) * mask.shape[1]) // size
  return mask[hi][:, wi]


def forward_match(ref_unit: jax.Array, gen_unit: jax.Array, sources: jax.Array, chunk: int | None = 512):
  """Spec 6.3 step 4: (target [n] int32, distance [n] float32) of each source's nearest target.

  With `chunk`, only source rows are computed: sources are moved to the front (raster order kept) and
  a loop of dynamic length takes `chunk` of them at a time, so the work and memory scale with the
  mask (n_sources x n, never n x n). Non-sources get target 0 and distance +inf.
  """
  n = ref_unit.shape[0]
  if chunk is None or chunk >= n:
    dist = 1.0 - ref_unit @ gen_unit.T  # [n_src, n_tgt]
    target = jnp.argmin(dist, axis=1)  # ties -> lowest target index
    d_min = jnp.take_along_axis(dist, target[:, None], axis=1)[:, 0]
    return jnp.where(sources, target, 0).astype(jnp.int32), jnp.where(sources, d_min, jnp.inf)
  order = jnp.argsort(jnp.logical_not(sources).astype(jnp.int32), stable=True)  # sources first
  padded = -(-n // chunk) * chunk
  ref_sorted = jnp.zeros((padded, ref_unit.shape[1]), ref_unit.dtype).at[:n].set(ref_unit[order])

  def body(i, carry):
    target, d_min = carry
    rows = jax.lax.dynamic_slice_in_dim(ref_sorted, i * chunk, chunk)
    dist = 1.0 - rows @ gen_unit.T  # [chunk, n_tgt]
    t = jnp.argmin(dist, axis=1)
    d = jnp.take_along_axis(dist, t[:, None], axis=1)[:, 0]
    return (jax.lax.dynamic_update_slice_in_dim(target, t.astype(jnp.int32), i * chunk, 0),
            jax.lax.dynamic_update_slice_in_dim(d_min, d, i * chunk, 0))

  steps = (jnp.sum(sources) + chunk - 1) // chunk
  target, d_min = jax.lax.fori_loop(0, steps, body, (jnp.zeros(padded, jnp.int32),
                                                     jnp.full(padded, jnp.inf, jnp.float32)))
  target = jnp.zeros(n, jnp.int32).at[order].set(target[:n])
  d_min = jnp.full(n, jnp.inf, jnp.float32).at[order].set(d_min[:n])
  return jnp.where(sources, target, 0), jnp.where(sources, d_min, jnp.inf)


def dift_correspondence(ref_features: jax.Array, gen_features: jax.Array, mask: jax.Array, r: int,
                        threshold: float = 0.7, chunk: int | None = 512) -> Correspondence:
  """Spec 6.3 for one image pair at resolution r.

  ref_features, gen_features: [h, w, C] DIFT maps; mask: [H, W] bool (reference foreground).
  `chunk`: source rows per matrix product (None: the whole n x n distance matrix at once).
  """
  n = r * r
  f_ref = resize_bilinear(ref_features, r).reshape(n, -1)
  f_gen = resize_bilinear(gen_features, r).reshape(n, -1)
  sources = resize_nearest_mask(mask, r).reshape(n)
  unit = lambda f: f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-8)  # torch cosine_similarity eps
  target, d_min = forward_match(unit(f_ref), unit(f_gen), sources, chunk)
  seg = jnp.where(sources, target, n)  # non-sources fall in an extra, discarded segment
  best = jax.ops.segment_min(d_min, seg, num_segments=n + 1)[:n]
  is_best = sources & (d_min == best[jnp.minimum(seg, n - 1)])
  first = jax.ops.segment_min(jnp.where(is_best, jnp.arange(n), n), seg, num_segments=n + 1)[:n]
  matched = first < n
  return Correspondence(jnp.where(matched, first, 0).astype(jnp.int32), matched & (best < threshold),
                        jnp.where(matched, best, jnp.inf).astype(jnp.float32))


def batched_correspondence(ref_features, gen_features, masks, r: int, threshold=0.7) -> Correspondence:
  """`dift_correspondence` over a leading batch axis of jobs; `threshold` a scalar or one per job [B] (traced)."""
  thresholds = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), ref_features.shape[:1])
  return jax.vmap(lambda a, b, m, th: dift_correspondence(a, b, m, r, th))(ref_features, gen_features, masks,
                                                                          thresholds)
