"""Web augmentation against a local HTTP server: fetching, Wikipedia API, caching, back-off, timeouts."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.parse

import pytest

from retrieval import corpus, web

# the test servers listen on loopback, which the default policy refuses
LOCAL = web.HttpPolicy(connect_timeout=2.0, read_timeout=0.5, deadline=5.0, allow_private_hosts=True)

PAGES = {
    "/corgi.html": """<html><head><script>var p = "<p>not text</p>";</script><style>p {}</style></head>
<body><nav>Home</nav><p>The Pembroke Welsh Corgi is a cattle herding dog breed that originated in Wales.</p>
<p>short</p><p>Corgis have a red, sable or tricolour coat, large upright ears and a &quot;fox-like&quot; face.</p>
</body></html>""",
    "/herding.html": "<p>Herding dogs such as the corgi were bred to nip at the heels of cattle on farms.</p>",
}
WIKI_EXTRACT = ("The Pembroke Welsh Corgi is one of two breeds known as Welsh Corgi.\n\n== History ==\n"
                "Pembroke Corgis are descended from spitz-type dogs brought to Wales by Flemish weavers.")


class _Handler(http.server.BaseHTTPRequestHandler):
  hits: list[str] = []
  limited_left = {"n": 0}

  def log_message(self, *a):
    pass

  def _send(self, code, body, ctype="text/html", headers=()):
    data = body.encode()
    self.send_response(code)
    self.send_header("Content-Type", f"{ctype}; charset=utf-8")
    self.send_header("Content-Length", str(len(data)))
    for k, v in headers:
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):
    self.hits.append(self.path)
    url = urllib.parse.urlparse(self.path)
    if url.path in PAGES:
      return self._send(200, PAGES[url.path])
    if url.path == "/w/api.php":
      q = urllib.parse.parse_qs(url.query)
      assert q["action"] == ["query"] and q["prop"] == ["extracts"] and q["titles"] == ["Pembroke Welsh Corgi"]
      return self._send(200, json.dumps({"query": {"pages": {"1": {"extract": WIKI_EXTRACT}}}}), "application/json")
    if url.path == "/limited.html":
      if self.limited_left["n"] > 0:
        self.limited_left["n"] -= 1
        return self._send(429, "slow down", headers=[("Retry-After", "0")])
      return self._send(200, "<p>Corgis were a favourite of Queen Elizabeth II, who owned more than thirty.</p>")
    if url.path == "/slow.html":
      time.sleep(1.5)
      return self._send(200, "<p>This answer arrives after the client's timeout has passed.</p>")
    return self._send(404, "not found")

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    self.hits.append(("POST", self.path, body, self.headers.get("Authorization")))
    prompt = body["messages"][0]["content"]
    self._send(200, json.dumps({"choices": [{"message": {"content": f" Summary of {len(prompt)} chars. "}}]}),
               "application/json")


@pytest.fixture()
def server():
  _Handler.hits = []
  _Handler.limited_left = {"n": 0}
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  t = threading.Thread(target=srv.serve_forever, daemon=True)
  t.start()
  yield f"http://127.0.0.1:{srv.server_address[1]}", _Handler
  srv.shutdown()


class FixtureSearch:
  """A search backend answering from a table (what ddgs would return), counting its calls."""

  id = "fixture"

  def __init__(self, results, fail=None):
    self.results, self.fail, self.calls = results, fail, 0

  def search(self, query, max_results):
    self.calls += 1
    if self.fail:
      raise self.fail
    return self.results.get(query, [])[:max_results]


def _augmenter(base, search, tmp_path, **kw):
  sleeps = []
  aug = web.WebAugmenter(
      search, web.ExtractiveSummarizer(), cache=web.DiskCache(tmp_path / "cache"),
      fetcher=web.PageFetcher(policy=LOCAL, wikipedia_api=f"{base}/w/api.php"),
      retry=web.RetryPolicy(attempts=3, base_delay=0.01, sleep=sleeps.append), **kw)
  return aug, sleeps


def test_html_paragraphs_skip_scripts_and_short_text():
  assert web.html_paragraphs(PAGES["/corgi.html"]) == [
      "The Pembroke Welsh Corgi is a cattle herding dog breed that originated in Wales.", "short",
      'Corgis have a red, sable or tricolour coat, large upright ears and a "fox-like" face.']


def test_augment_fetches_caches_and_backs_off(server, tmp_path):
  base, handler = server
  hits = [web.SearchHit("Corgi", f"{base}/corgi.html", "snippet"),
          web.SearchHit("Pembroke Welsh Corgi - Wikipedia", "https://en.wikipedia.org/wiki/Pembroke_Welsh_Corgi"),
          web.SearchHit("Queen's dogs", f"{base}/limited.html")]
  search = FixtureSearch({"Pembroke Welsh Corgi": hits})
  aug, sleeps = _augmenter(base, search, tmp_path)
  handler.limited_left["n"] = 2  # two 429s, then the page
  a = aug.augment("Pembroke Welsh Corgi")
  assert a.errors == [] and len(a.sources) == 3
  assert "originated in Wales" in a.summary and "Flemish weavers" in a.summary and "Queen Elizabeth" in a.summary
  assert "History" not in a.summary  # section headings are dropped
  assert sleeps == [0.0, 0.0]        # Retry-After: 0 honoured twice
  n_requests = len(handler.hits)
  again = aug.augment("Pembroke Welsh Corgi")
  assert again.summary == a.summary and len(handler.hits) == n_requests and search.calls == 1  # all cached


def test_timeouts_and_failures_never_stop_a_build(server, tmp_path, caplog):
  base, handler = server
  search = FixtureSearch({"Rubber duck": [web.SearchHit("slow", f"{base}/slow.html"),
                                          web.SearchHit("gone", f"{base}/missing.html"),
                                          web.SearchHit("ok", f"{base}/herding.html")]})
  aug, _ = _augmenter(base, search, tmp_path)
  a = aug.augment("Rubber duck")
  assert a.summary and "Herding dogs" in a.summary
  assert any("within 0.5s" in e for e in a.errors) and any("HTTP 404" in e for e in a.errors)

  limited = FixtureSearch({}, fail=web.RateLimited("ddgs: 202 Ratelimit"))
  aug2, sleeps = _augmenter(base, limited, tmp_path / "2")
  entries = [corpus.CorpusEntry(id="a", title="Rubber duck", image="a.jpg", summary="Own text."),
             corpus.CorpusEntry(id="b", title="Teapot", image="b.jpg", summary="Kept.")]
  report = web.augment_entries(entries, aug2)
  assert report["augmented"] == 0 and [f["id"] for f in report["failed"]] == ["a", "b"]
  assert "rate limited" in caplog.text.lower() or "ratelimit" in caplog.text.lower()
  assert [e.summary for e in entries] == ["Own text.", "Kept."]  # nothing lost
  assert limited.calls == 6 and sleeps == [0.01, 0.02, 0.01, 0.02]  # 3 attempts each, exponential
  timeouts = FixtureSearch({}, fail=web.Timeout("ddgs: timed out"))
  aug3, _ = _augmenter(base, timeouts, tmp_path / "3")
  assert web.expand_query("Teapot", aug3) == "Teapot"  # query expansion falls back to the query itself


def test_augment_entries_appends_summary(server, tmp_path):
  base, _ = server
  search = FixtureSearch({"Corgi": [web.SearchHit("c", f"{base}/corgi.html")]})
  aug, _ = _augmenter(base, search, tmp_path)
  entries = [corpus.CorpusEntry(id="c", title="Corgi", image="c.jpg", summary="A dog.")]
  assert web.augment_entries(entries, aug)["augmented"] == 1
  assert entries[0].summary.startswith("A dog. ") and "Wales" in entries[0].summary
  assert entries[0].extra["augment_sources"] == [f"{base}/corgi.html"]
  assert web.expand_query("Corgi", aug).startswith("Corgi. ")


def test_openai_compatible_summarizer(server, monkeypatch):
  base, handler = server
  monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
  s = web.load_summarizer(f"openai:{base}/v1", "local-model", LOCAL)
  out = s.summarize("Chow Chow", ["A fluffy dog breed from northern China with a blue-black tongue."])
  method, path, body, auth = handler.hits[-1]
  assert (method, path, auth) == ("POST", "/v1/chat/completions", "Bearer sk-test")
  assert body["model"] == "local-model" and body["temperature"] == 0
  prompt = body["messages"][0]["content"]
  assert '"Chow Chow"' in prompt and "blue-black tongue" in prompt
  assert out == f"Summary of {len(prompt)} chars."
  with pytest.raises(ValueError, match="needs --summarizer-model"):
    web.load_summarizer(f"openai:{base}/v1")


def test_transformers_summarizer_with_a_tiny_lm(tmp_path):
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([web.SUMMARY_PROMPT, "a dog breed"], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp_path)
  torch.manual_seed(0)
  GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=2,
                             n_positions=4096)).save_pretrained(tmp_path)
  s = web.load_summarizer(f"hf:{tmp_path}")
  s.max_new_tokens = 12
  a = s.summarize("Chow Chow", ["A fluffy dog breed."])
  assert isinstance(a, str) and a == s.summarize("Chow Chow", ["A fluffy dog breed."])  # greedy: deterministic
  assert s.id == f"hf:{tmp_path}"


def test_disk_cache_is_keyed_by_inputs(tmp_path):
  c = web.DiskCache(tmp_path)
  calls = []
  f = lambda: calls.append(1) or {"v": len(calls)}
  assert c.cached("page", ["u", 1], f) == {"v": 1}
  assert c.cached("page", ["u", 1], f) == {"v": 1}
  assert c.cached("page", ["u", 2], f) == {"v": 2}
  assert len(calls) == 2 and not list(tmp_path.rglob("*.tmp-*"))
