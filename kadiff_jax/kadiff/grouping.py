"""Packing a batch of jobs into reference groups for a grouped `RowLayout`.

Jobs whose reference rows would be identical (same prepared reference, same
IP-Adapter scale) may share them. A plan chooses the jobs per group k and
splits each reference's jobs into groups of at most k (a short group is
filled with copies of its first job, whose outputs are dropped), picking the k
with the fewest UNet rows after padding the groups to whole device shards.
"""

from __future__ import annotations

from typing import Hashable, NamedTuple, Sequence

from kadiff_jax.sampling import RowLayout


class GroupPlan(NamedTuple):
  layout: RowLayout      # with `group` = k
  slots: list[int]       # [G * k] item index per job slot, group-major (fillers repeat the group's first)
  position: list[int]    # per item: its slot

  @property
  def groups(self) -> int:
    return len(self.slots) // self.layout.group

  def group_items(self) -> list[int]:
    """Per group, the index of its first item (whose reference the group's shared rows use)."""
    return self.slots[::self.layout.group]


def _padded(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def plan_groups(keys: Sequence[Hashable], layout: RowLayout, devices: int = 1,
                max_group: int | None = None) -> GroupPlan:
  """Groups items by key (order kept within a key, keys in first-seen order).

  A layout without shared roles gains nothing from groups: k = 1.
  """
  by_key: dict[Hashable, list[int]] = {}
  for i, key in enumerate(keys):
    by_key.setdefault(key, []).append(i)
  largest = max((len(v) for v in by_key.values()), default=1)
  candidates = range(1, min(largest, max_group or largest) + 1) if layout.shared else (1,)

  def cost(k: int) -> int:
    groups = sum(-(-len(v) // k) for v in by_key.values())
    return _padded(groups, devices) * layout.grouped(k).rows

  k = min(candidates, key=lambda c: (cost(c), c))
  slots: list[int] = []
  for members in by_key.values():
    for start in range(0, len(members), k):
      chunk = members[start:start + k]
      slots.extend(chunk + [chunk[0]] * (k - len(chunk)))
  position = [0] * len(keys)
  for s, i in reversed(list(enumerate(slots))):  # an item's first slot (fillers come after it)
    position[i] = s
  return GroupPlan(layout.grouped(k), slots, position)
