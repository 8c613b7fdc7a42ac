"""Self-attention injection hooks over the KA-Diff batch layout.

Each job occupies four consecutive UNet rows, [uncond_gen, uncond_ref,
cond_gen, cond_ref] (spec 6.1), so a data-parallel shard always holds whole
jobs. Both hooks act only in the layers their selector picks and only when
the traced `active` flag of the current step is set.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kadiff_jax.kadiff.correspondence import Correspondence
from kadiff_jax.models.attention import AttentionCall, AttentionSite, LayerSelector

ROWS = 4
UNCOND_GEN, UNCOND_REF, COND_GEN, COND_REF = range(ROWS)


class InjectionArgs(NamedTuple):
  active: jax.Array                       # scalar bool: inject at this step
  correspondence: dict[int, Correspondence]  # per resolution r: [B, r*r] fields


def _rows(x):
  return x.reshape((-1, ROWS) + x.shape[1:])  # [B, 4, L, heads, d]


@dataclasses.dataclass(frozen=True)
class KVInjection:
  """Spec 6.4: the cond_gen row's keys/values at injected targets j come from cond_ref at source i(j)."""

  selector: LayerSelector
  replace: tuple[str, ...] = ("k", "v")
  name: str = "kv_injection"

  def selects(self, site: AttentionSite) -> bool:
    return self.selector.selects(site)

  def __call__(self, call: AttentionCall, attend, args: InjectionArgs):
    h, w = call.spatial
    if h != w or h not in args.correspondence:
      raise ValueError(f"{call.site.path}: no correspondence for a {h}x{w} grid (have {sorted(args.correspondence)})")
    corr = args.correspondence[h]
    take = (corr.inject & args.active)[:, :, None, None]  # [B, L, 1, 1]
    src = corr.source[:, :, None, None]

    def swap(x):
      x4 = _rows(x)
      from_ref = jnp.take_along_axis(x4[:, COND_REF], src, axis=1)
      gen = jnp.where(take, from_ref, x4[:, COND_GEN])
      return x4.at[:, COND_GEN].set(gen).reshape(x.shape)

    q, k, v = (swap(a) if name in self.replace else a for name, a in zip("qkv", (call.q, call.k, call.v)))
    return attend(q, k, v), {}


@dataclasses.dataclass(frozen=True)
class MutualSelfAttention:
  """MasaCtrl-style baseline: gen queries attend to the ref row's keys/values (no correspondence)."""

  selector: LayerSelector
  name: str = "mutual_self_attention"

  def selects(self, site: AttentionSite) -> bool:
    return self.selector.selects(site)

  def __call__(self, call: AttentionCall, attend, args: InjectionArgs):
    def swap(x):
      x4 = _rows(x)
      mixed = x4.at[:, UNCOND_GEN].set(x4[:, UNCOND_REF]).at[:, COND_GEN].set(x4[:, COND_REF])
      return jnp.where(args.active, mixed, x4).reshape(x.shape)

    return attend(call.q, swap(call.k), swap(call.v)), {}
