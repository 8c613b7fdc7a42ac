"""Interpolated attention (spec 3): each frame row attends to the endpoint frames' keys and values.

Frames of one interpolation sit in consecutive rows of a role, A first and B last (a `RowLayout`
with `group` = number of frames); the endpoints' keys and values are read from the same forward
pass, layer and step. For a row with coefficient c, per head:

    fused_outer  (1 - c) Attn(q, [k; k_A], [v; v_A]) + c Attn(q, [k; k_B], [v; v_B])   (the release's default)
    fused_inner  Attn(q, [k; k~], [v; v~]),  k~ = (1 - c) k_A + c k_B, v~ likewise
    outer        (1 - c) Attn(q, k_A, v_A) + c Attn(q, k_B, v_B)
    inner        Attn(q, k~, v~)

The mix is taken before the output projection. Rows whose `active` flag is off (outside the
warm-up, and the unconditional rows unless asked: quirk Q4) get plain attention. An endpoint row
attending to its own keys twice is plain attention, so A and B are plain generations and a middle
row reads only them: every middle of one interpolation can share one batch (quirk Q3).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kadiff_jax.models.attention import AttentionCall, AttentionSite
from kadiff_jax.programs import serializable
from kadiff_jax.sampling.layout import RowLayout

VARIANTS = ("fused_outer", "fused_inner", "outer", "inner")


@serializable
class InterpolationArgs(NamedTuple):
  coef: jax.Array    # [R] per UNet row: 0 for A, t_k for middle k, 1 for B
  active: jax.Array  # [R] bool: interpolate this row at this step


def endpoints(layout: RowLayout, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(A's, B's) rows of each row's role and group, shaped like x [R, ...]."""
  rows = layout.split(x)  # [G, rows, ...]
  firsts, lasts = [], []
  for role in layout.roles:
    span = layout.span(role)
    n = span.stop - span.start
    pick = lambda j: jnp.broadcast_to(rows[:, j:j + 1], (rows.shape[0], n) + rows.shape[2:])
    firsts.append(pick(span.start))
    lasts.append(pick(span.stop - 1))
  join = lambda parts: jnp.concatenate(parts, axis=1).reshape(x.shape)
  return join(firsts), join(lasts)


@dataclasses.dataclass(frozen=True)
class InterpolatedAttention:
  layout: RowLayout            # group = frames per interpolation, A first and B last in every role
  variant: str = "fused_outer"
  kinds: tuple[str, ...] = ("self", "cross")
  name: str = "interpolation"
  needs_args = True

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r}: expected one of {VARIANTS}")

  def selects(self, site: AttentionSite) -> bool:
    return site.kind in self.kinds

  def __call__(self, call: AttentionCall, attend, args: InterpolationArgs):
    q, k, v = call.q, call.k, call.v
    c = args.coef.astype(jnp.float32)[:, None, None, None]

    def interpolated():
      (k_a, k_b), (v_a, v_b) = endpoints(self.layout, k), endpoints(self.layout, v)
      own = lambda x, e: jnp.concatenate([x, e], axis=1) if self.variant.startswith("fused") else e
      if self.variant.endswith("outer"):
        out_a = attend(q, own(k, k_a), own(v, v_a)).astype(jnp.float32)
        out_b = attend(q, own(k, k_b), own(v, v_b)).astype(jnp.float32)
        mixed = (1 - c) * out_a + c * out_b
      else:
        mix = lambda a, b: ((1 - c) * a.astype(jnp.float32) + c * b.astype(jnp.float32)).astype(a.dtype)
        mixed = attend(q, own(k, mix(k_a, k_b)), own(v, mix(v_a, v_b)))
      plain = attend(q, k, v)
      on = args.active[:, None, None, None]
      return jnp.where(on, mixed.astype(plain.dtype), plain)

    out = jax.lax.cond(jnp.any(args.active), interpolated, lambda: attend(q, k, v))
    return out, {}


@serializable
class MorphRows(NamedTuple):
  tokens: jax.Array  # [R, N, C] each row's own image tokens (a middle's from its interpolated features)
  scale: jax.Array   # [R] image-branch scale (the release: 1.0, quirk Q6)
  coef: jax.Array    # [R]
  active: jax.Array  # [R] bool


@dataclasses.dataclass(frozen=True)
class InterpolatedIPAdapter:
  """The image branch of image morphing (spec 4), in place of the plain IP-Adapter hook. While a row is active:
  fused_outer adds (1 - c) Attn(q, [Kip; Kip_A], [Vip; Vip_A]) + c Attn(q, [Kip; Kip_B], [Vip; Vip_B]) and outer
  (1 - c) Attn(q, Kip_A, Vip_A) + c Attn(q, Kip_B, Vip_B); the inner variants (quirk Q7), and every inactive row,
  add plain attention to the row's own image tokens. Each scaled by the row's scale."""

  layout: RowLayout
  variant: str = "fused_outer"
  upcast: bool = False
  name: str = "ip_morph"
  needs_args = True

  def selects(self, site: AttentionSite) -> bool:
    return site.kind == "cross"

  def __call__(self, call: AttentionCall, attend, args):
    from kadiff_jax.models.attention import dot_product_attention
    from kadiff_jax.models.ip_adapter import image_keys_values
    rows: MorphRows = args.rows
    out = attend(call.q, call.k, call.v)
    k, v = image_keys_values(call, args.params, rows.tokens)
    ip = lambda kk, vv: dot_product_attention(call.q, kk, vv, upcast=self.upcast).astype(jnp.float32)
    own = ip(k, v)
    if self.variant.endswith("outer"):
      (k_a, k_b), (v_a, v_b) = endpoints(self.layout, k), endpoints(self.layout, v)
      cat = (lambda x, e: jnp.concatenate([x, e], axis=1)) if self.variant == "fused_outer" else (lambda x, e: e)
      c = rows.coef.astype(jnp.float32)[:, None, None, None]
      mixed = lambda: (1 - c) * ip(cat(k, k_a), cat(v, v_a)) + c * ip(cat(k, k_b), cat(v, v_b))
      branch = jax.lax.cond(jnp.any(rows.active),
                            lambda: jnp.where(rows.active[:, None, None, None], mixed(), own), lambda: own)
    else:
      branch = own
    return out + (rows.scale.astype(jnp.float32)[:, None, None, None] * branch).astype(out.dtype), {}
