"""Side-by-side image grids people can read: a title over every column and a caption under the row.

PIL only (no plotting library): tiles are scaled to one height (nearest
neighbour when enlarged, so a 64-pixel tiny-model image stays crisp), a
missing tile is drawn as a grey panel saying why, and text uses PIL's
built-in font at a size that follows the tile.
"""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: one fixed bitmap size
    return ImageFont.load_default()


def _tile(image: np.ndarray | None, height: int, note: str) -> Image.Image:
  if image is None:
    panel = Image.new("RGB", (height, height), (200, 200, 200))
    draw = ImageDraw.Draw(panel)
    font = _font(max(10, height // 18))
    lines = textwrap.wrap(note, 22)
    y = height // 2 - len(lines) * font.size // 2
    for line in lines:
      draw.text((height // 2, y), line, fill=(70, 70, 70), font=font, anchor="ma")
      y += int(font.size * 1.2)
    return panel
  im = Image.fromarray(np.asarray(image)).convert("RGB")
  if im.height != height:
    w = max(1, round(im.width * height / im.height))
    im = im.resize((w, height), Image.NEAREST if height > im.height else Image.LANCZOS)
  return im


def labelled_row(tiles: Sequence[tuple[str, np.ndarray | None]], caption: str = "", *, height: int | None = None,
                 missing: str = "not run", titles_below: bool = False) -> np.ndarray:
  """[(title, image or None)] side by side at one height (default: the largest, at least 256), each titled
  (above, or under it with `titles_below`), with `caption` wrapped under the row; None tiles say `missing`.
  Returns uint8 RGB."""
  given = [im for _, im in tiles if im is not None]
  height = height or max([256] + [np.asarray(im).shape[0] for im in given])
  pad, font = max(4, height // 64), _font(max(11, height // 16))
  line = int(font.size * 1.3)
  panels = [_tile(im, height, missing) for _, im in tiles]
  width = sum(p.width for p in panels) + pad * (len(panels) + 1)
  caption_lines = textwrap.wrap(caption, max(20, int(width / (font.size * 0.55)))) if caption else []
  canvas = Image.new("RGB", (width, pad + line + height + pad + len(caption_lines) * line + (pad if caption_lines
                                                                                           else 0)), "white")
  draw = ImageDraw.Draw(canvas)
  x = pad
  for (title, _), panel in zip(tiles, panels):
    draw.text((x + panel.width // 2, pad + (height + pad if titles_below else 0)), title, fill="black", font=font,
              anchor="ma")
    canvas.paste(panel, (x, pad + (0 if titles_below else line)))
    x += panel.width + pad
  y = pad + line + height + pad
  for text in caption_lines:
    draw.text((pad, y), text, fill=(40, 40, 40), font=font)
    y += line
  return np.asarray(canvas)
