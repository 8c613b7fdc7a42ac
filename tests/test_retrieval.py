"""Retriever: embedder parity, corpus formats, ScaNN vs exact, persistence, DreamBooth quality, CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval import corpus, dreambooth, embed, index, store

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
needs_dreambooth = pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="../shared/data/dreambooth not present")


@pytest.fixture(scope="module")
def minilm():
  return embed.load_embedder()


def _unit(rng, n, dim=32):
  v = rng.standard_normal((n, dim)).astype(np.float32)
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_minilm_matches_sentence_transformers(minilm):
  from sentence_transformers import SentenceTransformer
  ref = SentenceTransformer(str(embed.bundled_minilm_dir()), device="cpu")
  texts = ["a corgi with its tongue out", "Yixing clay teapot", "", "word " * 400,  # truncated at 256 tokens
           "Ünïcödé — accents, punctuation!?", "a " * 7]
  ours = minilm.encode(texts, batch_size=4)
  want = ref.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
  assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, want, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
  with pytest.raises(TypeError, match="list of texts"):
    minilm.encode("one string")


def _entries():
  return [corpus.CorpusEntry(id=f"e{i}", title=t, image=f"img{i}.jpg", caption=c, summary=s, aliases=a)
          for i, (t, c, s, a) in enumerate([
              ("Chow Chow", "a red dog", "A fluffy breed from China.", ("chow",)),
              ("Rubber duck", "a yellow bath toy", "", ()),
              ("Yixing teapot", "", "Unglazed purple clay teapot.", ("zisha", "purple clay pot"))])]


def test_corpus_formats_agree(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  want = _entries()
  jl = tmp_path / "c.jsonl"
  jl.write_text("\n".join(json.dumps({**e.to_json(), "extra": None} | {"source": "test"}) for e in want) + "\n\n")
  got = corpus.read_corpus(jl)
  assert [e.document() for e in got] == [e.document() for e in want]
  assert got[0].image == str((tmp_path / "img0.jpg").resolve()) and got[0].extra["source"] == "test"
  assert want[2].document() == ("Yixing teapot. Also known as: zisha, purple clay pot. "
                                "Unglazed purple clay teapot.")
  pq.write_table(pa.Table.from_pylist([{k: v for k, v in e.to_json().items() if k != "extra"} for e in want]),
                 tmp_path / "c.parquet")
  assert [e.document() for e in corpus.read_corpus(tmp_path / "c.parquet")] == [e.document() for e in want]

  # WIT: the 17 columns, gzipped; docid from (page_url, image_url).
  rows = []
  for i, e in enumerate(want):
    r = dict.fromkeys(corpus.WIT_COLUMNS, "")
    r.update(language="en", page_url=f"https://en.wikipedia.org/wiki/P{i}",
             image_url=f"https://upload.wikimedia.org/{i}.jpg", page_title=e.title,
             caption_reference_description=e.caption, caption_alt_text_description="alt text",
             context_page_description=e.summary)
    rows.append("\t".join(r[c] for c in corpus.WIT_COLUMNS))
  with gzip.open(tmp_path / "wit.tsv.gz", "wt") as f:
    f.write("\t".join(corpus.WIT_COLUMNS) + "\n" + "\n".join(rows) + "\n")
  wit = corpus.read_corpus(tmp_path / "wit.tsv.gz")
  assert [e.title for e in wit] == [e.title for e in want]
  assert wit[2].caption == "alt text" and wit[0].caption == "a red dog"  # falls back to the alt text
  assert wit[1].id == corpus.wit_docid("https://en.wikipedia.org/wiki/P1", "https://upload.wikimedia.org/1.jpg")


def test_corpus_bad_input(tmp_path):
  p = tmp_path / "c.jsonl"
  p.write_text("")
  with pytest.raises(corpus.CorpusError, match="empty"):
    corpus.read_corpus(p)
  p.write_text('{"id": "a", "title": "A", "image": "a.jpg"}\n{"id": "a", "title": "B", "image": "b.jpg"}\n')
  with pytest.raises(corpus.CorpusError, match=r"duplicate ids: \['a'\]"):
    corpus.read_corpus(p)
  p.write_text('{"id": "a", "title": "A", "image": "a.jpg"}\n{"id": "b", "title": "B", "image": ""}\n')
  with pytest.raises(corpus.CorpusError, match=r"'b' \(no image\).*--skip-invalid"):
    corpus.read_corpus(p)
  assert [e.id for e in corpus.read_corpus(p, skip_invalid=True)] == ["a"]
  p.write_text('{"id": "a", "title": "A", "image": "a.jpg"}\n{"id": "b", oops}\n')
  with pytest.raises(corpus.CorpusError, match=r"c.jsonl:2: not valid JSON"):
    corpus.read_corpus(p)
  p.write_text('{"title": "A", "image": "a.jpg"}\n')
  with pytest.raises(corpus.CorpusError, match=r"c.jsonl:1: entry has no 'id'"):
    corpus.read_corpus(p)
  with pytest.raises(corpus.CorpusError, match="unknown format"):
    corpus.read_entries(_touch(tmp_path / "c.csv"))


def _touch(p):
  p.write_text("x")
  return p


@pytest.mark.parametrize("n", [3000, 25000])  # brute force, tree + AH + reorder
def test_scann_agrees_with_exact(n):
  # Clustered, like real embeddings (uniform random vectors have no neighbourhoods to find).
  rng = np.random.default_rng(0)
  centers = _unit(rng, 64)
  noisy = lambda m: centers[rng.integers(0, 64, m)] + 0.35 * _unit(rng, m)
  db, q = noisy(n), noisy(40)
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  ids = [f"d{i}" for i in range(n)]
  exact = index.ExactIndex(db, ids)
  scann = index.ScannIndex(db, ids, index.ScannParams(num_leaves_to_search=40 if n > 20000 else None))
  assert scann.config["kind"] == ("brute_force" if n < 20000 else "tree_ah")
  (e_ids, e_s), (s_ids, s_s) = exact.search(q, 10), scann.search(q, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(e_ids, s_ids)])
  assert recall >= (1.0 if n < 20000 else 0.9), recall
  if n < 20000:
    assert e_ids == s_ids
    np.testing.assert_allclose(s_s, e_s, atol=1e-5)
  # Scores are cosine similarities, best first.
  assert np.all(np.diff(e_s, axis=1) <= 1e-7)
  np.testing.assert_allclose(e_s[:, 0], [db[int(i[0][1:])] @ qq for i, qq in zip(e_ids, q)], atol=1e-6)


@pytest.mark.parametrize("backend", ["scann", "exact"])
def test_upsert_delete_match_a_fresh_build(backend):
  rng = np.random.default_rng(1)
  db = _unit(rng, 500)
  ids = [f"d{i}" for i in range(500)]
  idx = index.build_index(db, ids, backend)
  new = _unit(rng, 20)
  idx.upsert([f"d{i}" for i in range(10)] + [f"n{i}" for i in range(10)], new)  # 10 replaced, 10 added
  idx.delete(["d3", "d499", "n0", "d250"])
  final = {d: v for d, v in zip(ids, db)}
  final.update(zip([f"d{i}" for i in range(10)] + [f"n{i}" for i in range(10)], new))
  for d in ("d3", "d499", "n0", "d250"):
    del final[d]
  fresh = index.ExactIndex(np.stack(list(final.values())), list(final))
  q = _unit(rng, 30)
  got, want = idx.search(q, 8), fresh.search(q, 8)
  assert got[0] == want[0]
  np.testing.assert_allclose(got[1], want[1], atol=1e-5)
  assert len(idx) == len(final) == 506
  with pytest.raises(KeyError, match="d3"):
    idx.delete(["d3"])
  with pytest.raises(index.VectorIndexError, match="duplicate docids"):
    idx.upsert(["x", "x"], _unit(rng, 2))
  with pytest.raises(index.VectorIndexError, match="dim 16, the index holds dim 32"):
    idx.upsert(["y"], _unit(rng, 1, 16))


_QUERY_SCRIPT = """
import json, sys
import numpy as np
from retrieval import store
ri = store.RetrievalIndex.load(sys.argv[1])
q = np.load(sys.argv[2])
print(json.dumps(ri.search(q, 5)))
"""


def test_store_roundtrip_in_a_new_process(tmp_path, minilm):
  entries = dreambooth.dreambooth_corpus(DREAMBOOTH) if DREAMBOOTH.is_dir() else _entries()
  ri = store.RetrievalIndex.build(entries, minilm, backend="scann")
  folder = ri.save(tmp_path / "idx")
  q = minilm.encode(["a fluffy dog with a lion mane", "rose-tinted eyewear", "blue whale beer"])
  np.save(tmp_path / "q.npy", q)

  def in_new_process():
    out = subprocess.run([sys.executable, "-c", _QUERY_SCRIPT, str(folder), str(tmp_path / "q.npy")],
                         capture_output=True, text=True, check=True)
    return [[(d, s) for d, s in row] for row in json.loads(out.stdout.strip().splitlines()[-1])]

  before = ri.search(q, 5)
  after = in_new_process()
  assert [[d for d, _ in r] for r in after] == [[d for d, _ in r] for r in before]
  np.testing.assert_allclose([[s for _, s in r] for r in after], [[s for _, s in r] for r in before], atol=1e-6)
  assert not list(folder.rglob("*.pkl"))  # docids live in JSON, nothing to unpickle
  manifest = json.loads((folder / "manifest.json").read_text())
  assert manifest["embedder"] == {"id": "all-MiniLM-L6-v2", "fingerprint": minilm.fingerprint, "dim": 384}
  assert manifest["count"] == len(entries) and manifest["index"]["backend"] == "scann"

  # Upsert (one replaced, one new) and delete, save over the same folder, reload in a new process.
  loaded = store.RetrievalIndex.load(folder)
  first = entries[0]
  changed = corpus.CorpusEntry(id=first.id, title="Whale beer tin", image=first.image,
                               caption="A blue can with a whale.", summary="Blue whale beer.")
  extra = corpus.CorpusEntry(id="new_one", title="Pink eyewear", image=first.image,
                             caption="Rose-tinted glasses.", summary="Pink lenses.")
  loaded.upsert([changed, extra], minilm)
  victim = entries[-1].id
  loaded.delete([victim])
  loaded.save(folder)
  after = in_new_process()
  reloaded = store.RetrievalIndex.load(folder)
  assert len(reloaded) == len(entries) and victim not in reloaded.index.row
  assert reloaded.entries([first.id])[first.id].title == "Whale beer tin"
  assert reloaded.entries(["new_one", victim]).keys() == {"new_one"}
  fresh = store.RetrievalIndex.build([changed, extra] + [e for e in entries[1:] if e.id != victim], minilm,
                                     backend="exact")
  want = fresh.search(q, 5)
  assert [[d for d, _ in r] for r in after] == [[d for d, _ in r] for r in want]
  assert after[2][0][0] == first.id  # "blue whale beer" now finds the replaced text
  with pytest.raises(store.StoreError, match="not in the index"):
    reloaded.delete(["nope"])


def test_store_refuses_mismatched_embedder_and_damaged_dirs(tmp_path, minilm):
  ri = store.RetrievalIndex.build(_entries(), minilm, backend="exact")
  folder = ri.save(tmp_path / "idx")

  class Other:
    id, fingerprint, dim = "other", "0123", 384
  with pytest.raises(store.StoreError, match="built with embedder 'all-MiniLM-L6-v2'"):
    store.RetrievalIndex.load(folder).check_embedder(Other())
  with pytest.raises(store.StoreError, match="not a retrieval index"):
    store.RetrievalIndex.load(tmp_path / "nothing")
  (tmp_path / "precious").mkdir()
  (tmp_path / "precious" / "data.txt").write_text("keep me")
  with pytest.raises(store.StoreError, match="not a kadiff retrieval index .*; refusing"):
    ri.save(tmp_path / "precious")
  assert (tmp_path / "precious" / "data.txt").read_text() == "keep me"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@needs_dreambooth
def test_dreambooth_queries_find_their_subject(minilm):
  """60 queries phrased unlike the titles: the measured accuracy is 0.87 top-1 and 0.98 top-5."""
  from retrieval import retriever
  ri = store.RetrievalIndex.build(dreambooth.dreambooth_corpus(DREAMBOOTH), minilm)
  result = retriever.evaluate(retriever.Retriever(ri, minilm), dreambooth.dreambooth_queries(), k=5)
  assert result["queries"] == 60
  assert result["top1"] >= 0.8 and result["top5"] >= 0.95, result
  titles = {e.id: e.title.lower() for e in dreambooth.dreambooth_corpus(DREAMBOOTH)}
  overlap = [q for q in dreambooth.dreambooth_queries() if titles[q["id"]] in q["query"].lower()]
  assert not overlap  # no query just repeats its subject's title


def _kadiff(*args, check=True):
  out = subprocess.run([sys.executable, "-m", "kadiff_jax.cli", *map(str, args)], capture_output=True, text=True)
  if check and out.returncode:
    raise AssertionError(out.stderr[-3000:])
  return out


@needs_dreambooth
def test_cli_build_query_evaluate(tmp_path):
  idx = tmp_path / "idx"
  built = json.loads(_kadiff("retrieve", "build", "--corpus", DREAMBOOTH, "--index", idx).stdout.splitlines()[-1])
  assert built["count"] == 30 and built["backend"] == "scann"
  out = json.loads(_kadiff("retrieve", "query", "--index", idx, "a sausage dog napping on a green couch",
                           "-k", "3", "--json").stdout)
  assert out["query"] == "a sausage dog napping on a green couch"
  assert [r["id"] for r in out["results"]][0] == "dog5" and len(out["results"]) == 3
  assert out["results"][0]["score"] >= out["results"][1]["score"] >= out["results"][2]["score"]
  ev = json.loads(_kadiff("retrieve", "evaluate", "--index", idx, "--queries", "dreambooth",
                          "--backend", "exact").stdout.splitlines()[-1])
  assert ev["top1"] >= 0.8 and ev["queries"] == 60

  bad = tmp_path / "empty.jsonl"
  bad.write_text("\n")
  r = _kadiff("retrieve", "build", "--corpus", bad, "--index", tmp_path / "x", check=False)
  assert r.returncode == 2 and "is empty" in r.stderr and "Traceback" not in r.stderr
  r = _kadiff("retrieve", "query", "--index", tmp_path / "missing", "q", check=False)
  assert r.returncode == 2 and "not a retrieval index" in r.stderr


def test_benchmark_index_prints_both_backends():
  out = _kadiff("benchmark", "index", "--sizes", "2000,21000", "--queries", "50", "--dim", "64")
  res = json.loads(out.stdout.splitlines()[-1])
  assert res["2000"]["scann"]["config"]["kind"] == "brute_force"
  assert res["2000"]["scann"]["operating_points"][0]["recall@10"] == 1.0
  tree = res["21000"]["scann"]
  assert tree["config"]["kind"] == "tree_ah" and len(tree["operating_points"]) == 3
  recalls = [p["recall@10"] for p in tree["operating_points"]]
  assert recalls[-1] >= recalls[0] and all(0 < r <= 1 for r in recalls)
  assert res["21000"]["exact"]["qps"] > 0
