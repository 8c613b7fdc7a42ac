"""How jobs expand into UNet rows, and how the rows' outputs combine into one prediction per job.

Jobs come in groups of `group` jobs; a group occupies `rows` consecutive
UNet rows, role by role: a role occupies one row per job of the group, or,
when it is `shared`, one row for the whole group (e.g. the reference rows of
jobs that share a reference). A batch of G groups is a [G * rows, ...] UNet
batch, so a data-parallel shard holding whole groups holds a multiple of
`rows` rows. With group=1 and nothing shared every job has one row per role.
Classifier-free guidance reads the `uncond` and `cond` roles (Ho & Salimans
2022, eq. 6 in the eps form):

    eps = eps[uncond] + guidance * (eps[cond] - eps[uncond])

A layout without an `uncond` role runs no CFG rows at all.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*values):
  """numpy for host values, jax.numpy once any value is a JAX array or tracer: assembling rows on the host
  runs no device programs."""
  return jnp if any(isinstance(v, jax.Array) for v in values) else np


@dataclasses.dataclass(frozen=True)
class RowLayout:  # reshapes name every size: -1 cannot be inferred for zero-width values (SD's pooled [B, 0])
  roles: tuple[str, ...]     # in row order within a group
  cond: str                  # the role whose prediction is kept (guided when `uncond` is set)
  uncond: str | None = None
  shared: tuple[str, ...] = ()  # roles with one row per group instead of one per job
  group: int = 1             # jobs per group

  def __post_init__(self):
    for r in (self.cond, self.uncond, *self.shared):
      if r is not None and r not in self.roles:
        raise ValueError(f"role {r!r} is not one of this layout's roles {self.roles}")
    if self.cond in self.shared or self.uncond in self.shared:
      raise ValueError(f"the guided roles ({self.cond!r}, {self.uncond!r}) need one row per job, not shared")
    if self.group < 1:
      raise ValueError(f"group={self.group}: expected at least 1 job per group")

  def grouped(self, k: int) -> "RowLayout":
    """This layout with k jobs per group."""
    return dataclasses.replace(self, group=k)

  def count(self, role: str) -> int:
    """Rows of `role` per group."""
    self._check(role)
    return 1 if role in self.shared else self.group

  @property
  def rows(self) -> int:
    """UNet rows per group: the multiple a device shard must hold."""
    return sum(self.count(r) for r in self.roles)

  def span(self, role: str) -> slice:
    """Where `role`'s rows sit within a group's rows."""
    self._check(role)
    start = sum(self.count(r) for r in self.roles[:self.roles.index(role)])
    return slice(start, start + self.count(role))

  def _check(self, role: str) -> None:
    if role not in self.roles:
      raise ValueError(f"role {role!r} is not one of this layout's roles {self.roles}")

  def interleave(self, per_role: Mapping[str, jax.Array]) -> jax.Array:
    """{role: [G * count(role), ...]} -> [G * rows, ...], group-major (group 0's rows first)."""
    missing = [r for r in self.roles if r not in per_role]
    if missing:
      raise ValueError(f"no rows given for roles {missing} of layout {self.roles}")
    xp = _xp(*per_role.values())
    parts = []
    for r in self.roles:
      a = xp.asarray(per_role[r])
      parts.append(a.reshape((a.shape[0] // self.count(r), self.count(r)) + a.shape[1:]))  # [G, count, ...]
    stacked = xp.concatenate(parts, axis=1)
    return stacked.reshape((stacked.shape[0] * stacked.shape[1],) + stacked.shape[2:])

  def per_group(self, x: jax.Array) -> jax.Array:
    """A per-job value [G * group, ...] as the value of each group's first job [G, ...] (for shared rows, whose
    jobs agree on it)."""
    x = _xp(x).asarray(x)
    return x.reshape((x.shape[0] // self.group, self.group) + x.shape[1:])[:, 0]

  def assemble(self, per_role: Mapping[str, jax.Array]) -> jax.Array:
    """{role: per-job value [G * group, ...]} -> [G * rows, ...]; a shared role's row takes its group's first job's
    value (the group's jobs agree on it)."""
    return self.interleave({r: self.per_group(v) if r in self.shared else v for r, v in per_role.items()})

  def broadcast(self, x: jax.Array) -> jax.Array:
    """The same per-job value [G * group, ...] in every role's rows: [G * rows, ...]."""
    return self.assemble({r: x for r in self.roles})

  def split(self, rows: jax.Array) -> jax.Array:
    """[G * rows, ...] -> [G, rows, ...]."""
    return rows.reshape((rows.shape[0] // self.rows, self.rows) + rows.shape[1:])

  def take(self, rows: jax.Array, role: str) -> jax.Array:
    """One role's rows: [G * rows, ...] -> [G * count(role), ...]."""
    picked = self.split(rows)[:, self.span(role)]
    return picked.reshape((picked.shape[0] * picked.shape[1],) + picked.shape[2:])

  def guide(self, eps: jax.Array, guidance) -> jax.Array:
    """The per-job prediction [G * group, ...] from the rows' predictions [G * rows, ...]."""
    eps = eps.astype(jnp.float32)
    cond = self.take(eps, self.cond)
    if self.uncond is None:
      return cond
    uncond = self.take(eps, self.uncond)
    return uncond + guidance * (cond - uncond)


NO_CFG = RowLayout(("cond",), "cond")
CFG = RowLayout(("uncond", "cond"), "cond", "uncond")
# KA-Diff as the release runs it (spec 6.1): per job, the generated image and the replayed reference, each with its
# CFG pair.
KADIFF = RowLayout(("uncond_gen", "uncond_ref", "cond_gen", "cond_ref"), "cond_gen", "uncond_gen")
# KA-Diff grouped by reference: the uncond_ref row influences nothing (only cond_ref's keys/values are read and
# the ref latent comes from the trajectory), and jobs sharing a reference share its cond_ref row. `.grouped(k)`.
KADIFF_GROUPED = RowLayout(("uncond_gen", "cond_gen", "cond_ref"), "cond_gen", "uncond_gen", shared=("cond_ref",))
# MasaCtrl-style mutual self-attention reads both ref rows (uncond_gen <- uncond_ref, cond_gen <- cond_ref).
MASACTRL_GROUPED = RowLayout(("uncond_gen", "cond_gen", "uncond_ref", "cond_ref"), "cond_gen", "uncond_gen",
                             shared=("uncond_ref", "cond_ref"))
