"""Images in and out: atomic PNG writes with generation metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin


def to_uint8(images) -> np.ndarray:
  """[-1, 1] float images -> uint8 (diffusers' postprocess: clamp, *255, round)."""
  x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
  return (x * 255).round().astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray, metadata: dict[str, Any] | None = None) -> Path:
  """Writes a uint8 HWC image atomically; metadata values become PNG text chunks (JSON for non-strings)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  info = PngImagePlugin.PngInfo()
  for k, v in (metadata or {}).items():
    info.add_text(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
  os.replace(tmp, path)
  return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
  with Image.open(path) as im:
    return dict(im.text)
