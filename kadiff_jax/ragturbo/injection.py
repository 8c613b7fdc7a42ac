"""H-space injection of retrieved features (HSPACE_SPEC §4-5) as H-space hooks on the UNet.

Both hooks read, per UNet row, the k retrieved maps h0_r [k, h, w, C] and
their λ [k] (cosine of the retrieved and target prompts' text keys):

- `SlerpInjection` (training-free, Eq. 3): with w weighting the target,
  h' = sin((1-w)Ω)/sin Ω · h_r + sin(wΩ)/sin Ω · h_t, Ω = arccos⟨ĥ_t, ĥ_r⟩.
  Choice Q5: the angle comes from unit vectors over each sample's whole map
  (`axes="all"`) or per position over channels (`axes="last"`), the
  coefficients multiply the raw maps, and sin Ω < 1e-6 falls back to lerp.
  With k > 1 neighbours h_r is their mean.
- `AdapterInjection` (trained, Eqs. 4-5): h' = h_t + λ·Δh with Δh the
  adapter's cross-attention from h_t's tokens to all 64·k retrieved tokens;
  with k > 1, λ is the neighbours' mean (each one's λ is in the record).

w arrives per row (`rows["w"]`), so one batch may mix strengths; w = 1 gives
back h_t exactly, as does an adapter whose proj_out is zero.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kadiff_jax.models import hspace_adapter
from kadiff_jax.models.attention import HookInputs
from kadiff_jax.models.hspace import HSpaceHook
from kadiff_jax.programs import serializable

SLERP_AXES = ("all", "last")


@serializable
class Retrieved(NamedTuple):
  """Per UNet row: the k retrieved H-space maps, their λ, and the target weight w (slerp)."""

  h: jax.Array     # [R, k, h, w, C]
  lam: jax.Array   # [R, k]
  w: jax.Array     # [R]


def slerp(h_t: jax.Array, h_r: jax.Array, w: jax.Array, axes: str = "all") -> jax.Array:
  """Eq. 3 on [B, h, w, C] maps with per-sample w [B] (w = 1: h_t)."""
  if axes not in SLERP_AXES:
    raise ValueError(f"slerp axes={axes!r}: expected one of {SLERP_AXES}")
  t, r = h_t.astype(jnp.float32), h_r.astype(jnp.float32)
  reduce = (1, 2, 3) if axes == "all" else (3,)
  unit = lambda a: a / jnp.maximum(jnp.sqrt(jnp.sum(a * a, axis=reduce, keepdims=True)), 1e-12)
  cos = jnp.clip(jnp.sum(unit(t) * unit(r), axis=reduce, keepdims=True), -1.0, 1.0)
  omega = jnp.arccos(cos)
  sin = jnp.sin(omega)
  w = w.astype(jnp.float32).reshape((-1,) + (1,) * 3)
  flat = sin < 1e-6
  safe = jnp.where(flat, 1.0, sin)
  a_r = jnp.where(flat, 1.0 - w, jnp.sin((1.0 - w) * omega) / safe)
  a_t = jnp.where(flat, w, jnp.sin(w * omega) / safe)
  return (a_r * r + a_t * t).astype(h_t.dtype)


@dataclasses.dataclass(frozen=True)
class SlerpInjection(HSpaceHook):
  axes: str = "all"
  name: str = "hspace"

  def edit_hspace(self, h, args: HookInputs):
    ret: Retrieved = args.rows
    h_r = jnp.mean(ret.h.astype(jnp.float32), axis=1)
    return slerp(h, h_r.astype(h.dtype), ret.w, self.axes), {}


@dataclasses.dataclass(frozen=True)
class AdapterInjection(HSpaceHook):
  config: hspace_adapter.HSpaceAdapterConfig
  name: str = "hspace"

  def edit_hspace(self, h, args: HookInputs):
    ret: Retrieved = args.rows
    b, k, hh, ww, c = ret.h.shape
    tokens = ret.h.reshape(b, k * hh * ww, c)
    delta = hspace_adapter.apply(args.params, h, tokens, config=self.config, dtype=h.dtype)
    lam = jnp.mean(ret.lam.astype(jnp.float32), axis=1).reshape(b, 1, 1, 1)
    return (h.astype(jnp.float32) + lam * delta.astype(jnp.float32)).astype(h.dtype), {}
