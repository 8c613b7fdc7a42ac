"""Web augmentation ("dynamic knowledge enhancement"): search, fetch, summarise, cache.

For an entity name: a search backend returns the top pages; each page's
paragraphs are fetched (Wikipedia through its extracts API, other pages by
reading their <p> text); a summariser writes one paragraph of aliases,
attributes and context. Every network answer and every summary is cached on
disk under a key made from its inputs, so a rebuild repeats no request.

Failures never stop a corpus build: rate limits are retried with exponential
back-off; every other failure of a page or an API answer (transport, status,
size, deadline, charset, unexpected JSON) is logged, cached as a failure that
is retried after `failure_ttl`, and the entity keeps the text it had. All
requests go through `retrieval.http_client` (http/https to public hosts only, with
connect/read timeouts, a deadline and a size cap).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html.parser
import json
import logging
import math
import os
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from retrieval.errors import NetworkError, RateLimited, Timeout
from retrieval.http_client import USER_AGENT, HttpPolicy, fetch

log = logging.getLogger(__name__)
__all__ = ["NetworkError", "RateLimited", "Timeout", "USER_AGENT", "HttpPolicy"]


@dataclasses.dataclass(frozen=True)
class SearchHit:
  title: str
  url: str
  snippet: str = ""


class SearchBackend(Protocol):
  id: str

  def search(self, query: str, max_results: int) -> list[SearchHit]:
    """Raises RateLimited / Timeout / NetworkError."""


class Summarizer(Protocol):
  id: str

  def summarize(self, entity: str, paragraphs: Sequence[str]) -> str:
    ...


# --- cache and retries ----------------------------------------------------------------------------

class DiskCache:
  """JSON values on disk keyed by a hash of their inputs; writes are atomic."""

  def __init__(self, folder: str | os.PathLike | None):
    self.folder = Path(folder) if folder else None

  def _path(self, kind: str, key: Any) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return self.folder / kind / digest[:2] / f"{digest}.json"

  def get(self, kind: str, key: Any):
    if self.folder is None:
      return None
    p = self._path(kind, key)
    if not p.is_file():
      return None
    try:
      return json.loads(p.read_text())["value"]
    except (json.JSONDecodeError, KeyError):
      log.warning("ignoring unreadable cache file %s", p)
      return None

  def put(self, kind: str, key: Any, value) -> None:
    if self.folder is None:
      return
    p = self._path(kind, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    os.replace(tmp, p)

  def cached(self, kind: str, key: Any, compute: Callable[[], Any], *, failure_ttl: float | None = None,
             now: Callable[[], float] = time.time):
    """The cached value, or `compute()` stored. With `failure_ttl`, a NetworkError from `compute` is stored
    too and raised again without computing until `failure_ttl` seconds have passed."""
    value = self.get(kind, key)
    if isinstance(value, dict) and "__failure__" in value:
      if now() < value["retry_after"]:
        raise NetworkError(f"{value['__failure__']} (cached failure; retried after "
                           f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(value['retry_after']))})")
      value = None
    if value is None:
      try:
        value = compute()
      except NetworkError as e:
        if failure_ttl is not None and not isinstance(e, RateLimited):
          self.put(kind, key, {"__failure__": str(e), "retry_after": now() + failure_ttl})
        raise
      self.put(kind, key, value)
    return value


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  attempts: int = 4
  base_delay: float = 2.0    # seconds; doubles each retry
  max_delay: float = 60.0
  sleep: Callable[[float], None] = time.sleep

  def call(self, what: str, fn: Callable[[], Any]):
    for attempt in range(self.attempts):
      try:
        return fn()
      except RateLimited as e:
        if attempt == self.attempts - 1:
          raise
        delay = min(self.max_delay, e.retry_after if e.retry_after is not None else self.base_delay * 2 ** attempt)
        log.warning("%s: rate limited (%s); retrying in %.1fs", what, e, delay)
        self.sleep(delay)


# --- HTTP ------------------------------------------------------------------------------------------

def http_get(url: str, *, policy: HttpPolicy, headers: dict[str, str] | None = None) -> str:
  body, charset = fetch(url, policy, headers=headers)
  return body.decode(charset, errors="replace")


def http_post_json(url: str, body: dict, *, policy: HttpPolicy, headers: dict[str, str] | None = None) -> Any:
  answer, charset = fetch(url, policy, method="POST", json_body=body, headers=headers)
  try:
    return json.loads(answer.decode(charset, errors="replace"))
  except json.JSONDecodeError as e:
    raise NetworkError(f"{url} did not answer JSON: {e}") from None


class _ParagraphParser(html.parser.HTMLParser):
  """Collects the text of <p> elements, skipping script/style."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.paragraphs: list[str] = []
    self._buf: list[str] | None = None
    self._skip = 0

  def handle_starttag(self, tag, attrs):
    if tag in ("script", "style"):
      self._skip += 1
    elif tag == "p":
      self._flush()
      self._buf = []

  def handle_endtag(self, tag):
    if tag in ("script", "style"):
      self._skip = max(0, self._skip - 1)
    elif tag == "p":
      self._flush()

  def handle_data(self, data):
    if self._buf is not None and not self._skip:
      self._buf.append(data)

  def _flush(self):
    if self._buf is not None:
      text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
      if text:
        self.paragraphs.append(text)
    self._buf = None

  def close(self):
    super().close()
    self._flush()


def html_paragraphs(text: str) -> list[str]:
  p = _ParagraphParser()
  p.feed(text)
  p.close()
  return p.paragraphs


_WIKI = re.compile(r"^https?://([a-z\-]+)\.(?:m\.)?wikipedia\.org/wiki/([^?#]+)")


@dataclasses.dataclass(frozen=True)
class PageFetcher:
  """Paragraphs of a page: Wikipedia through its API, anything else from its HTML."""

  policy: HttpPolicy = HttpPolicy()
  min_chars: int = 40
  max_paragraphs: int = 8
  # "{lang}" is replaced by the page's language; tests point this at a local server.
  wikipedia_api: str = "https://{lang}.wikipedia.org/w/api.php"

  def cache_key(self, url: str) -> list:
    """What the answer depends on."""
    return [url, self.max_paragraphs, self.min_chars, self.policy.max_bytes]

  def fetch(self, url: str) -> list[str]:
    m = _WIKI.match(url)
    if m:
      lang, title = m.group(1), urllib.parse.unquote(m.group(2))
      q = urllib.parse.urlencode({"action": "query", "prop": "extracts", "explaintext": 1, "redirects": 1,
                                  "format": "json", "titles": title.replace("_", " ")})
      api = f"{self.wikipedia_api.format(lang=lang)}?{q}"
      try:
        data = json.loads(http_get(api, policy=self.policy))
      except json.JSONDecodeError as e:
        raise NetworkError(f"{api} did not answer JSON: {e}") from None
      pages = data.get("query", {}).get("pages", {}) if isinstance(data, dict) else None
      if not isinstance(pages, dict) or not all(isinstance(p, dict) for p in pages.values()):
        raise NetworkError(f"{api}: unexpected answer {str(data)[:120]}")
      text = "\n".join(str(p.get("extract") or "") for p in pages.values())
      paragraphs = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n")]
      paragraphs = [p for p in paragraphs if not p.startswith("==")]
    else:
      paragraphs = html_paragraphs(http_get(url, policy=self.policy))
    return [p for p in paragraphs if len(p) >= self.min_chars][:self.max_paragraphs]


# --- search backends ---------------------------------------------------------------------------------

class DDGSSearch:
  """Web search through the `ddgs` package (DuckDuckGo backend, as the reference)."""

  def __init__(self, backend: str = "duckduckgo", timeout: float = 10.0, region: str = "us-en"):
    try:
      import ddgs  # noqa: F401
    except ImportError:
      raise NetworkError("web augmentation needs `ddgs` (pip install 'kadiff-jax[retrieval]')") from None
    if not timeout > 0:
      raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
    # ddgs takes whole seconds: round up, so --timeout 0.5 means 1 s, never 0
    self.backend, self.timeout, self.region = backend, max(1, math.ceil(timeout)), region
    self.id = f"ddgs:{backend}:{region}:timeout={self.timeout}"  # part of the cache key: it changes the answer

  def search(self, query: str, max_results: int) -> list[SearchHit]:
    from ddgs import DDGS
    from ddgs import exceptions as ddgs_errors
    try:
      rows = DDGS(timeout=self.timeout).text(query, region=self.region, max_results=max_results,
                                             backend=self.backend)
    except ddgs_errors.RatelimitException as e:
      raise RateLimited(f"ddgs: {e}") from None
    except ddgs_errors.TimeoutException as e:
      raise Timeout(f"ddgs: {e}") from None
    except ddgs_errors.DDGSException as e:
      if "No results" in str(e):
        return []
      raise NetworkError(f"ddgs: {e}") from None
    except Exception as e:  # a transport error inside ddgs
      raise NetworkError(f"ddgs: {type(e).__name__}: {e}") from None
    return [SearchHit(str(r.get("title", "")), str(r.get("href", "")), str(r.get("body", "")))
            for r in rows or [] if isinstance(r, dict)]


# --- summarisers -------------------------------------------------------------------------------------

SUMMARY_PROMPT = (
    "You are building an encyclopedia entry for the visual concept \"{entity}\".\n"
    "From the passages below, write one paragraph (at most 120 words) listing: other names and aliases, "
    "what it looks like (shape, colours, materials, distinctive parts), and the context it belongs to. "
    "Only state facts supported by the passages.\n\nPassages:\n{passages}\n\nParagraph:")


def summary_prompt(entity: str, paragraphs: Sequence[str], max_chars: int = 6000) -> str:
  passages, used = [], 0
  for p in paragraphs:
    if used + len(p) > max_chars:
      break
    passages.append(f"- {p}")
    used += len(p)
  return SUMMARY_PROMPT.format(entity=entity, passages="\n".join(passages))


class ExtractiveSummarizer:
  """No model: the first sentences of the passages that mention the entity (or of all, if none do)."""

  id = "extractive"

  def __init__(self, max_words: int = 120):
    self.max_words = max_words

  def summarize(self, entity: str, paragraphs: Sequence[str]) -> str:
    words = entity.lower().split()
    sentences = [s.strip() for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if s.strip()]
    hits = [s for s in sentences if any(w in s.lower() for w in words)] or sentences
    out, n = [], 0
    for s in hits:
      if n + len(s.split()) > self.max_words and out:
        break
      out.append(s)
      n += len(s.split())
    return " ".join(out)


class TransformersSummarizer:
  """A local transformers causal LM (any AutoModelForCausalLM id or folder), greedy decoding."""

  def __init__(self, model: str, max_new_tokens: int = 200, device: str | None = None):
    try:
      import torch
      from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
      raise NetworkError("the transformers summariser needs torch (pip install 'kadiff-jax[rerank]')") from None
    self.id = f"hf:{model}"
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    self.tokenizer = AutoTokenizer.from_pretrained(model)
    dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
    self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
    self.max_new_tokens = max_new_tokens

  def summarize(self, entity: str, paragraphs: Sequence[str]) -> str:
    import torch
    prompt = summary_prompt(entity, paragraphs)
    if getattr(self.tokenizer, "chat_template", None):
      ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
    else:
      ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(self.device)
    with torch.no_grad():
      out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
    return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class OpenAICompatibleSummarizer:
  """Any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, ...): POST {url}/chat/completions."""

  def __init__(self, url: str, model: str, policy: HttpPolicy = HttpPolicy(read_timeout=60.0, deadline=120.0),
               api_key_env: str = "OPENAI_API_KEY"):
    self.url, self.model, self.policy = url.rstrip("/"), model, policy
    self.api_key_env = api_key_env
    self.id = f"openai:{self.url}#{model}"

  def summarize(self, entity: str, paragraphs: Sequence[str]) -> str:
    key = os.environ.get(self.api_key_env)
    answer = http_post_json(
        f"{self.url}/chat/completions",
        {"model": self.model, "temperature": 0, "max_tokens": 300,
         "messages": [{"role": "user", "content": summary_prompt(entity, paragraphs)}]},
        policy=self.policy, headers={"Authorization": f"Bearer {key}"} if key else None)
    try:
      content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      content = None
    if not isinstance(content, str):
      raise NetworkError(f"{self.url}: unexpected chat answer {str(answer)[:200]}")
    return content.strip()


def load_summarizer(spec: str, model: str | None = None, policy: HttpPolicy | None = None) -> Summarizer:
  """'extractive', 'hf:MODEL_ID_OR_DIR' or 'openai:URL' (with `model` the endpoint's model name)."""
  if spec == "extractive":
    return ExtractiveSummarizer()
  if spec.startswith("hf:"):
    return TransformersSummarizer(spec[3:])
  if spec.startswith("openai:"):
    if not model:
      raise ValueError("--summarizer openai:URL needs --summarizer-model NAME")
    url = spec[len("openai:"):]
    return OpenAICompatibleSummarizer(url, model, policy) if policy else OpenAICompatibleSummarizer(url, model)
  raise ValueError(f"summariser {spec!r}: expected 'extractive', 'hf:MODEL' or 'openai:URL'")


# --- augmentation -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Augmentation:
  entity: str
  summary: str | None            # None when nothing could be gathered
  sources: list[str]
  errors: list[str]


class WebAugmenter:
  """entity -> Augmentation, never raising for network trouble."""

  def __init__(self, search: SearchBackend, summarizer: Summarizer, *, fetcher: PageFetcher = PageFetcher(),
               cache: DiskCache = DiskCache(None), retry: RetryPolicy = RetryPolicy(), max_pages: int = 3,
               query_template: str = "{entity}", failure_ttl: float = 24 * 3600.0):
    self.search, self.summarizer, self.fetcher = search, summarizer, fetcher
    self.cache, self.retry, self.max_pages = cache, retry, max_pages
    self.query_template = query_template
    self.failure_ttl = failure_ttl  # a failed page, or a search with no results, is tried again after this

  def augment(self, entity: str) -> Augmentation:
    errors: list[str] = []
    query = self.query_template.format(entity=entity)
    def search():
      hits = self.retry.call(f"search {query!r}", lambda: self.search.search(query, self.max_pages))
      if not hits:  # not cached for good: "no results" is also what a failing backend may say
        raise NetworkError(f"search {query!r}: no results")
      return [dataclasses.asdict(h) for h in hits]

    try:
      hits = self.cache.cached("search", [self.search.id, query, self.max_pages], search,
                               failure_ttl=self.failure_ttl)
    except NetworkError as e:
      log.warning("augmenting %r: search failed: %s", entity, e)
      return Augmentation(entity, None, [], [f"search: {e}"])
    paragraphs, sources = [], []
    for h in hits[:self.max_pages]:
      url = h["url"]

      def page():
        try:
          return self.retry.call(f"fetch {url}", lambda: self.fetcher.fetch(url))
        except NetworkError:
          raise
        except Exception as e:  # a page no parser should stop the build for: cached as a failure too
          raise NetworkError(f"{url}: {type(e).__name__}: {e}") from None

      try:
        got = self.cache.cached("page", self.fetcher.cache_key(url), page, failure_ttl=self.failure_ttl)
      except NetworkError as e:
        log.warning("augmenting %r: %s", entity, e)
        errors.append(f"fetch: {e}")
        got = []
      if not got and h.get("snippet"):
        got = [h["snippet"]]
      if got:
        sources.append(url)
        paragraphs += got
    if not paragraphs:
      return Augmentation(entity, None, sources, errors + ["no text found"])
    try:
      summary = self.cache.cached(
          "summary", [self.summarizer.id, entity, hashlib.sha256("\n".join(paragraphs).encode()).hexdigest()],
          lambda: self.retry.call(f"summarise {entity!r}", lambda: self.summarizer.summarize(entity, paragraphs)))
    except NetworkError as e:
      log.warning("augmenting %r: summariser failed: %s", entity, e)
      return Augmentation(entity, None, sources, errors + [f"summarise: {e}"])
    if not isinstance(summary, str):
      return Augmentation(entity, None, sources, errors + [f"summarise: not text: {str(summary)[:80]}"])
    return Augmentation(entity, summary.strip() or None, sources, errors)


def augment_entries(entries, augmenter: WebAugmenter, *, progress: bool = False) -> dict[str, Any]:
  """Appends each entry's web summary to its own summary, in place; returns counts.

  An entry whose augmentation fails keeps its text and is listed under
  "failed"; the build goes on.
  """
  items = entries
  if progress:
    from tqdm import tqdm
    items = tqdm(entries, desc="augmenting", unit="entity")
  done, failed = 0, []
  for e in items:
    a = augmenter.augment(e.title)
    if a.summary is None:
      failed.append({"id": e.id, "errors": a.errors})
      continue
    e.summary = f"{e.summary} {a.summary}".strip() if e.summary else a.summary
    e.extra = dict(e.extra, augment_sources=a.sources)
    done += 1
  return {"augmented": done, "failed": failed}


def expand_query(text: str, augmenter: WebAugmenter) -> str:
  """The query followed by its web summary (unchanged when augmentation finds nothing)."""
  a = augmenter.augment(text)
  return f"{text}. {a.summary}" if a.summary else text
