"""How jobs expand into UNet rows, and how the rows' outputs combine into one prediction per job.

Every job occupies `rows` consecutive UNet rows, one per role, so a batch of
B jobs is a [B * rows, ...] UNet batch and a data-parallel shard holding
whole jobs holds a multiple of `rows` rows. Classifier-free guidance reads the
`uncond` and `cond` roles (Ho & Salimans 2022, eq. 6 in the eps form):

    eps = eps[uncond] + guidance * (eps[cond] - eps[uncond])

A layout without an `uncond` role runs no CFG rows at all.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RowLayout:
  roles: tuple[str, ...]    # per job, in row order
  cond: str                 # the role whose prediction is kept (guided when `uncond` is set)
  uncond: str | None = None

  def __post_init__(self):
    for r in (self.cond, self.uncond):
      if r is not None and r not in self.roles:
        raise ValueError(f"role {r!r} is not one of this layout's roles {self.roles}")

  @property
  def rows(self) -> int:
    """UNet rows per job: the multiple a device shard must hold."""
    return len(self.roles)

  def index(self, role: str) -> int:
    if role not in self.roles:
      raise ValueError(f"role {role!r} is not one of this layout's roles {self.roles}")
    return self.roles.index(role)

  def interleave(self, per_role: Mapping[str, jax.Array]) -> jax.Array:
    """{role: [B, ...]} -> [B * rows, ...], job-major (job 0's roles first)."""
    missing = [r for r in self.roles if r not in per_role]
    if missing:
      raise ValueError(f"no rows given for roles {missing} of layout {self.roles}")
    stacked = jnp.stack([jnp.asarray(per_role[r]) for r in self.roles], axis=1)  # [B, rows, ...]
    return stacked.reshape((-1,) + stacked.shape[2:])

  def broadcast(self, x: jax.Array) -> jax.Array:
    """The same [B, ...] value in every role's row: [B * rows, ...]."""
    return jnp.repeat(x, self.rows, axis=0)

  def split(self, rows: jax.Array) -> jax.Array:
    """[B * rows, ...] -> [B, rows, ...]."""
    return rows.reshape((-1, self.rows) + rows.shape[1:])

  def take(self, rows: jax.Array, role: str) -> jax.Array:
    """One role's rows: [B * rows, ...] -> [B, ...]."""
    return self.split(rows)[:, self.index(role)]

  def guide(self, eps: jax.Array, guidance) -> jax.Array:
    """The per-job prediction [B, ...] from the rows' predictions [B * rows, ...]."""
    per_job = self.split(eps.astype(jnp.float32))
    cond = per_job[:, self.index(self.cond)]
    if self.uncond is None:
      return cond
    uncond = per_job[:, self.index(self.uncond)]
    return uncond + guidance * (cond - uncond)


NO_CFG = RowLayout(("cond",), "cond")
CFG = RowLayout(("uncond", "cond"), "cond", "uncond")
# KA-Diff (spec 6.1): the generated image and the replayed reference, each with its CFG pair
KADIFF = RowLayout(("uncond_gen", "uncond_ref", "cond_gen", "cond_ref"), "cond_gen", "uncond_gen")
