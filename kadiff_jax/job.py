"""The one record of an image to generate, shared by every pipeline and command."""

from __future__ import annotations

import dataclasses

from kadiff_jax.outputs import check_id

MAX_SEED = 2 ** 32 - 1  # jax.random.PRNGKey keeps 32 bits: larger seeds would repeat smaller ones' noise


def check_seed(value, where: str = "seed") -> int:
  """`value` as a seed in [0, 2**32 - 1], or a ValueError naming it."""
  try:
    seed = int(value)
    if seed != value and not isinstance(value, str):
      raise ValueError
  except (TypeError, ValueError):
    raise ValueError(f"{where}: seed {value!r} is not an integer") from None
  if not 0 <= seed <= MAX_SEED:
    raise ValueError(f"{where}: seed {seed} is out of range; expected 0 to {MAX_SEED}")
  return seed


@dataclasses.dataclass(frozen=True)
class Job:
  """One image: what to draw, from which noise, and (for IP-Adapter and KA-Diff) from which reference.

  Its noise is normal(fold_in(PRNGKey(seed), index)), so an image does not
  depend on how jobs are batched or sharded. Outputs are named after `id`.
  """

  id: str
  prompt: str
  seed: int = 0
  index: int = 0
  negative_prompt: str | None = None  # text-to-image; KA-Diff takes its negative prompt from the options
  reference: str | None = None        # reference image path (IP-Adapter, KA-Diff)
  ref_prompt: str = ""                # KA-Diff: text describing the reference
  mask: str | None = None             # KA-Diff: a mask image, "auto" (from cross-attention) or None (all of it)
  mask_words: tuple[str, ...] = ()    # mask "auto": the ref_prompt's subject words (empty: the options' choice)
  ip_scale: float | None = None       # None: the options' or the adapter's default

  def __post_init__(self):
    check_id(self.id, "job")
    check_seed(self.seed, f"job {self.id}")

  @classmethod
  def numbered(cls, prompt: str, seed: int, index: int, **fields) -> "Job":
    """A job named after its seed and index, as `kadiff generate` names its images."""
    return cls(f"seed{seed}_{index:04d}", prompt, seed, index, **fields)
