"""Dense vector index over unit-norm embeddings: ScaNN, or exact search with the same interface.

Scores are dot products of unit vectors (cosine similarity), so the ranking
equals the reference's exact L2 ranking (|a-b|^2 = 2 - 2 a.b).

`ScannIndex` uses ScaNN's pybind API (no TensorFlow): brute force below
`ScannParams.brute_force_below` vectors, otherwise a k-means tree with
asymmetric hashing and exact re-ordering, with parameters derived from the
corpus size (each overridable). `ExactIndex` is an exact top-k in numpy, or in
JAX when the default JAX backend is an accelerator.

Both keep docids themselves (JSON on disk) and support `upsert`/`delete`.
ScaNN's own docid file is a pickle; we never write or read it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


class VectorIndexError(ValueError):
  """Bad vectors, docids or index parameters."""


@dataclasses.dataclass(frozen=True)
class ScannParams:
  """ScaNN settings; None fields are derived from the number of vectors n."""

  brute_force_below: int = 20_000
  num_leaves: int | None = None            # default ~ sqrt(n)
  num_leaves_to_search: int | None = None  # default num_leaves / 10
  training_sample_size: int | None = None  # default min(n, 250_000)
  dims_per_block: int = 2
  anisotropic_quantization_threshold: float = 0.2
  reorder: int = 100                       # candidates re-scored exactly

  def resolve(self, n: int) -> dict:
    if n < self.brute_force_below:
      return {"kind": "brute_force"}
    leaves = self.num_leaves or max(2, int(round(np.sqrt(n))))
    return {"kind": "tree_ah", "num_leaves": leaves,
            "num_leaves_to_search": self.num_leaves_to_search or max(1, leaves // 10),
            "training_sample_size": self.training_sample_size or min(n, 250_000),
            "dims_per_block": self.dims_per_block,
            "anisotropic_quantization_threshold": self.anisotropic_quantization_threshold,
            "reorder": self.reorder}


def _check_vectors(vectors, dim: int | None = None) -> np.ndarray:
  v = np.asarray(vectors, dtype=np.float32)
  if v.ndim != 2:
    raise VectorIndexError(f"vectors must be [N, dim], got shape {v.shape}")
  if dim is not None and v.shape[1] != dim:
    raise VectorIndexError(f"vectors have dim {v.shape[1]}, the index holds dim {dim}")
  if not np.all(np.isfinite(v)):
    raise VectorIndexError("vectors contain NaN or inf")
  return v


def _check_docids(docids: Sequence[str], n: int) -> list[str]:
  docids = [str(d) for d in docids]
  if len(docids) != n:
    raise VectorIndexError(f"{len(docids)} docids for {n} vectors")
  if len(set(docids)) != len(docids):
    seen, dups = set(), []
    for d in docids:
      if d in seen:
        dups.append(d)
      seen.add(d)
    raise VectorIndexError(f"duplicate docids: {dups[:10]}")
  return docids


class _Base:
  backend = "?"

  def __init__(self, vectors: np.ndarray, docids: Sequence[str]):
    self.vectors = _check_vectors(vectors)
    self.docids = _check_docids(docids, len(self.vectors))
    self.row = {d: i for i, d in enumerate(self.docids)}

  @property
  def dim(self) -> int:
    return int(self.vectors.shape[1])

  def __len__(self) -> int:
    return len(self.docids)

  def _check_queries(self, queries, k: int) -> np.ndarray:
    q = _check_vectors(np.atleast_2d(queries), self.dim)
    if k < 1:
      raise VectorIndexError(f"k = {k}; expected k >= 1")
    if not len(self.docids):
      raise VectorIndexError("the index is empty")
    return q

  # Mutation keeps rows in the same order as ScaNN's mutable searcher: a new
  # docid is appended; deleting row i moves the last row into i.
  def _upsert_rows(self, docids: Sequence[str], vectors: np.ndarray) -> list[int | None]:
    vectors = _check_vectors(vectors, self.dim)
    docids = _check_docids(docids, len(vectors))
    rows = [self.row.get(d) for d in docids]
    new = [i for i, r in enumerate(rows) if r is None]
    for i, r in enumerate(rows):
      if r is not None:
        self.vectors[r] = vectors[i]
    if new:
      self.vectors = np.concatenate([self.vectors, vectors[new]])
      for i in new:
        self.row[docids[i]] = len(self.docids)
        self.docids.append(docids[i])
    return rows

  def _delete_row(self, docid: str) -> int:
    if docid not in self.row:
      raise KeyError(f"docid {docid!r} is not in the index")
    r = self.row.pop(docid)
    last = len(self.docids) - 1
    if r != last:
      moved = self.docids[last]
      self.docids[r] = moved
      self.row[moved] = r
      self.vectors[r] = self.vectors[last]
    self.docids.pop()
    self.vectors = self.vectors[:last]
    return r

  def describe(self) -> dict:
    return {"backend": self.backend}


class ExactIndex(_Base):
  """Exact top-k by dot product; JAX on an accelerator, numpy otherwise."""

  backend = "exact"

  def __init__(self, vectors, docids):
    super().__init__(vectors, docids)
    self._device = None

  def _on_accelerator(self) -> bool:
    try:
      import jax
      return jax.default_backend() != "cpu"
    except Exception:
      return False

  def search(self, queries, k: int = 5) -> tuple[list[list[str]], np.ndarray]:
    q = self._check_queries(queries, k)
    k = min(k, len(self.docids))
    if self._on_accelerator():
      import jax
      if self._device is None or self._device.shape != self.vectors.shape:
        self._device = jax.device_put(self.vectors)
      scores, idx = jax.lax.top_k(q @ self._device.T, k)
      scores, idx = np.asarray(scores), np.asarray(idx)
    else:
      idx, scores = [], []
      for s in range(0, len(q), 1024):  # bound the [Q, N] score matrix
        sims = q[s:s + 1024] @ self.vectors.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
            np.tile(np.arange(sims.shape[1]), (len(sims), 1))
        top_s = np.take_along_axis(sims, top, 1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        idx.append(np.take_along_axis(top, order, 1))
        scores.append(np.take_along_axis(top_s, order, 1))
      idx, scores = np.concatenate(idx), np.concatenate(scores)
    return [[self.docids[j] for j in row] for row in idx], scores.astype(np.float32)

  def upsert(self, docids: Sequence[str], vectors) -> None:
    self._upsert_rows(docids, vectors)
    self._device = None

  def delete(self, docids: Sequence[str]) -> None:
    for d in docids:
      self._delete_row(d)
    self._device = None

  def save_backend(self, folder: Path) -> None:
    pass

  @classmethod
  def load_backend(cls, folder: Path, vectors, docids, manifest) -> "ExactIndex":
    return cls(vectors, docids)


def _import_scann():
  try:
    import scann_pybind  # noqa: F401  (importing scann sets up its path)
  except ImportError:
    pass
  try:
    from scann.scann_ops.py import scann_ops_pybind
  except ImportError:
    raise VectorIndexError("the ScaNN backend needs `scann` (Linux only: pip install 'kadiff-jax[retrieval]'); "
                      "use --backend exact elsewhere") from None
  return scann_ops_pybind


class ScannIndex(_Base):
  backend = "scann"

  def __init__(self, vectors, docids, params: ScannParams = ScannParams(), *, _searcher=None, _config=None):
    super().__init__(vectors, docids)
    self.params = params
    self.config = _config or params.resolve(len(self.docids))
    self._searcher = _searcher if _searcher is not None else self._build()

  def _build(self):
    sp = _import_scann()
    n = len(self.vectors)
    c = self.config
    b = sp.builder(self.vectors, 10, "dot_product")
    if c["kind"] == "brute_force":
      b = b.score_brute_force()
    else:
      if c["num_leaves"] > n:
        raise VectorIndexError(f"num_leaves = {c['num_leaves']} exceeds the {n} vectors")
      b = (b.tree(num_leaves=c["num_leaves"], num_leaves_to_search=c["num_leaves_to_search"],
                  training_sample_size=min(c["training_sample_size"], n))
           .score_ah(c["dims_per_block"], anisotropic_quantization_threshold=c["anisotropic_quantization_threshold"])
           .reorder(c["reorder"]))
    return b.build().searcher  # the raw pybind searcher: no pickled docids anywhere

  def search(self, queries, k: int = 5, *, leaves_to_search: int | None = None,
             reorder: int | None = None) -> tuple[list[list[str]], np.ndarray]:
    """Top-k; `leaves_to_search` / `reorder` override the built settings for this call (tree only)."""
    q = self._check_queries(queries, k)
    k = min(k, len(self.docids))
    if self.config["kind"] == "brute_force":
      pre, leaves = k, -1
    else:
      pre = max(k, reorder or self.config["reorder"])
      leaves = leaves_to_search or -1
    idx, scores = self._searcher.search_batched(q, k, pre, leaves, len(q) > 64, 256)
    return [[self.docids[j] for j in row] for row in idx], np.asarray(scores, np.float32)

  def upsert(self, docids: Sequence[str], vectors) -> None:
    vectors = _check_vectors(vectors, self.dim)
    rows = self._upsert_rows(docids, vectors)
    self._searcher.upsert(rows, vectors, 1)

  def delete(self, docids: Sequence[str]) -> None:
    for d in docids:  # one at a time: each delete moves the last row, as _delete_row does
      r = self._delete_row(d)
      self._searcher.delete([r])

  def describe(self) -> dict:
    from importlib.metadata import PackageNotFoundError, version
    try:
      scann_version = version("scann")
    except PackageNotFoundError:
      scann_version = "unknown"
    return {"backend": self.backend, "scann_version": scann_version, "scann": self.config}

  def save_backend(self, folder: Path) -> None:
    sub = folder / "scann"
    sub.mkdir()
    self._searcher.serialize(str(sub), True)

  @classmethod
  def load_backend(cls, folder: Path, vectors, docids, manifest) -> "ScannIndex":
    _import_scann()
    import scann_pybind
    sub = folder / "scann"
    assets = (sub / "scann_assets.pbtxt").read_text()
    searcher = scann_pybind.ScannNumpy(str(sub), assets)  # asset paths are relative to `sub`
    return cls(vectors, docids, ScannParams(), _searcher=searcher, _config=manifest["index"]["scann"])


BACKENDS = {"scann": ScannIndex, "exact": ExactIndex}


def default_backend() -> str:
  try:
    _import_scann()
    return "scann"
  except VectorIndexError:
    return "exact"


def build_index(vectors, docids: Sequence[str], backend: str | None = None,
                params: ScannParams = ScannParams()):
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise VectorIndexError(f"index backend {backend!r}; expected one of {sorted(BACKENDS)}")
  if backend == "scann":
    return ScannIndex(vectors, docids, params)
  return ExactIndex(vectors, docids)


def save_vectors(folder: Path, index) -> None:
  np.save(folder / "vectors.npy", index.vectors, allow_pickle=False)
  (folder / "docids.json").write_text(json.dumps(index.docids))


def load_vectors(folder: Path) -> tuple[np.ndarray, list[str]]:
  vectors = np.load(folder / "vectors.npy", allow_pickle=False)
  docids = json.loads((folder / "docids.json").read_text())
  if len(docids) != len(vectors):
    raise VectorIndexError(f"{folder}: {len(docids)} docids for {len(vectors)} vectors; the index is damaged")
  return vectors, docids
