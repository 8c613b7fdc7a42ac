"""A retrieval index on disk: vectors, docids, entry metadata and a manifest, saved atomically.

Layout of an index directory:

  manifest.json   format version, embedder id + fingerprint, dim, distance,
                  normalisation, backend (+ ScaNN version and parameters), count
  docids.json     row -> docid
  vectors.npy     the unit-norm embeddings (float32, loaded with allow_pickle=False)
  corpus.sqlite   entries keyed by docid
  scann/          ScaNN's serialised searcher (ScaNN backend only)

A directory is written next to its destination and renamed into place, so a
crash never leaves a half-written index; nothing in it is unpickled.
"""

from __future__ import annotations

import datetime
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


def _atomic_dir(dest: Path, fill) -> None:
  dest = Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
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
    if not (dest / "manifest.json").is_file():
      shutil.rmtree(tmp, ignore_errors=True)
      raise StoreError(f"{dest} exists and is not a retrieval index; refusing to replace it")
    os.replace(dest, old)
  os.replace(tmp, dest)
  shutil.rmtree(old, ignore_errors=True)


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
            batch_size: int = 64, progress: bool = False) -> "RetrievalIndex":
    entries = corpus_lib.validate(entries)
    vectors = embedder.encode([e.document() for e in entries], batch_size=batch_size, progress=progress)
    index = index_lib.build_index(vectors, [e.id for e in entries], backend, params)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "embedder": {"id": embedder.id, "fingerprint": embedder.fingerprint, "dim": int(embedder.dim)},
        "distance": "dot_product", "normalized": True, "document": "title. aliases. caption. summary",
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
    vectors = embedder.encode([e.document() for e in entries])
    self.index.upsert([e.id for e in entries], vectors)
    for e in entries:
      self._pending[e.id] = e

  def delete(self, docids: Sequence[str]) -> None:
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
      (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    _atomic_dir(folder, fill)
    self.manifest, self._store, self._pending = manifest, folder / "corpus.sqlite", {}
    return folder

  @classmethod
  def load(cls, folder: str | os.PathLike, backend: str | None = None) -> "RetrievalIndex":
    """Loads an index directory; `backend` rebuilds it with another backend in memory (e.g. exact)."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
      raise StoreError(f"{folder} is not a retrieval index (no manifest.json); build one with "
                       "`kadiff retrieve build`")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
      raise StoreError(f"{mpath}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                       f"expected {FORMAT!r} version {VERSION}")
    vectors, docids = index_lib.load_vectors(folder)
    if len(docids) != manifest["count"]:
      raise StoreError(f"{folder}: manifest says {manifest['count']} vectors, docids.json has {len(docids)}")
    saved = manifest["index"]["backend"]
    backend = backend or saved
    if backend not in index_lib.BACKENDS:
      raise StoreError(f"index backend {backend!r}; expected one of {sorted(index_lib.BACKENDS)}")
    if backend == saved:
      index = index_lib.BACKENDS[backend].load_backend(folder, vectors, docids, manifest)
    else:
      log.info("index %s was saved with %s; building %s in memory", folder, saved, backend)
      index = index_lib.build_index(vectors, docids, backend)
    return cls(index, manifest, store=folder / "corpus.sqlite")

