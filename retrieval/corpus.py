"""Corpus entries: reading JSONL / WIT TSV / Parquet, validating, storing metadata in SQLite.

An entry is one entity with an image: `id` (a stable docid), `title`,
`caption`, `summary` (the web-augmented "Summary_all" once augmentation has
run), `image` (a path or URL) and `aliases`. What gets embedded is
`entry.document()`: title, aliases, caption and summary in one string.

WIT rows (the 17 columns of the Wikipedia-based Image Text dataset) become
entries with docid = a hash of (page_url, image_url), the page title as
title, the reference description as caption and the page description as
summary.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

WIT_COLUMNS = (
    "language", "page_url", "image_url", "page_title", "section_title", "hierarchical_section_title",
    "caption_reference_description", "caption_attribution_description", "caption_alt_text_description",
    "mime_type", "original_height", "original_width", "is_main_image", "attribution_passes_lang_id",
    "page_changed_recently", "context_page_description", "context_section_description")
_FIELDS = ("id", "title", "caption", "summary", "image", "aliases")


class CorpusError(ValueError):
  """A corpus file cannot be used as it is: names the entries and what is wrong."""


@dataclasses.dataclass
class CorpusEntry:
  id: str
  title: str
  image: str
  caption: str = ""
  summary: str = ""
  aliases: tuple[str, ...] = ()
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other columns, kept verbatim

  def document(self) -> str:
    """The text that is embedded for this entry."""
    parts = [self.title]
    if self.aliases:
      parts.append("Also known as: " + ", ".join(self.aliases))
    parts += [self.caption, self.summary]
    return ". ".join(p.strip().rstrip(".") for p in parts if p and p.strip()) + "."

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["aliases"] = list(self.aliases)
    return d


def caption_text(entry: CorpusEntry) -> str:
  """The entry's caption, or its title where it has none: what an H-space database embeds and prompts with."""
  return entry.caption.strip() or entry.title


# The texts an index can embed per entry, by the name its manifest records.
FULL_DOCUMENT = "title. aliases. caption. summary"
DOCUMENTS = {FULL_DOCUMENT: CorpusEntry.document, "caption": caption_text}


def wit_docid(page_url: str, image_url: str) -> str:
  return hashlib.sha1(f"{page_url}\t{image_url}".encode()).hexdigest()[:16]


def _entry_from_record(rec: dict[str, Any], where: str) -> CorpusEntry:
  if "image_url" in rec and "page_title" in rec and "id" not in rec:  # a WIT row
    caption = next((rec.get(k) for k in ("caption_reference_description", "caption_attribution_description",
                                         "caption_alt_text_description") if rec.get(k)), "")
    return CorpusEntry(
        id=wit_docid(str(rec.get("page_url") or ""), str(rec.get("image_url") or "")),
        title=str(rec.get("page_title") or ""), image=str(rec.get("image_url") or ""), caption=str(caption or ""),
        summary=str(rec.get("context_page_description") or ""),
        extra={k: rec[k] for k in rec if k not in ("page_title", "image_url", "context_page_description")
               and rec[k] not in (None, "")})
  if "id" not in rec or rec["id"] in (None, ""):
    raise CorpusError(f"{where}: entry has no 'id' (expected fields {list(_FIELDS)})")
  aliases = rec.get("aliases") or ()
  if isinstance(aliases, str):
    aliases = [a.strip() for a in aliases.split("|") if a.strip()]
  if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) for a in aliases):
    raise CorpusError(f"{where}: 'aliases' = {aliases!r}; expected a list of strings")
  return CorpusEntry(
      id=str(rec["id"]), title=str(rec.get("title") or ""), image=str(rec.get("image") or ""),
      caption=str(rec.get("caption") or ""), summary=str(rec.get("summary") or ""), aliases=tuple(aliases),
      extra={k: v for k, v in rec.items() if k not in _FIELDS})


def _open_text(path: Path):
  if path.suffix == ".gz":
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def _read_jsonl(path: Path) -> list[CorpusEntry]:
  out = []
  with _open_text(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(rec, dict):
        raise CorpusError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
      out.append(_entry_from_record(rec, f"{path}:{n}"))
  return out


def _read_wit_tsv(path: Path) -> list[CorpusEntry]:
  csv.field_size_limit(1 << 26)
  with _open_text(path) as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
      return []
    if tuple(header) != WIT_COLUMNS:
      missing = [c for c in WIT_COLUMNS if c not in header]
      if missing:
        raise CorpusError(f"{path}: not a WIT TSV: the header lacks {missing} (expected the 17 WIT columns)")
    out = []
    for n, row in enumerate(reader, 2):
      if len(row) != len(header):
        raise CorpusError(f"{path}:{n}: {len(row)} columns, the header has {len(header)}")
      out.append(_entry_from_record(dict(zip(header, row)), f"{path}:{n}"))
  return out


def _read_parquet(path: Path) -> list[CorpusEntry]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise CorpusError(f"{path}: reading Parquet needs pyarrow (pip install 'kadiff-jax[retrieval]')") from None
  rows = pq.read_table(path).to_pylist()
  return [_entry_from_record(r, f"{path}: row {i}") for i, r in enumerate(rows)]


def read_entries(path: str | os.PathLike) -> list[CorpusEntry]:
  """Reads .jsonl / .tsv (WIT) / .parquet, optionally .gz-compressed (not Parquet); no validation."""
  path = Path(path)
  if not path.is_file():
    raise CorpusError(f"corpus file {path} does not exist")
  name = path.name.lower().removesuffix(".gz")
  if name.endswith((".jsonl", ".json")):
    return _read_jsonl(path)
  if name.endswith((".tsv", ".tsv.txt")):
    return _read_wit_tsv(path)
  if name.endswith(".parquet"):
    return _read_parquet(path)
  raise CorpusError(f"corpus file {path}: unknown format; expected .jsonl, a WIT .tsv(.gz) or .parquet")


def validate(entries: Sequence[CorpusEntry], *, skip_invalid: bool = False,
             source: str = "corpus") -> list[CorpusEntry]:
  """Checks ids are unique and every entry has a title and an image.

  Raises CorpusError naming the offending ids; with `skip_invalid`, entries
  without an image or title are dropped with a warning (duplicates are
  always an error: which copy is meant cannot be guessed).
  """
  if not entries:
    raise CorpusError(f"{source} is empty: there is nothing to index")
  seen: dict[str, int] = {}
  dups = []
  for e in entries:
    seen[e.id] = seen.get(e.id, 0) + 1
    if seen[e.id] == 2:
      dups.append(e.id)
  if dups:
    raise CorpusError(f"{source}: {len(dups)} duplicate ids: {dups[:10]}")
  bad = [(e.id, "no image" if not e.image.strip() else "no title") for e in entries
         if not e.image.strip() or not e.title.strip()]
  if bad and not skip_invalid:
    raise CorpusError(f"{source}: {len(bad)} entries cannot be indexed: "
                      + ", ".join(f"{i!r} ({why})" for i, why in bad[:10])
                      + " (pass --skip-invalid to leave them out)")
  if bad:
    log.warning("%s: leaving out %d entries: %s", source, len(bad), bad[:10])
    dropped = {i for i, _ in bad}
    entries = [e for e in entries if e.id not in dropped]
    if not entries:
      raise CorpusError(f"{source}: no valid entries left after leaving out {len(bad)}")
  return list(entries)


def read_corpus(path: str | os.PathLike, *, skip_invalid: bool = False) -> list[CorpusEntry]:
  """Reads and validates a corpus file; relative image paths are made relative to the file."""
  path = Path(path)
  entries = read_entries(path)
  for e in entries:
    if e.image and "://" not in e.image and not os.path.isabs(e.image):
      e.image = str((path.parent / e.image).resolve())
  return validate(entries, skip_invalid=skip_invalid, source=str(path))


# --- metadata store -----------------------------------------------------------------------------

_SCHEMA = """CREATE TABLE IF NOT EXISTS entries (
  docid TEXT PRIMARY KEY, title TEXT NOT NULL, caption TEXT, summary TEXT, image TEXT NOT NULL,
  aliases TEXT, extra TEXT)"""


def write_store(path: Path, entries: Iterable[CorpusEntry]) -> None:
  """Adds entries to the SQLite file at `path`, creating it if needed (callers make it atomic)."""
  con = sqlite3.connect(path)
  try:
    con.execute(_SCHEMA)
    con.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(e.id, e.title, e.caption, e.summary, e.image, json.dumps(list(e.aliases)),
                      json.dumps(e.extra, default=str)) for e in entries])
    con.commit()
  finally:
    con.close()


def read_store(path: Path, docids: Sequence[str] | None = None) -> dict[str, CorpusEntry]:
  """Entries by docid (all, or those in `docids`)."""
  if not Path(path).is_file():
    raise CorpusError(f"{path} does not exist (the index's entry store)")
  # a URI, so the read-only mode holds; the path is escaped (a '%', '?' or '#' in it is a plain character)
  try:
    con = sqlite3.connect(f"file:{urllib.parse.quote(str(Path(path).resolve()))}?mode=ro", uri=True)
    try:
      cols = "docid, title, caption, summary, image, aliases, extra"
      if docids is None:
        rows = con.execute(f"SELECT {cols} FROM entries").fetchall()
      else:
        rows = []
        ids = list(docids)
        for s in range(0, len(ids), 500):
          chunk = ids[s:s + 500]
          rows += con.execute(f"SELECT {cols} FROM entries WHERE docid IN ({','.join('?' * len(chunk))})",
                              chunk).fetchall()
    finally:
      con.close()
    return {r[0]: CorpusEntry(id=r[0], title=r[1], caption=r[2] or "", summary=r[3] or "", image=r[4],
                              aliases=tuple(json.loads(r[5] or "[]")), extra=json.loads(r[6] or "{}"))
            for r in rows}
  except (sqlite3.Error, json.JSONDecodeError, TypeError) as e:
    raise CorpusError(f"{path} is not a readable entry store ({type(e).__name__}: {e})") from None
