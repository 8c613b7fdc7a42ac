"""Self-attention injection hooks over the KA-Diff row layout (spec 6.1, 6.4).

Each job occupies the rows of a `RowLayout` with the roles cond_gen and
cond_ref (and, for MasaCtrl, uncond_gen and uncond_ref), so a data-parallel
shard always holds whole jobs. Both hooks act only in the layers their
selector picks and only for the jobs whose traced `active` flag is set at
the current step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kadiff_jax.kadiff.correspondence import Correspondence
from kadiff_jax.models.attention import AttentionCall, AttentionSite, LayerSelector
from kadiff_jax.sampling.layout import KADIFF, RowLayout


class InjectionArgs(NamedTuple):
  active: jax.Array                          # [B] bool: inject into job b at this step
  correspondence: dict[int, Correspondence]  # per grid side r: [B, r*r] fields (empty for MasaCtrl)


@dataclasses.dataclass(frozen=True)
class KVInjection:
  """Spec 6.4: the cond_gen row's keys/values at injected targets j come from cond_ref at source i(j)."""

  selector: LayerSelector
  replace: tuple[str, ...] = ("k", "v")
  layout: RowLayout = KADIFF
  name: str = "kv_injection"
  needs_args = True

  def selects(self, site: AttentionSite) -> bool:
    return self.selector.selects(site)

  def __call__(self, call: AttentionCall, attend, args: InjectionArgs):
    h, w = call.spatial
    if h != w or h not in args.correspondence:
      raise ValueError(f"{call.site.path}: no correspondence for a {h}x{w} grid (have {sorted(args.correspondence)})")
    corr = args.correspondence[h]
    take = (corr.inject & args.active[:, None])[:, :, None, None]  # [B, L, 1, 1]
    src = corr.source[:, :, None, None]
    gen, ref = self.layout.index("cond_gen"), self.layout.index("cond_ref")

    def swap(x):
      rows = self.layout.split(x)  # [B, rows, L, heads, d]
      from_ref = jnp.take_along_axis(rows[:, ref], src, axis=1)
      return rows.at[:, gen].set(jnp.where(take, from_ref, rows[:, gen])).reshape(x.shape)

    q, k, v = (swap(a) if name in self.replace else a for name, a in zip("qkv", (call.q, call.k, call.v)))
    return attend(q, k, v), {}


@dataclasses.dataclass(frozen=True)
class MutualSelfAttention:
  """MasaCtrl-style baseline: gen queries attend to the ref rows' keys/values (no correspondence)."""

  selector: LayerSelector
  layout: RowLayout = KADIFF
  name: str = "mutual_self_attention"
  needs_args = True

  def selects(self, site: AttentionSite) -> bool:
    return self.selector.selects(site)

  def __call__(self, call: AttentionCall, attend, args: InjectionArgs):
    idx = self.layout.index

    def swap(x):
      rows = self.layout.split(x)
      mixed = (rows.at[:, idx("uncond_gen")].set(rows[:, idx("uncond_ref")])
               .at[:, idx("cond_gen")].set(rows[:, idx("cond_ref")]))
      on = args.active.reshape((-1,) + (1,) * (rows.ndim - 1))
      return jnp.where(on, mixed, rows).reshape(x.shape)

    return attend(call.q, swap(call.k), swap(call.v)), {}
