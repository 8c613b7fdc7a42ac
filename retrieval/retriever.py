"""Query -> reference entry: (optional) web query expansion, dense search, (optional) MLLM re-ranking."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrieval import rerank as rerank_lib
from retrieval import web
from retrieval.corpus import CorpusEntry
from retrieval.http_client import HttpPolicy, fetch
from retrieval.store import RetrievalIndex

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Candidate:
  id: str
  score: float          # cosine similarity of query and entry
  rank: int             # 0-based, by score
  entry: CorpusEntry

  def to_json(self) -> dict[str, Any]:
    return {"id": self.id, "score": round(self.score, 6), "rank": self.rank, "title": self.entry.title,
            "image": self.entry.image, "caption": self.entry.caption}


@dataclasses.dataclass
class Retrieval:
  query: str
  search_text: str              # the query after expansion
  candidates: list[Candidate]   # by dense score
  chosen: Candidate
  decision: rerank_lib.Decision | None = None

  def to_json(self) -> dict[str, Any]:
    """Results ranked best first: the chosen entry, then the other candidates by score."""
    results = [self.chosen] + [c for c in self.candidates if c.id != self.chosen.id]
    out: dict[str, Any] = {"query": self.query, "results": [c.to_json() for c in results]}
    if self.search_text != self.query:
      out["expanded_query"] = self.search_text
    if self.decision is not None:
      d = self.decision
      out["rerank"] = {"rule": d.rule, "chosen": d.chosen, "top1_judgement": d.judgement, "scores": d.scores}
      for r in out["results"]:
        if r["id"] in d.scores:
          r["rerank_scores"] = d.scores[r["id"]]
    return out


def load_image(source: str, *, cache_dir: str | os.PathLike | None = None,
               policy: HttpPolicy = HttpPolicy(deadline=60.0, max_bytes=50_000_000)):
  """A corpus image as an RGB PIL image: a local path, or an http(s) URL (downloaded once into cache_dir,
  under `policy`: public hosts only, bounded in time and size). Other URL schemes are refused."""
  from kadiff_jax import image_io
  if "://" in source:
    cached = None
    if cache_dir:
      cached = Path(cache_dir) / "images" / hashlib.sha256(source.encode()).hexdigest()
      if cached.is_file():
        return image_io.load_rgb(cached)
    data, _ = fetch(source, policy)
    image = image_io.load_rgb(io.BytesIO(data), name=source)
    if cached is not None:
      cached.parent.mkdir(parents=True, exist_ok=True)
      tmp = cached.with_suffix(f".tmp-{os.getpid()}")
      tmp.write_bytes(data)
      os.replace(tmp, cached)
    return image
  return image_io.load_rgb(source)


class Retriever:
  def __init__(self, index: RetrievalIndex, embedder, *, reranker: rerank_lib.Reranker | None = None,
               augmenter: web.WebAugmenter | None = None, image_cache: str | os.PathLike | None = None,
               http_policy: HttpPolicy | None = None):
    index.check_embedder(embedder)
    self.index, self.embedder, self.reranker, self.augmenter = index, embedder, reranker, augmenter
    self.image_cache = image_cache
    # images are larger than pages: the same host and time rules, a 50 MB body cap
    self.image_policy = dataclasses.replace(http_policy or HttpPolicy(), max_bytes=50_000_000)
  def search(self, queries: Sequence[str], k: int = 5) -> list[tuple[str, list[Candidate]]]:
    """Dense top-k per query (after expansion, if an augmenter is set)."""
    texts = [web.expand_query(q, self.augmenter) if self.augmenter else q for q in queries]
    hits = self.index.search(self.embedder.encode(texts), k)
    entries = self.index.entries({d for row in hits for d, _ in row})
    return [(t, [Candidate(d, s, i, entries[d]) for i, (d, s) in enumerate(row)]) for t, row in zip(texts, hits)]

  def retrieve(self, query: str, k: int = 5, *, rerank: bool | None = None) -> Retrieval:
    """The chosen reference for `query`; re-ranked when a reranker is set (unless rerank=False)."""
    text, cands = self.search([query], k)[0]
    return self.choose(query, text, cands, rerank=rerank)

  def choose(self, query: str, text: str, cands: list[Candidate], *, rerank: bool | None = None) -> Retrieval:
    """The chosen entry among searched candidates (re-ranked when a reranker is set, unless rerank=False)."""
    if not cands:
      raise ValueError(f"the index returned no candidates for {query!r}")
    use = self.reranker is not None if rerank is None else rerank
    if not use:
      return Retrieval(query, text, cands, cands[0])
    if self.reranker is None:
      raise ValueError("re-ranking was asked for but no re-ranker is configured")
    described = []
    for c in cands:
      try:
        image = load_image(c.entry.image, cache_dir=self.image_cache, policy=self.image_policy)
      except (OSError, ValueError, web.NetworkError) as e:
        log.warning("re-ranking %r: skipping %s, its image cannot be read: %s", query, c.id, e)
        continue
      described.append((c.id, c.entry.document(), image))
    if not described:
      log.warning("re-ranking %r: no candidate image could be read; keeping the top-1", query)
      return Retrieval(query, text, cands, cands[0])
    from kadiff_jax.progress import step
    with step("re-ranking %d candidates for %r with %s", len(described), query,
              getattr(self.reranker, "id", type(self.reranker).__name__)):
      decision = rerank_lib.choose(query, described, self.reranker)
    chosen = next(c for c in cands if c.id == decision.chosen)
    return Retrieval(query, text, cands, chosen, decision)


def evaluate(retriever: Retriever, queries: Sequence[dict[str, str]], *, k: int = 5,
             rerank: bool = False) -> dict[str, Any]:
  """Top-1 / top-k accuracy of dense search (and of the re-ranked choice), as the reference measures it."""
  if not queries:
    raise ValueError("the query set is empty")
  for i, q in enumerate(queries):
    if not isinstance(q, dict) or "query" not in q or "id" not in q:
      raise ValueError(f"query {i}: expected an object with 'query' and 'id', got {q!r}")
  results = retriever.search([q["query"] for q in queries], k)
  top1 = [cands[0].id == q["id"] for q, (_, cands) in zip(queries, results)]
  topk = [q["id"] in {c.id for c in cands} for q, (_, cands) in zip(queries, results)]
  out: dict[str, Any] = {"queries": len(queries), "k": k, "top1": float(np.mean(top1)), f"top{k}": float(np.mean(topk))}
  misses = [{"query": q["query"], "want": q["id"], "got": cands[0].id}
            for q, (_, cands), ok in zip(queries, results, top1) if not ok]
  if rerank:
    chosen = [retriever.choose(q["query"], text, cands, rerank=True).chosen.id
              for q, (text, cands) in zip(queries, results)]
    out["top1_reranked"] = float(np.mean([c == q["id"] for c, q in zip(chosen, queries)]))
  out["misses"] = misses
  return out
