"""Interpolating tensors as the release does (spec 2): torch's lerp, and slerp along chosen axes.

The release's slerp works along the last axis only (quirk Q2): every vector over the last dimension
is interpolated on its own (a latent's rows of W/8 values per channel, a prompt embedding's tokens),
falling back to lerp where the two vectors are nearly parallel (|cos| > 0.9995) or degenerate.
"""

from __future__ import annotations

import jax.numpy as jnp

PARALLEL = 0.9995


def lerp(a, b, t):
  """torch.lerp: a + t (b - a) below t = 0.5, b - (b - a)(1 - t) from it on (exact at both ends)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  d = b - a
  return jnp.where(t < 0.5, a + t * d, b - d * (1 - t))


def slerp(a, b, t, axis=-1):
  """Spherical interpolation of the vectors of a and b along `axis` (an int, a tuple, or None for the whole
  tensor as one vector); lerp where |cos| > 0.9995 or the cosine is undefined. No renormalisation."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  c = jnp.sum((a / norm(a)) * (b / norm(b)), axis=axis, keepdims=True)
  theta = jnp.arccos(jnp.clip(c, -1.0, 1.0))
  s = jnp.sin(theta)
  out = jnp.sin(theta - theta * t) / s * a + jnp.sin(theta * t) / s * b
  flat = (jnp.abs(c) > PARALLEL) | jnp.isnan(c)
  return jnp.where(flat, lerp(a, b, t), out)


def blend(kind: str, a, b, t, axis=-1):
  """`lerp` or `slerp` by name (the release treats any other init string as slerp; we name it)."""
  if kind == "linear":
    return lerp(a, b, t)
  if kind == "slerp":
    return slerp(a, b, t, axis)
  raise ValueError(f"init={kind!r}: expected 'linear' or 'slerp'")
