"""A retrieval corpus and query set built from the DreamBooth dataset folder.

The descriptions (title, aliases, caption, summary) and two differently
phrased queries per subject live in `data/dreambooth_entities.json`; images
come from the dataset folder (`SUBJECT/00.jpg`, the first image of each).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from retrieval.corpus import CorpusEntry, CorpusError

_ENTITIES = Path(__file__).with_name("data") / "dreambooth_entities.json"


def is_dreambooth_dir(path: str | os.PathLike) -> bool:
  return (Path(path) / "prompts_and_classes.txt").is_file()


def read_classes(data_dir: Path) -> dict[str, str]:
  """subject -> class token, from `prompts_and_classes.txt`."""
  text = (data_dir / "prompts_and_classes.txt").read_text()
  out = {}
  for line in text.splitlines():
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and parts[0] and parts[0] != "subject_name" and " " not in parts[0]:
      out[parts[0]] = parts[1]
  return out


def _entities() -> list[dict]:
  return json.loads(_ENTITIES.read_text())["entities"]


def subject_image(data_dir: Path, subject: str) -> Path:
  folder = data_dir / subject
  images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) \
      if folder.is_dir() else []
  if not images:
    raise CorpusError(f"DreamBooth subject {subject!r}: no images in {folder}")
  return images[0]


def dreambooth_corpus(data_dir: str | os.PathLike) -> list[CorpusEntry]:
  """One entry per subject present in `data_dir`, with its first image."""
  data_dir = Path(data_dir)
  if not is_dreambooth_dir(data_dir):
    raise CorpusError(f"{data_dir} is not a DreamBooth dataset folder (no prompts_and_classes.txt)")
  classes = read_classes(data_dir)
  out = []
  for e in _entities():
    if not (data_dir / e["id"]).is_dir():
      continue
    out.append(CorpusEntry(id=e["id"], title=e["title"], image=str(subject_image(data_dir, e["id"])),
                           caption=e["caption"], summary=e["summary"], aliases=tuple(e["aliases"]),
                           extra={"class": classes.get(e["id"], "")}))
  if not out:
    raise CorpusError(f"{data_dir}: none of the DreamBooth subjects' folders are present")
  return out


def dreambooth_queries() -> list[dict[str, str]]:
  """[{"query": ..., "id": subject}], two per subject."""
  return [{"query": q, "id": e["id"]} for e in _entities() for q in e["queries"]]
