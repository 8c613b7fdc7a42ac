"""Images in and out: atomic PNG writes with generation metadata."""

from __future__ import annotations

import io
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


def png_bytes(image: np.ndarray, metadata: dict[str, Any] | None = None) -> bytes:
  """A uint8 HWC image as PNG; metadata values become PNG text chunks (JSON for non-strings)."""
  info = PngImagePlugin.PngInfo()
  for k, v in (metadata or {}).items():
    info.add_text(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
  return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray, metadata: dict[str, Any] | None = None) -> Path:
  """Writes a uint8 HWC image atomically (a temporary name, then a rename)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_bytes(png_bytes(image, metadata))
  os.replace(tmp, path)
  return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
  with Image.open(path) as im:
    return dict(im.text)


def load_rgb(path_or_image, name: str | None = None) -> Image.Image:
  """Opens an image as 8-bit RGB, converting correctly rather than silently wrong.

  Grey and palette images are expanded; alpha is composited over white (what a
  viewer shows; diffusers' processor instead drops it); 16-bit images are scaled
  to 8 bits (PIL's own conversion would clip them); other modes are refused.
  """
  if isinstance(path_or_image, Image.Image):
    im, name = path_or_image, name or "image"
  else:
    name = name or str(path_or_image)
    try:
      im = Image.open(path_or_image)
      im.load()
    except FileNotFoundError:
      raise FileNotFoundError(f"image {name} does not exist") from None
    except IsADirectoryError:
      raise ValueError(f"{name} is a folder, not an image") from None
    except Image.DecompressionBombError as e:
      raise ValueError(f"{name}: {str(e).split(', could be')[0]} (a decompression bomb?); set "
                       "KADIFF_MAX_IMAGE_PIXELS to allow larger images") from None
    except (OSError, SyntaxError, ValueError) as e:
      raise ValueError(f"{name} is not a readable image: {e}") from None
  if im.mode in ("I;16", "I;16B", "I;16L", "I"):
    a = np.asarray(im).astype(np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
    im = Image.fromarray(np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8), "L")
  elif im.mode == "F":
    raise ValueError(f"{name}: floating-point image (mode F) has no defined 0-255 range; save it as 8 or 16-bit")
  if im.mode == "P":
    im = im.convert("RGBA")
  if im.mode in ("RGBA", "LA", "PA"):
    im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(white, im)
  if im.mode not in ("RGB", "L", "RGBA", "CMYK", "YCbCr"):
    raise ValueError(f"{name}: image mode {im.mode!r} is not supported (expected RGB, grey, RGBA or 16-bit grey)")
  return im.convert("RGB")
