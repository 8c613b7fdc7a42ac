"""Where outputs may go: ids that are safe file names, and paths checked to stay inside the output folder.

Job and query ids name output files (`{id}.png`, `{id}.json`, ...), so an id
from a jobs or queries file must not be able to point anywhere else: ids are
1-128 characters of letters, digits, '.', '_' and '-', starting with a letter
or digit (so no separators, no '..', no absolute paths, no hidden files), and
every output path is resolved and checked to lie inside its folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(value, where: str) -> str:
  """`value` as an id, or a ValueError naming `where` (e.g. 'jobs.jsonl:3') and what is allowed."""
  text = str(value)
  if not _ID.fullmatch(text) or ".." in text:
    raise ValueError(f"{where}: id {text!r} is not a safe file name; expected 1-128 of A-Z a-z 0-9 . _ -, "
                     "starting with a letter or digit, without '..'")
  return text


def inside(folder: str | os.PathLike, name: str) -> Path:
  """`folder / name`, refusing any name that resolves outside `folder` (links included)."""
  root = Path(folder).resolve()
  path = (root / name).resolve()
  if path.parent != root and root not in path.parents:
    raise ValueError(f"output {name!r} would be written outside {folder}; refusing")
  return path


def is_url(location: str | os.PathLike) -> bool:
  """Whether an output location is an fsspec URL (gs://, s3://, memory://, file://, ...) rather than a path."""
  return "://" in str(location)


class OutputDir:
  """An output folder, local or on any fsspec filesystem (`gs://bucket/run` with the `gcs` extra), where every
  file is written whole: a local file goes through a temporary name and a rename; an object store's put is
  already all-or-nothing. Names are checked like `inside`, so nothing lands outside the folder."""

  def __init__(self, location: str | os.PathLike):
    self.location = str(location)
    if is_url(location):
      try:
        import fsspec
        self._fs, root = fsspec.core.url_to_fs(self.location)
      except ImportError as e:  # a protocol whose package is missing, e.g. gcsfs
        raise ValueError(f"output {self.location}: {e}") from None
      self._root = root.rstrip("/")
      protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
      self._local = Path(root) if "file" in protocols else None  # file:// is a plain folder: keep the rename
    else:
      self._fs, self._root, self._local = None, None, Path(location)

  def _name(self, name: str) -> str:
    if self._local is not None:
      return str(inside(self._local, name))
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
      raise ValueError(f"output {name!r} would be written outside {self.location}; refusing")
    return f"{self._root}/{name}"

  def exists(self, name: str) -> bool:
    path = self._name(name)
    return Path(path).is_file() if self._local is not None else self._fs.isfile(path)

  def read_bytes(self, name: str) -> bytes:
    path = self._name(name)
    if self._local is not None:
      return Path(path).read_bytes()
    with self._fs.open(path, "rb") as f:
      return f.read()

  def read_text(self, name: str) -> str:
    return self.read_bytes(name).decode()

  def write_bytes(self, name: str, data: bytes) -> str:
    path = self._name(name)
    if self._local is not None:
      p = Path(path)
      p.parent.mkdir(parents=True, exist_ok=True)
      tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
      tmp.write_bytes(data)
      os.replace(tmp, p)
    else:
      parent = path.rsplit("/", 1)[0]
      self._fs.makedirs(parent, exist_ok=True)
      with self._fs.open(path, "wb") as f:  # one put: readers see the old object or the whole new one
        f.write(data)
    return path

  def write_text(self, name: str, text: str) -> str:
    return self.write_bytes(name, text.encode())

  def __str__(self) -> str:
    return self.location
