"""The one record of an image to generate, shared by every pipeline and command."""

from __future__ import annotations

import dataclasses


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
  ip_scale: float | None = None       # None: the options' or the adapter's default

  @classmethod
  def numbered(cls, prompt: str, seed: int, index: int, **fields) -> "Job":
    """A job named after its seed and index, as `kadiff generate` names its images."""
    return cls(f"seed{seed}_{index:04d}", prompt, seed, index, **fields)
