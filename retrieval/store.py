"""A retrieval index on disk: vectors, docids, entry metadata and a manifest, saved atomically.

Layout of an index directory:

  manifest.json   format version, embedder id + fingerprint, dim, distance,
                  normalisation, backend (+ ScaNN version and parameters), count
  docids.json     row -> docid
  vectors.npy     the unit-norm embeddings (float32, loaded with allow_pickle=False)
  corpus.sqlite   entries keyed by docid
  scann/          ScaNN's serialised searcher (ScaNN backend only)

A directory is written next to its destination and renamed into place, so a
crash never leaves a half-written index; nothing in it is unpickled. An
existing folder is replaced only when its manifest says it is one of ours.
The manifest holds a SHA-256 of every other file, checked when the index is
opened (`verify=False` skips it for huge indexes), so a tampered or
half-written index is refused. A save killed between its two renames leaves
the previous index as `.NAME.old-PID`; opening or saving puts it back, and
temporary folders of builds that died are removed, each with a log line.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from retrieval import corpus as corpus_lib
from retrieval import index as index_lib

log = logging.getLogger(__name__)

FORMAT = "kadiff-retrieval-index"
VERSION = 1


class StoreError(ValueError):
  """An index directory is missing, damaged, or was built for something else."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _leftovers(dest: Path) -> list[tuple[Path, str, int]]:
  """(path, "tmp" | "old", pid) of the temporary folders saves of `dest` left behind."""
  out = []
  for p in dest.parent.glob(f".{dest.name}.*-*"):
    kind, _, pid = p.name[len(dest.name) + 2:].rpartition("-")
    if kind in ("tmp", "old") and pid.isdigit():
      out.append((p, kind, int(pid)))
  return out


def recover(dest: str | os.PathLike, fmt: str = FORMAT) -> None:
  """Puts back an index (of manifest format `fmt`) a killed save left only as `.NAME.old-PID`; removes dead saves'
  temporary folders."""
  dest = Path(dest)
  for path, kind, pid in _leftovers(dest):
    if pid != os.getpid() and _pid_alive(pid):
      continue  # another save is running
    if kind == "old" and not dest.exists() and is_ours(path, fmt):
      os.replace(path, dest)
      log.warning("recovered index %s from %s (a save was interrupted between its renames)", dest, path.name)
    else:
      shutil.rmtree(path, ignore_errors=True)
      log.warning("removed %s, left by an interrupted index save", path)


def is_ours(folder: Path, fmt: str = FORMAT) -> bool:
  """Whether `folder` holds a manifest of format `fmt` (any version)."""
  try:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
  except (OSError, ValueError):
    return False
  return isinstance(manifest, dict) and manifest.get("format") == fmt and isinstance(manifest.get("version"), int)


def check_destination(dest: str | os.PathLike, fmt: str = FORMAT, what: str = "kadiff retrieval index") -> None:
  """Fails unless a folder of format `fmt` may be written at `dest`: absent, or one of ours (after recovering
  it)."""
  dest = Path(dest)
  if dest.parent.is_dir():
    recover(dest, fmt)
  if dest.exists() and not is_ours(dest, fmt):
    raise StoreError(f"{dest} exists and is not a {what} (no manifest.json with format {fmt!r}); refusing to "
                     "replace it")


def atomic_dir(dest: Path, fill, fmt: str = FORMAT, what: str = "kadiff retrieval index") -> None:
  """Writes a folder of manifest format `fmt` at `dest`: `fill(tmp)` fills a sibling temporary folder, which is then
  renamed into place (the previous folder is replaced only when it is of the same format)."""
  dest = Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  check_destination(dest, fmt, what)
  tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
  old = dest.parent / f".{dest.name}.old-{os.getpid()}"
  for p in (tmp, old):
    if p.exists():
      shutil.rmtree(p)
  tmp.mkdir()
  try:
    fill(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if dest.exists():
    os.replace(dest, old)
  os.replace(tmp, dest)
  shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: Path, fmt: str = FORMAT, version: int = VERSION, what: str = "retrieval index",
                  build: str = "kadiff retrieve build") -> dict:
  """The manifest.json of a `what` folder, refused (StoreError, one line) when missing, not JSON, or of another
  format or version."""
  mpath = Path(folder) / "manifest.json"
  if not mpath.is_file():
    raise StoreError(f"{folder} is not a {what} (no manifest.json); build one with `{build}`")
  try:
    manifest = json.loads(mpath.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise StoreError(f"{mpath} is not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != fmt or manifest.get("version") != version:
    got = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
    raise StoreError(f"{mpath}: format {got[0]!r} version {got[1]!r}; expected {fmt!r} version {version}")
  return manifest


def mismatched_files(folder: Path, manifest: dict) -> list[str]:
  """The files of `folder` whose SHA-256 differs from the manifest's `checksums` (or that one side lacks)."""
  found, want = checksums(folder), manifest["checksums"]
  return sorted(k for k in set(found) | set(want) if found.get(k) != want.get(k))


def checksums(folder: Path) -> dict[str, str]:
  """SHA-256 of every file in an index folder but the manifest, by relative path."""
  out = {}
  for p in sorted(Path(folder).rglob("*")):
    if p.is_file() and p.name != "manifest.json":
      h = hashlib.sha256()
      with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
      out[p.relative_to(folder).as_posix()] = h.hexdigest()
  return out


class RetrievalIndex:
  """Vectors + docids (an index backend) and the entries they point to."""

  def __init__(self, index, manifest: dict, store: Path | None = None,
               entries: dict[str, corpus_lib.CorpusEntry] | None = None):
    self.index = index
    self.manifest = manifest
    self._store = store                          # SQLite file of a loaded index
    self._pending: dict[str, corpus_lib.CorpusEntry | None] = dict(entries or {})  # not yet in _store

  # --- building -----------------------------------------------------------------------------------
  @classmethod
  def build(cls, entries: Sequence[corpus_lib.CorpusEntry], embedder, *, backend: str | None = None,
            params: index_lib.ScannParams = index_lib.ScannParams(), augment: str = "none",
            batch_size: int = 64, progress: bool = False,
            document: str = corpus_lib.FULL_DOCUMENT) -> "RetrievalIndex":
    """`document` names the text embedded per entry (a key of `corpus.DOCUMENTS`)."""
    entries = corpus_lib.validate(entries)
    text = corpus_lib.DOCUMENTS[document]
    vectors = embedder.encode([text(e) for e in entries], batch_size=batch_size, progress=progress)
    index = index_lib.build_index(vectors, [e.id for e in entries], backend, params)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "embedder": {"id": embedder.id, "fingerprint": embedder.fingerprint, "dim": int(embedder.dim)},
        "distance": "dot_product", "normalized": True, "document": document,
        "augment": augment, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return cls(index, manifest, entries={e.id: e for e in entries})

  # --- reading ------------------------------------------------------------------------------------
  def __len__(self) -> int:
    return len(self.index)

  def entries(self, docids: Iterable[str]) -> dict[str, corpus_lib.CorpusEntry]:
    docids = list(docids)
    out = {}
    stored = [d for d in docids if d not in self._pending]
    if stored and self._store is not None:
      out.update(corpus_lib.read_store(self._store, stored))
    for d in docids:
      if self._pending.get(d) is not None:
        out[d] = self._pending[d]
    return out

  def check_embedder(self, embedder) -> None:
    want = self.manifest["embedder"]
    if embedder.fingerprint != want["fingerprint"] or embedder.dim != want["dim"]:
      raise StoreError(f"the index was built with embedder {want['id']!r} (fingerprint {want['fingerprint']}, "
                       f"dim {want['dim']}); {embedder.id!r} has fingerprint {embedder.fingerprint}, dim "
                       f"{embedder.dim}. Query with the same embedder or rebuild the index")

  def search(self, query_vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    ids, scores = self.index.search(query_vectors, k)
    return [[(d, float(s)) for d, s in zip(row_ids, row_s)] for row_ids, row_s in zip(ids, scores)]

  # --- changing -----------------------------------------------------------------------------------
  def upsert(self, entries: Sequence[corpus_lib.CorpusEntry], embedder) -> None:
    """Adds new entries and replaces existing ones (same docid)."""
    self.check_embedder(embedder)
    entries = corpus_lib.validate(entries, source="upserted entries")
    text = corpus_lib.DOCUMENTS[self.manifest.get("document", corpus_lib.FULL_DOCUMENT)]
    vectors = embedder.encode([text(e) for e in entries])
    self.index.upsert([e.id for e in entries], vectors)
    for e in entries:
      self._pending[e.id] = e

  def delete(self, docids: Sequence[str]) -> None:
    repeated = sorted(d for d, n in collections.Counter(docids).items() if n > 1)
    if repeated:
      raise StoreError(f"docids given more than once: {repeated[:10]}")
    missing = [d for d in docids if d not in self.index.row]
    if missing:
      raise StoreError(f"cannot delete {len(missing)} docids that are not in the index: {missing[:10]}")
    self.index.delete(list(docids))
    for d in docids:
      self._pending[d] = None

  # --- disk ---------------------------------------------------------------------------------------
  def save(self, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    manifest = dict(self.manifest, count=len(self.index), index=self.index.describe())

    def fill(tmp: Path) -> None:
      db = tmp / "corpus.sqlite"
      if self._store is not None:
        shutil.copyfile(self._store, db)
        con = sqlite3.connect(db)
        try:
          con.executemany("DELETE FROM entries WHERE docid = ?", [(d,) for d in self._pending])
          con.commit()
        finally:
          con.close()
      corpus_lib.write_store(db, [e for e in self._pending.values() if e is not None])
      index_lib.save_vectors(tmp, self.index)
      self.index.save_backend(tmp)
      manifest["checksums"] = checksums(tmp)
      (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks the folder complete

    atomic_dir(folder, fill)
    self.manifest, self._store, self._pending = manifest, folder / "corpus.sqlite", {}
    return folder

  @classmethod
  def load(cls, folder: str | os.PathLike, backend: str | None = None, *, verify: bool = True) -> "RetrievalIndex":
    """Loads an index directory; `backend` rebuilds it with another backend in memory (e.g. exact).
    With `verify`, every file must match the manifest's checksum."""
    folder = Path(folder)
    recover(folder)
    manifest = read_manifest(folder)
    _check_manifest(folder / "manifest.json", manifest)
    if verify:
      bad = mismatched_files(folder, manifest)
      if bad:
        raise StoreError(f"{folder}: {', '.join(bad[:5])} do not match the manifest's checksums (a damaged, "
                         "half-written or altered index); rebuild it (or open with --no-verify at your own risk)")
    try:
      vectors, docids = index_lib.load_vectors(folder)
    except (OSError, ValueError, EOFError) as e:
      raise StoreError(f"{folder}: vectors.npy or docids.json is unreadable ({e})") from None
    if len(docids) != manifest["count"] or vectors.ndim != 2 or vectors.shape[1] != manifest["embedder"]["dim"]:
      raise StoreError(f"{folder}: manifest says {manifest['count']} vectors of dim {manifest['embedder']['dim']}, "
                       f"the files hold {len(docids)} docids and vectors of shape {tuple(vectors.shape)}")
    if len(set(docids)) != len(docids) or not all(isinstance(d, str) for d in docids):
      raise StoreError(f"{folder}/docids.json: expected distinct string ids")
    saved = manifest["index"]["backend"]
    backend = backend or saved
    if backend not in index_lib.BACKENDS:
      raise StoreError(f"index backend {backend!r}; expected one of {sorted(index_lib.BACKENDS)}")
    if backend == saved:
      try:
        index = index_lib.BACKENDS[backend].load_backend(folder, vectors, docids, manifest)
      except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise StoreError(f"{folder}: the {saved} index files are unreadable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); rebuild the index") from None
    else:
      log.info("index %s was saved with %s; building %s in memory", folder, saved, backend)
      index = index_lib.build_index(vectors, docids, backend)
    return cls(index, manifest, store=folder / "corpus.sqlite")



_MANIFEST_FIELDS = {"count": int, "embedder": dict, "index": dict, "checksums": dict}


def _check_manifest(path: Path, manifest: dict) -> None:
  """Fields a manifest must have, with their types, named when missing or wrong."""
  for key, kind in _MANIFEST_FIELDS.items():
    if not isinstance(manifest.get(key), kind):
      raise StoreError(f"{path}: field {key!r} is {manifest.get(key)!r}, expected type {kind.__name__}")
  for key, sub in (("embedder", "dim"), ("embedder", "fingerprint"), ("index", "backend")):
    if sub not in manifest[key]:
      raise StoreError(f"{path}: field {key}.{sub} is missing")
