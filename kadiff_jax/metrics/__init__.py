"""Evaluation metrics of spec section 8 (CLIP-T, CLIP-I, DINO) with our Flax encoders."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from kadiff_jax import image_io


def rgb_images(images: Sequence, metric: str) -> list[Image.Image]:
  """Paths, PIL images or uint8 arrays -> RGB PIL images; an unreadable one is named in a ValueError."""
  out = []
  for i, im in enumerate(images):
    if isinstance(im, np.ndarray):
      if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
        raise ValueError(f"{metric}: image {i} is a {im.dtype} array of shape {im.shape}; expected uint8 [H, W, 3]")
      im = Image.fromarray(im)
    try:
      out.append(image_io.load_rgb(im))
    except (OSError, ValueError) as e:
      where = im if isinstance(im, (str, os.PathLike)) else f"image {i}"
      raise ValueError(f"{metric}: cannot read {where}: {e}") from None
  return out
