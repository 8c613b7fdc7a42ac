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
