"""Self-attention injection hooks over the KA-Diff row layout (spec 6.1, 6.4).

Jobs occupy the rows of a `RowLayout` with the roles cond_gen and cond_ref
(and, for MasaCtrl, uncond_gen and uncond_ref): one row per job, or, for a
shared ref role, one row per group of jobs with the same reference. A
data-parallel shard always holds whole groups. Both hooks act only in the
layers their selector picks and only for the jobs whose traced `active` flag
is set at the current step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kadiff_jax.kadiff.correspondence import Correspondence
from kadiff_jax.models.attention import AttentionCall, AttentionSite, LayerSelector
from kadiff_jax.programs import serializable
from kadiff_jax.sampling.layout import KADIFF, RowLayout


@serializable
class InjectionArgs(NamedTuple):
  active: jax.Array                          # [B] bool: inject into job b at this step (B = groups * group)
  correspondence: dict[int, Correspondence]  # per grid side r: [B, r*r] fields (empty for MasaCtrl)


def _from(rows: jax.Array, layout: RowLayout, target: str, source: str) -> tuple[jax.Array, jax.Array]:
  """(target role's rows [G, k, ...], source role's rows broadcast to the same shape) of rows [G, rows, ...]."""
  tgt = rows[:, layout.span(target)]
  return tgt, jnp.broadcast_to(rows[:, layout.span(source)], tgt.shape)


def _per_group(x: jax.Array, layout: RowLayout) -> jax.Array:
  """A per-job array [G * k, ...] as [G, k, ...]."""
  return x.reshape((-1, layout.group) + x.shape[1:])


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
    layout = self.layout
    take = _per_group(corr.inject & args.active[:, None], layout)[..., None, None]  # [G, k, L, 1, 1]
    src = _per_group(corr.source, layout)[..., None, None]

    def swap(x):
      rows = layout.split(x)  # [G, rows, L, heads, d]
      gen, ref = _from(rows, layout, "cond_gen", "cond_ref")  # [G, k, L, heads, d] each
      from_ref = jnp.take_along_axis(ref, src, axis=2)
      return rows.at[:, layout.span("cond_gen")].set(jnp.where(take, from_ref, gen)).reshape(x.shape)

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
    layout = self.layout
    on = _per_group(args.active, layout)

    def swap(x):
      rows = layout.split(x)  # [G, rows, L, heads, d]
      for gen_role, ref_role in (("uncond_gen", "uncond_ref"), ("cond_gen", "cond_ref")):
        gen, ref = _from(rows, layout, gen_role, ref_role)
        keep = on.reshape(on.shape + (1,) * (gen.ndim - 2))
        rows = rows.at[:, layout.span(gen_role)].set(jnp.where(keep, ref, gen))
      return rows.reshape(x.shape)

    return attend(call.q, swap(call.k), swap(call.v)), {}
