"""Pixel-exact drawing of KA-Diff's matches (numpy + PIL); figures with axes and colour bars are in `plots`.

`matches_image`: reference | generated side by side; each drawn match is a
dot at its source pixel, a dot at its target pixel and a line between them,
coloured by the source's position (x to red, y to green), so a coherent
mapping shows as the same colour gradient on both sides. Drawn over the
per-step correspondences that `generate.run_jobs(..., record=("correspondence",))`
returns in `aux["correspondence"]`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def position_colour(index: np.ndarray, r: int) -> np.ndarray:
  """Raster index on an r x r grid -> RGB (x -> red, y -> green, blue falls along the diagonal)."""
  y, x = np.divmod(np.asarray(index), r)
  fx, fy = x / max(r - 1, 1), y / max(r - 1, 1)
  rgb = np.stack([fx, fy, 1 - (fx + fy) / 2], -1)
  return (40 + 215 * rgb).round().astype(np.uint8)


def _cell_centre(index: np.ndarray, r: int, size: int) -> np.ndarray:
  y, x = np.divmod(np.asarray(index), r)
  return np.stack([(x + 0.5) * size / r, (y + 0.5) * size / r], -1)


def resize_square(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
  im = Image.fromarray(np.asarray(image))
  return np.asarray(im.resize((size, size), Image.NEAREST if nearest else Image.BICUBIC))


def pick_matches(inject: np.ndarray, max_lines: int) -> np.ndarray:
  """Up to `max_lines` injected targets, evenly spread over their raster order (deterministic)."""
  targets = np.flatnonzero(inject)
  if len(targets) > max_lines:
    targets = targets[np.linspace(0, len(targets) - 1, max_lines).round().astype(int)]
  return targets


def matches_image(reference: np.ndarray, generated: np.ndarray, source: np.ndarray, inject: np.ndarray, r: int,
                  mask: np.ndarray | None = None, size: int = 512, max_lines: int = 96) -> np.ndarray:
  """Reference (mask outlined) | generated, with matched pixels joined by lines coloured by source position."""
  ref, gen = resize_square(reference, size), resize_square(generated, size)
  if mask is not None:
    ref = outline(ref, resize_square(np.asarray(mask, np.uint8) * 255, size, nearest=True) > 127, (255, 64, 64))
  canvas = Image.fromarray(np.concatenate([ref, gen], axis=1))
  draw = ImageDraw.Draw(canvas)
  targets = pick_matches(inject, max_lines)
  colours = position_colour(source[targets], r)
  src_xy = _cell_centre(source[targets], r, size)
  tgt_xy = _cell_centre(targets, r, size) + np.array([size, 0])
  dot = max(2, size // 128)
  for (sx, sy), (tx, ty), c in zip(src_xy, tgt_xy, colours):
    c = tuple(int(v) for v in c)
    draw.line([(sx, sy), (tx, ty)], fill=c, width=1)
    for x, y in ((sx, sy), (tx, ty)):
      draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=c, outline=(0, 0, 0))
  return np.asarray(canvas)


def outline(image: np.ndarray, mask: np.ndarray, colour=(255, 0, 0)) -> np.ndarray:
  """The image with the boundary pixels of a bool mask painted in `colour`."""
  m = np.asarray(mask, bool)
  pad = np.pad(m, 1, mode="edge")
  interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
  out = np.array(image, copy=True)
  out[m & ~interior] = colour
  return out


