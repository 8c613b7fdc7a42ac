"""One sampler for every method: a denoiser and a row layout over `sample` (k-diffusion's lesson)."""

from kadiff_jax.sampling.layout import CFG, KADIFF, KADIFF_GROUPED, MASACTRL_GROUPED, NO_CFG, RowLayout
from kadiff_jax.sampling.sampler import Denoiser, sample

__all__ = ["CFG", "KADIFF", "KADIFF_GROUPED", "MASACTRL_GROUPED", "NO_CFG", "Denoiser", "RowLayout", "sample"]
