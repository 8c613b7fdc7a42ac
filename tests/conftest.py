"""Shared fixtures: one tiny SDXL pipeline folder per session, loaded once."""

from __future__ import annotations

import os

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
  # Keep converted-param caches and the tiny model out of the user's home.
  os.environ["KADIFF_CACHE"] = str(tmp_path_factory.mktemp("kadiff_cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  from kadiff_jax.tiny_model import make_tiny_model
  return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
  from kadiff_jax.weights.sdxl import load_sdxl
  return load_sdxl(str(tiny_dir))


@pytest.fixture(scope="session")
def torch_pipe(tiny_dir):
  from diffusers import StableDiffusionXLPipeline
  return StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))


def max_rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref| (error relative to the output's scale)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)
