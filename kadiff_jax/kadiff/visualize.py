"""Pictures of what KA-Diff did: matches, matched distances, injected positions, cross-attention.

Pure numpy + PIL drawing over the per-step correspondences that
`generate.run_jobs(..., record=("correspondence",))` returns in `aux["correspondence"]`:

- `matches_image`: reference | generated side by side; each drawn match is a
  dot at its source pixel, a dot at its target pixel and a line between
  them, coloured by the source's position (x to red, y to green), so a
  coherent mapping shows as the same colour gradient on both sides.
- `distance_panels`: the kept cosine distance per target pixel, one tile per
  step (dark = close, bright = far, black = no source maps there), with the
  injection threshold as a red contour.
- `injected_panels`: per step, the injected target pixels (white) on the
  generated image.
- `heatmap_overlay`: a [0, 1] map blended over an image (cross-attention).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
  """[...] in [0, 1] -> [..., 3] uint8 along a viridis-like ramp (5 anchors, linear between)."""
  v = np.clip(np.nan_to_num(np.asarray(values, np.float64), nan=0.0), 0, 1) * (len(_VIRIDIS) - 1)
  i = np.minimum(np.floor(v).astype(int), len(_VIRIDIS) - 2)
  f = (v - i)[..., None]
  return ((1 - f) * _VIRIDIS[i] + f * _VIRIDIS[i + 1]).round().astype(np.uint8)


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


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55, size: int | None = None) -> np.ndarray:
  """`heat` in [0, 1] (any square size) coloured and blended over `image`."""
  size = size or image.shape[0]
  base = resize_square(image, size).astype(np.float64)
  h = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((size, size), Image.BILINEAR))
  return ((1 - alpha) * base + alpha * colormap(h)).round().astype(np.uint8)


def tile_grid(tiles: Sequence[np.ndarray], labels: Sequence[str], cols: int, pad: int = 4) -> np.ndarray:
  """Tiles of one size in a grid, each with a label strip above it."""
  h, w = tiles[0].shape[:2]
  label_h = 14
  rows = -(-len(tiles) // cols)
  canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + label_h + pad) + pad), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for k, (tile, label) in enumerate(zip(tiles, labels)):
    x, y = pad + (k % cols) * (w + pad), pad + (k // cols) * (h + label_h + pad)
    draw.text((x, y), label, fill=(0, 0, 0))
    canvas.paste(Image.fromarray(np.asarray(tile)), (x, y + label_h))
  return np.asarray(canvas)


def distance_tile(distance: np.ndarray, r: int, threshold: float, size: int) -> np.ndarray:
  """One step's kept distances [r*r] as a coloured tile: 0 dark ... 1+ bright, unmatched black."""
  d = np.asarray(distance, np.float64).reshape(r, r)
  matched = np.isfinite(d)
  img = colormap(np.where(matched, d, 0.0))
  img[~matched] = 0
  tile = resize_square(img, size, nearest=True)
  below = resize_square((matched & (d < threshold)).astype(np.uint8) * 255, size, nearest=True) > 127
  return outline(tile, below, (255, 40, 40))


def distance_panels(distances: np.ndarray, steps: Sequence[int], r: int, threshold: float,
                    tile: int = 128, cols: int = 8) -> np.ndarray:
  """Kept-distance tiles for the given steps (distances: [S, r*r])."""
  return tile_grid([distance_tile(distances[s], r, threshold, tile) for s in steps],
                   [f"step {s}" for s in steps], cols)


def injected_panels(injects: np.ndarray, steps: Sequence[int], r: int, generated: np.ndarray,
                    tile: int = 128, cols: int = 8) -> np.ndarray:
  """Injected targets (white, over the dimmed generated image) for the given steps (injects: [S, r*r])."""
  base = resize_square(generated, tile).astype(np.float64) * 0.35
  tiles = []
  for s in steps:
    m = resize_square(np.asarray(injects[s], np.uint8).reshape(r, r) * 255, tile, nearest=True) > 127
    t = base.copy()
    t[m] = 255
    tiles.append(t.astype(np.uint8))
  return tile_grid(tiles, [f"step {s}: {int(np.sum(injects[s]))}" for s in steps], cols)
