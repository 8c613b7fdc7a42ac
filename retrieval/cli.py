"""`kadiff retrieve build|query|evaluate|upsert|delete`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from kadiff_jax import cli_args

log = logging.getLogger(__name__)


def _web_cache(args) -> Path:
  if args.web_cache:
    return Path(args.web_cache)
  from kadiff_jax.weights.load import default_cache_dir
  return default_cache_dir() / "web"


def http_policy(args):
  """The HTTP limits the web options name (one place for every request the retriever makes)."""
  from retrieval.http_client import HttpPolicy
  return HttpPolicy(connect_timeout=args.timeout, read_timeout=args.timeout, deadline=args.deadline,
                    max_bytes=args.max_bytes, allow_private_hosts=args.allow_private_hosts)


def _augmenter(args):
  from retrieval import web
  policy = http_policy(args)
  return web.WebAugmenter(
      web.DDGSSearch(backend=args.search_backend, timeout=args.timeout),
      web.load_summarizer(args.summarizer, args.summarizer_model,
                          llm_policy(policy) if args.summarizer.startswith("openai:") else None),
      fetcher=web.PageFetcher(policy=policy), cache=web.DiskCache(_web_cache(args)),
      max_pages=args.max_pages)


def llm_policy(policy):
  """An LLM endpoint answers slowly but small: a longer read timeout and deadline, the same host rules."""
  import dataclasses
  return dataclasses.replace(policy, read_timeout=max(policy.read_timeout, 60.0),
                             deadline=max(policy.deadline, 120.0))


def _read_entries(path: str, skip_invalid: bool):
  from retrieval import corpus, dreambooth
  if Path(path).is_dir():
    if not dreambooth.is_dreambooth_dir(path):
      raise corpus.CorpusError(f"--corpus {path} is a folder but not a DreamBooth dataset "
                               "(no prompts_and_classes.txt); pass a .jsonl, WIT .tsv or .parquet file")
    return dreambooth.dreambooth_corpus(path)
  return corpus.read_corpus(path, skip_invalid=skip_invalid)


def _build(args) -> None:
  from retrieval import embed, index, store, web
  store.check_destination(args.index)  # before any work: a folder that is not an index is never replaced
  entries = _read_entries(args.corpus, args.skip_invalid)
  report = {"entries": len(entries)}
  if args.augment == "web":
    report["augment"] = web.augment_entries(entries, _augmenter(args), progress=True)
    if report["augment"]["failed"]:
      log.warning("%d entries kept their own text (augmentation failed)", len(report["augment"]["failed"]))
  params = index.ScannParams(**{k: v for k, v in (("num_leaves", args.num_leaves),
                                                   ("num_leaves_to_search", args.leaves_to_search),
                                                   ("reorder", args.reorder)) if v is not None})
  ri = store.RetrievalIndex.build(entries, embed.load_embedder(args.embedder), backend=args.backend,
                                  params=params, augment=args.augment, progress=True)
  ri.save(args.index)
  report.update(index=str(args.index), count=len(ri), backend=ri.manifest["index"]["backend"],
                embedder=ri.manifest["embedder"]["id"])
  print(json.dumps(report))


def open_retriever(args, *, rerank: str | None = None, expand: bool = False):
  """A Retriever from parsed arguments (--index, --embedder, --backend, --scoring, web options)."""
  from retrieval import embed, rerank as rerank_lib, retriever, store
  ri = store.RetrievalIndex.load(args.index, backend=getattr(args, "backend", None),
                                 verify=not getattr(args, "no_verify", False))
  embedder = embed.load_embedder(args.embedder or ri.manifest["embedder"]["id"])
  reranker = rerank_lib.MLLMReranker(rerank, scoring=args.scoring) if rerank else None
  return retriever.Retriever(ri, embedder, reranker=reranker, augmenter=_augmenter(args) if expand else None,
                             image_cache=_web_cache(args), http_policy=http_policy(args))


def _query(args) -> None:
  r = open_retriever(args, rerank=args.rerank, expand=args.expand).retrieve(args.text, args.k)
  out = r.to_json()
  if args.json:
    print(json.dumps(out))
    return
  if "expanded_query" in out:
    print(f"expanded: {out['expanded_query']}")
  for i, res in enumerate(out["results"]):
    mark = "*" if i == 0 else " "
    print(f"{mark} {res['id']:<24} {res['score']:.4f}  {res['title']}  ({res['image']})")
  if "rerank" in out:
    print(f"re-ranked by {args.rerank}: rule {out['rerank']['rule']}, chose {out['rerank']['chosen']}")


def _read_queries(path: str) -> list[dict]:
  from retrieval import dreambooth
  if path == "dreambooth":
    return dreambooth.dreambooth_queries()
  p = Path(path)
  if not p.is_file():
    raise ValueError(f"--queries {path}: no such file (expected JSONL of {{\"query\", \"id\"}}, or 'dreambooth')")
  out = []
  for n, line in enumerate(p.read_text().splitlines(), 1):
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
  return out


def _evaluate(args) -> None:
  from retrieval import retriever
  r = open_retriever(args, rerank=args.rerank, expand=args.expand)
  result = retriever.evaluate(r, _read_queries(args.queries), k=args.k, rerank=bool(args.rerank))
  for m in result["misses"]:
    print(f"miss: {m['query']!r}: want {m['want']}, got {m['got']}")
  result["misses"] = len(result["misses"])
  print(json.dumps(result))


def _calibrate(args) -> None:
  from retrieval import calibrate, embed, retriever, store
  ri = store.RetrievalIndex.load(args.index, verify=not args.no_verify, backend=args.backend)
  r = retriever.Retriever(ri, embed.load_embedder(args.embedder or ri.manifest["embedder"]["id"]))
  result = calibrate.calibrate(r, [q["query"] for q in _read_queries(args.queries)],
                               calibrate.off_topic_queries(args.off_topic))
  for name in ("on_topic", "off_topic"):
    d = result[name]
    print(f"{name:<9} n={d['n']:<3} min {d['min']:.3f}  p5 {d['p5']:.3f}  median {d['median']:.3f}  "
          f"p95 {d['p95']:.3f}  max {d['max']:.3f}")
  print(f"threshold {result['threshold']:.3f}: {result['on_topic_under']} on-topic under it, "
        f"{result['off_topic_over']} off-topic at or over it")
  for name, key in (("lowest on-topic", "on_topic_lowest"), ("highest off-topic", "off_topic_highest")):
    print(f"{name}: " + "; ".join(f"{q!r} {s:.3f}" for q, s in result[key]))
  print(json.dumps(result))


def _upsert(args) -> None:
  from retrieval import embed, store
  ri = store.RetrievalIndex.load(args.index, verify=not args.no_verify)
  entries = _read_entries(args.corpus, args.skip_invalid)
  ri.upsert(entries, embed.load_embedder(args.embedder or ri.manifest["embedder"]["id"]))
  ri.save(args.index)
  print(json.dumps({"upserted": len(entries), "count": len(ri)}))


def _delete(args) -> None:
  from retrieval import store
  ri = store.RetrievalIndex.load(args.index, verify=not args.no_verify)
  ri.delete(args.ids)
  ri.save(args.index)
  print(json.dumps({"deleted": len(args.ids), "count": len(ri)}))


def add_web_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("web augmentation")
  g.add_argument("--search-backend", default="duckduckgo", help="ddgs backend (the reference uses duckduckgo)")
  g.add_argument("--summarizer", default="extractive",
                 help="'extractive' (no model), 'hf:MODEL' (local causal LM) or 'openai:URL' (chat endpoint)")
  g.add_argument("--summarizer-model", default=None, help="model name for an openai: endpoint")
  g.add_argument("--max-pages", type=int, default=3, help="pages fetched per entity")
  g.add_argument("--timeout", type=float, default=10.0, help="seconds to connect, and per read, of a request")
  g.add_argument("--deadline", type=float, default=60.0, help="seconds for a whole request, body included")
  g.add_argument("--max-bytes", type=int, default=5_000_000, help="largest page or image body read")
  g.add_argument("--allow-private-hosts", action="store_true", help="also fetch loopback, private and link-local "
                 "addresses (refused by default)")
  g.add_argument("--web-cache", default=None, help="cache of searches, pages, summaries and images "
                 "(default: web/ in the cache root, $KADIFF_CACHE or $XDG_CACHE_HOME/kadiff_jax)")


def add_verify_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--no-verify", action="store_true", help="skip checking the index files against the manifest's "
                 "checksums (for huge indexes)")


def add_parser(sub) -> None:
  r = sub.add_parser("retrieve", help="build / query / evaluate the reference retriever")
  rs = r.add_subparsers(dest="retrieve_command", required=True)

  b = rs.add_parser("build", help="corpus -> (web augmentation) -> embeddings -> index directory")
  b.add_argument("--corpus", required=True, help=".jsonl, WIT .tsv(.gz), .parquet, or a DreamBooth folder")
  b.add_argument("--index", required=True, help="index directory to write (replaced atomically)")
  b.add_argument("--embedder", default="all-MiniLM-L6-v2",
                 help="all-MiniLM-L6-v2 (bundled), a sentence-transformers folder/Hub id, or st:ID")
  b.add_argument("--augment", choices=["none", "web"], default="none")
  b.add_argument("--backend", choices=["scann", "exact"], default=None, help="default: scann where installed")
  b.add_argument("--skip-invalid", action="store_true", help="leave out entries without image or title")
  b.add_argument("--num-leaves", type=int, default=None, help="ScaNN tree leaves (default ~sqrt(N))")
  b.add_argument("--leaves-to-search", type=int, default=None)
  b.add_argument("--reorder", type=int, default=None)
  add_web_args(b)
  cli_args.add_config_arg(b)
  cli_args.leaf(b, ("retrieve", "build"), _build)

  for name, fn, hlp in (("query", _query, "the reference for one query"),
                        ("evaluate", _evaluate, "top-1 / top-k accuracy on a query set; JSON on the last line")):
    q = rs.add_parser(name, help=hlp)
    q.add_argument("--index", required=True)
    if name == "query":
      q.add_argument("text")
      q.add_argument("--json", action="store_true", help="one JSON object with the ranked results")
    else:
      q.add_argument("--queries", required=True, help="JSONL of {query, id}, or 'dreambooth' (built-in set)")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--rerank", default=None, help="MLLM id or folder (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf)")
    q.add_argument("--scoring", choices=["logprob", "generate"], default="logprob",
                   help="re-ranker answers from token probabilities, or generated JSON (the reference)")
    q.add_argument("--expand", action="store_true", help="web-augment the query before embedding it")
    q.add_argument("--embedder", default=None, help="default: the one the index was built with")
    q.add_argument("--backend", choices=["scann", "exact"], default=None, help="default: the saved one")
    add_verify_arg(q)
    add_web_args(q)
    cli_args.add_config_arg(q)
    cli_args.leaf(q, ("retrieve", name), fn)

  c = rs.add_parser("calibrate", help="measure top-1 dense scores of on-topic and off-topic queries and choose "
                    "the no-match threshold (kadiff run --min-score); JSON on the last line")
  c.add_argument("--index", required=True)
  c.add_argument("--queries", default="dreambooth", help="on-topic queries: JSONL of {query, id}, or 'dreambooth'")
  c.add_argument("--off-topic", default=None, help="off-topic queries, one a line (default: the built-in 30)")
  c.add_argument("--embedder", default=None, help="default: the one the index was built with")
  c.add_argument("--backend", choices=["scann", "exact"], default=None, help="default: the saved one")
  add_verify_arg(c)
  cli_args.leaf(c, ("retrieve", "calibrate"), _calibrate)

  u = rs.add_parser("upsert", help="add or replace entries (same id) in an index")
  u.add_argument("--index", required=True)
  u.add_argument("--corpus", required=True)
  u.add_argument("--embedder", default=None)
  u.add_argument("--skip-invalid", action="store_true")
  add_verify_arg(u)
  cli_args.leaf(u, ("retrieve", "upsert"), _upsert)
  d = rs.add_parser("delete", help="remove entries by id")
  d.add_argument("--index", required=True)
  d.add_argument("ids", nargs="+")
  add_verify_arg(d)
  cli_args.leaf(d, ("retrieve", "delete"), _delete)
