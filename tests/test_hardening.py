"""Bad input and faults: nothing written outside --out, nothing deleted, nothing hangs, every error one line.

Network cases run against servers on 127.0.0.1 started here (so they are fetched with allow_private_hosts,
except in the test that checks that loopback is refused by default).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kadiff_jax import cli
from kadiff_jax.outputs import check_id, inside
from retrieval import corpus, http_client, store, web

DREAMBOOTH = Path(__file__).parents[2] / "shared/data/dreambooth"
LOCAL = http_client.HttpPolicy(connect_timeout=2, read_timeout=0.5, deadline=1.5, max_bytes=20_000, allow_private_hosts=True)


def _one_line_error(capsys, *needles):
  err = capsys.readouterr().err.strip()
  lines = [line for line in err.splitlines() if not line.startswith("INFO ")]  # progress lines say what ran
  assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("kadiff: error: "), err
  err = lines[0]
  for n in needles:
    assert n in err, (n, err)
  return err


# --- ids and output paths -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../escape", "/tmp/abs_escape", "a/b", "..", ".hidden", "", "x" * 129, "a\\b"])
def test_unsafe_ids_are_refused_where_jobs_and_queries_are_read(tmp_path, bad, capsys):
  from kadiff_jax.kadiff import run as krun
  with pytest.raises(ValueError, match="is not a safe file name"):
    check_id(bad, "here")
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text(json.dumps({"id": bad or "\t", "prompt": "x", "reference": "r.png"}) + "\n")
  out = tmp_path / "out"
  assert cli.main(["generate", "--mode", "kadiff", "--jobs", str(jobs), "--out", str(out)]) == 2
  _one_line_error(capsys, f"{jobs}: job 1")
  queries = tmp_path / "q.jsonl"
  queries.write_text(json.dumps({"id": bad or "\t", "prompt": "a dog"}) + "\n")
  with pytest.raises(ValueError, match=r"q.jsonl:1: .*not a safe file name"):
    krun.read_queries(queries)
  assert not (tmp_path / "escape").exists() and not Path("/tmp/abs_escape.png").exists()
  assert inside(out, "a.png") == (out / "a.png").resolve()
  with pytest.raises(ValueError, match="outside"):
    inside(out, "../x.png")


@pytest.mark.parametrize("row,message", [
    ("42", "job 1 is 42, expected an object"), ("null", "job 1 is null, expected an object"),
    ('{"id": "a", "reference": "r.png", "seed": "abc"}', "seed 'abc' is not an integer"),
    ('{"id": "a", "reference": "r.png", "seed": 18446744073709551616}', "seed 18446744073709551616 is out of range"),
    ('{"id": "a", "reference": ["r.png"]}', "reference is [\"r.png\"], expected a string"),
])
def test_bad_job_lines_are_one_line_naming_the_file(tmp_path, capsys, row, message):
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text(row + "\n")
  assert cli.main(["generate", "--mode", "kadiff", "--jobs", str(jobs), "--out", str(tmp_path / "o")]) == 2
  _one_line_error(capsys, str(jobs), message)


def test_bad_seed_flag_and_non_utf8_jobs_file(tmp_path, capsys):
  assert cli.main(["generate", "--prompt", "x", "--seed", str(2 ** 64), "--out", str(tmp_path / "o")]) == 2
  _one_line_error(capsys, "seed 18446744073709551616 is out of range")
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_bytes(b'{"id": "a", "prompt": "caf\xe9", "reference": "r.png"}\n')
  assert cli.main(["generate", "--mode", "kadiff", "--jobs", str(jobs), "--out", str(tmp_path / "o")]) == 2
  _one_line_error(capsys, f"jobs file {jobs} is not UTF-8 text")


# --- the web ----------------------------------------------------------------------------------------

class _Hostile(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  hits: list[str] = []

  def log_message(self, *a):
    pass

  def _send(self, body: bytes, ctype="text/html; charset=utf-8", length=True):
    self.send_response(200)
    self.send_header("Content-Type", ctype)
    if length:
      self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):
    self.hits.append(self.path)
    p = self.path.split("?")[0]
    if p == "/ok.html":
      return self._send(b"<p>A perfectly ordinary paragraph about the corgi, a herding dog from Wales.</p>")
    if p == "/trickle.html":  # one byte at a time, each well inside the read timeout
      self.send_response(200)
      self.send_header("Content-Type", "text/html")
      self.send_header("Content-Length", "400")
      self.end_headers()
      for _ in range(400):
        self.wfile.write(b"x")
        self.wfile.flush()
        time.sleep(0.05)
      return None
    if p == "/huge.html":  # no Content-Length: the cap must hold while streaming
      self.send_response(200)
      self.send_header("Content-Type", "text/html")
      self.send_header("Transfer-Encoding", "chunked")
      self.end_headers()
      for _ in range(50):
        chunk = b"<p>" + b"y" * 4000 + b"</p>"
        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
      self.wfile.write(b"0\r\n\r\n")
      return None
    if p == "/reset.html":  # the connection dies mid-response
      self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n<p>cut")
      self.wfile.flush()
      self.connection.shutdown(socket.SHUT_RDWR)
      return None
    if p == "/badstatus.html":
      self.wfile.write(b"NONSENSE\r\n\r\n")
      self.wfile.flush()
      self.connection.shutdown(socket.SHUT_RDWR)
      return None
    if p == "/charset.html":
      return self._send("<p>Ein gewöhnlicher Absatz über den Corgi, einen Hütehund aus Wales.</p>".encode(),
                        "text/html; charset=x-no-such-charset")
    if p == "/redirect-file":
      self.send_response(302)
      self.send_header("Location", "file:///etc/passwd")
      self.send_header("Content-Length", "0")
      self.end_headers()
      return None
    if p == "/w/api.php":
      return self._send(b"[1, 2]" if "List" in self.path else b"<html>not json</html>", "application/json")
    self.send_response(404)
    self.send_header("Content-Length", "0")
    self.end_headers()

  def do_POST(self):
    self.rfile.read(int(self.headers["Content-Length"]))
    self._send(json.dumps({"choices": [{"message": {"content": None}}]}).encode(), "application/json")


class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # the client hanging up on a trickling or huge body is the point of those cases


@pytest.fixture()
def hostile():
  _Hostile.hits = []
  srv = _QuietServer(("127.0.0.1", 0), _Hostile)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{srv.server_address[1]}"
  srv.shutdown()


def test_schemes_and_private_hosts_are_refused(hostile, tmp_path):
  from retrieval.retriever import load_image
  secret = tmp_path / "secret.txt"
  secret.write_text("<p>a local secret that must never reach a summary, however long it is written</p>")
  with pytest.raises(http_client.Blocked, match="scheme 'file'"):
    web.PageFetcher(policy=LOCAL).fetch(secret.as_uri())
  with pytest.raises(http_client.Blocked, match="scheme 'file'"):
    load_image(secret.as_uri())
  with pytest.raises(http_client.Blocked, match="scheme 'file'"):  # a redirect to file:// is checked like the URL
    web.PageFetcher(policy=LOCAL).fetch(f"{hostile}/redirect-file")
  with pytest.raises(http_client.Blocked, match="127.0.0.1, a non-public address"):
    web.PageFetcher().fetch(f"{hostile}/ok.html")  # the default policy: loopback refused
  with pytest.raises(http_client.Blocked, match="non-public"):
    http_client.check_url("http://169.254.169.254/latest/meta-data", http_client.HttpPolicy())
  assert _Hostile.hits == ["/redirect-file"]  # only the redirecting hop; the loopback page was never requested
  assert web.PageFetcher(policy=LOCAL).fetch(f"{hostile}/ok.html")  # allowed when asked


def test_deadline_and_size_cap(hostile):
  t0 = time.monotonic()
  with pytest.raises(web.Timeout, match="deadline"):
    http_client.fetch(f"{hostile}/trickle.html", LOCAL)
  assert time.monotonic() - t0 < 4
  with pytest.raises(web.NetworkError, match="20000-byte cap"):
    http_client.fetch(f"{hostile}/huge.html", LOCAL)


def test_every_page_failure_is_per_page_cached_and_the_build_goes_on(hostile, tmp_path):
  pages = ["reset", "badstatus", "charset", "huge", "trickle", "ok"]

  class Search:
    id, calls = "fixture", 0

    def search(self, query, n):
      Search.calls += 1
      return [web.SearchHit(p, f"{hostile}/{p}.html") for p in pages] if query == "Corgi" else []

  aug = web.WebAugmenter(Search(), web.ExtractiveSummarizer(), cache=web.DiskCache(tmp_path / "c"),
                         fetcher=web.PageFetcher(policy=LOCAL, min_chars=20), max_pages=6,
                         retry=web.RetryPolicy(attempts=1))
  entries = [corpus.CorpusEntry(id="c", title="Corgi", image="c.jpg", summary="Own."),
             corpus.CorpusEntry(id="n", title="Nothing", image="n.jpg", summary="Kept.")]
  report = web.augment_entries(entries, aug)
  assert report["augmented"] == 1 and [f["id"] for f in report["failed"]] == ["n"]
  assert "herding dog from Wales" in entries[0].summary and "Hütehund" in entries[0].summary  # unknown charset
  assert entries[1].summary == "Kept."
  hits = len(_Hostile.hits)
  again = aug.augment("Corgi")  # failed pages are cached failures: not fetched again within the TTL
  assert len(_Hostile.hits) == hits and len(again.errors) == 4 and all("cached failure" in e for e in again.errors)
  calls = Search.calls
  assert "no results (cached failure" in aug.augment("Nothing").errors[0] and Search.calls == calls
  # ... but not for good: once the TTL has passed, the search and the pages are tried again
  fresh = web.WebAugmenter(Search(), web.ExtractiveSummarizer(), cache=web.DiskCache(tmp_path / "c2"),
                           fetcher=web.PageFetcher(policy=LOCAL, min_chars=20), max_pages=6,
                           retry=web.RetryPolicy(attempts=1), failure_ttl=0.0)
  fresh.augment("Nothing")
  fresh.augment("Nothing")
  assert Search.calls == calls + 2


def test_wikipedia_and_llm_answers_that_are_not_what_we_expect(hostile, tmp_path):
  fetcher = web.PageFetcher(policy=LOCAL, wikipedia_api=f"{hostile}/w/api.php")
  with pytest.raises(web.NetworkError, match="did not answer JSON"):
    fetcher.fetch("https://en.wikipedia.org/wiki/Corgi")
  fetcher_list = web.PageFetcher(policy=LOCAL, wikipedia_api=f"{hostile}/w/api.php?List=1")
  with pytest.raises(web.NetworkError, match="unexpected answer"):
    fetcher_list.fetch("https://en.wikipedia.org/wiki/Corgi")
  llm = web.load_summarizer(f"openai:{hostile}/v1", "m", LOCAL)
  with pytest.raises(web.NetworkError, match="unexpected chat answer"):
    llm.summarize("Corgi", ["a dog"])
  assert web.DDGSSearch(timeout=0.5).timeout == 1 and "timeout=1" in web.DDGSSearch(timeout=0.5).id


# --- the Hub ----------------------------------------------------------------------------------------

def test_hub_endpoint_that_never_answers_fails_within_the_timeout(tmp_path):
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(8)
  held = []
  threading.Thread(target=lambda: [held.append(srv.accept()) for _ in range(8)], daemon=True).start()
  env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{srv.getsockname()[1]}", "KADIFF_HUB_TIMEOUT": "1",
         "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
  t0 = time.monotonic()
  out = subprocess.run([sys.executable, "-m", "kadiff_jax.cli", "generate", "--model", "someone/some-model",
                        "--prompt", "x", "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2 and time.monotonic() - t0 < 60
  assert "did not answer within 1.0s" in out.stderr and "Traceback" not in out.stderr
  env["HF_HUB_OFFLINE"] = "1"
  out = subprocess.run([sys.executable, "-m", "kadiff_jax.cli", "generate", "--model", "someone/some-model",
                        "--prompt", "x", "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2 and "HF_HUB_OFFLINE is set and 'someone/some-model' is not in the local" in out.stderr
  srv.close()


# --- index folders ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
  from retrieval import embed
  return embed.load_embedder("all-MiniLM-L6-v2")


def _entries():
  return [corpus.CorpusEntry(id=f"e{i}", title=t, image=f"{i}.jpg", caption=f"a photo of a {t}")
          for i, t in enumerate(["corgi", "teapot", "red backpack", "rubber duck"])]


def test_a_folder_that_is_not_ours_is_never_replaced(tmp_path, capsys):
  other = tmp_path / "idx"
  other.mkdir()
  (other / "manifest.json").write_text(json.dumps({"name": "another project's manifest"}))
  (other / "data.bin").write_bytes(b"precious")
  corpus_file = tmp_path / "c.jsonl"
  corpus_file.write_text("\n".join(json.dumps({"id": e.id, "title": e.title, "image": e.image}) for e in _entries()))
  assert cli.main(["retrieve", "build", "--corpus", str(corpus_file), "--index", str(other), "--backend", "exact"]) == 2
  _one_line_error(capsys, "is not a kadiff retrieval index", "refusing to replace it")
  assert (other / "data.bin").read_bytes() == b"precious"
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_saves_are_recovered_and_tampering_refused(tmp_path, minilm, caplog):
  ri = store.RetrievalIndex.build(_entries(), minilm, backend="exact")
  folder = ri.save(tmp_path / "idx")
  dead = 2 ** 22 + 12345  # no such process
  # killed between the two renames: the previous index survives only as .idx.old-PID
  os.replace(folder, tmp_path / f".idx.old-{dead}")
  (tmp_path / f".idx.tmp-{dead}").mkdir()  # and a killed build's half-written folder
  loaded = store.RetrievalIndex.load(folder)
  assert len(loaded) == 4 and "recovered index" in caplog.text and "removed" in caplog.text
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
  # swapped docids: the checksums no longer match
  docids = json.loads((folder / "docids.json").read_text())
  (folder / "docids.json").write_text(json.dumps([docids[1], docids[0]] + docids[2:]))
  with pytest.raises(store.StoreError, match="docids.json do not match the manifest's checksums"):
    store.RetrievalIndex.load(folder)
  assert len(store.RetrievalIndex.load(folder, verify=False)) == 4  # --no-verify for huge indexes
  ri.save(folder)
  np.save(folder / "vectors.npy", np.zeros((4, 384), np.float32))  # foreign vectors
  with pytest.raises(store.StoreError, match="vectors.npy do not match"):
    store.RetrievalIndex.load(folder)
  ri.save(folder)
  manifest = json.loads((folder / "manifest.json").read_text())
  del manifest["count"]
  (folder / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(store.StoreError, match="field 'count' is None, expected type int"):
    store.RetrievalIndex.load(folder)


def test_odd_characters_in_index_paths(tmp_path, minilm):
  ri = store.RetrievalIndex.build(_entries(), minilm, backend="exact")
  odd = ri.save(tmp_path / "idx%41#?x")
  decoy = store.RetrievalIndex.build(_entries()[:1], minilm, backend="exact").save(tmp_path / "idxA#?x")
  loaded = store.RetrievalIndex.load(odd)
  assert sorted(loaded.entries(["e0", "e1", "e2", "e3"])) == ["e0", "e1", "e2", "e3"]
  assert len(store.RetrievalIndex.load(decoy).entries(["e1"])) == 0


def test_damaged_index_files_are_one_line(tmp_path, capsys, minilm):
  ri = store.RetrievalIndex.build(_entries(), minilm, backend="exact")
  folder = ri.save(tmp_path / "idx")
  (folder / "corpus.sqlite").write_bytes(b"not a database at all" * 10)
  assert cli.main(["retrieve", "query", "--index", str(folder), "corgi", "--no-verify"]) == 2
  _one_line_error(capsys, "corpus.sqlite is not a readable entry store")
  assert cli.main(["retrieve", "delete", "--index", str(folder), "e1", "e1", "--no-verify"]) == 2
  _one_line_error(capsys, "docids given more than once: ['e1']")


# --- reference caches and weights ----------------------------------------------------------------------

def test_unreadable_reference_cache_is_inverted_again(tmp_path, tiny_models, caplog):
  from kadiff_jax.kadiff import reference as R
  from kadiff_jax.kadiff.options import KADiffOptions
  from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
  from kadiff_jax.weights.ip_adapter import load_ip_adapter
  adapter = load_ip_adapter(tiny_models.source / TINY_IP_ADAPTER, tiny_models.source / TINY_IMAGE_ENCODER,
                            tiny_models.unet_config)
  ref = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8))
  opts = KADiffOptions(steps=3)
  a = R.prepare_reference(tiny_models, adapter, ref, "a thing", opts, cache_dir=tmp_path)
  (path,) = tmp_path.glob("ref-*.npz")
  path.write_bytes(path.read_bytes()[:200])  # truncated, as by a full disk
  b = R.prepare_reference(tiny_models, adapter, ref, "a thing", opts, cache_dir=tmp_path)
  assert "is unreadable" in caplog.text and "inverting it again" in caplog.text
  np.testing.assert_array_equal(a.latents, b.latents)
  assert R.load_inversion(path).latents.shape == a.latents.shape  # and the cache was written again


@pytest.mark.parametrize("damage,message", [
    ("truncate", "is not a valid .safetensors file: the header claims"),
    ("list_header", "its header is a JSON list, expected an object"),
    ("short_data", "(truncated?)"),
    ("pickle", "refused to unpickle it"),
])
def test_damaged_weights_are_one_line_naming_the_file(tmp_path, tiny_dir, capsys, damage, message):
  model = tmp_path / "m"
  shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("ip_adapter"))
  target = model / "unet" / "diffusion_pytorch_model.safetensors"
  data = target.read_bytes()
  if damage == "truncate":
    target.write_bytes(data[:100])
  elif damage == "list_header":
    header = b"[1, 2, 3]"
    target.write_bytes(len(header).to_bytes(8, "little") + header)
  elif damage == "short_data":
    target.write_bytes(data[:-1000])
  else:
    import pickle
    target.unlink()
    target = model / "unet" / "diffusion_pytorch_model.bin"

    class Evil:
      def __reduce__(self):
        return (print, ("this must never run",))

    target.write_bytes(pickle.dumps({"x": Evil()}))
  assert cli.main(["generate", "--model", str(model), "--prompt", "x", "--out", str(tmp_path / "o"),
                   "--cache-dir", str(tmp_path / "c")]) == 2
  err = _one_line_error(capsys, str(target), message)
  assert "this must never run" not in capsys.readouterr().out + err


def test_decompression_bomb_is_one_line(tmp_path, capsys, monkeypatch):
  Image.new("RGB", (64, 64)).save(tmp_path / "r.png")
  monkeypatch.setenv("KADIFF_MAX_IMAGE_PIXELS", "1000")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
  assert cli.main(["generate", "--mode", "kadiff", "--reference", str(tmp_path / "r.png"), "--out",
                   str(tmp_path / "o")]) == 2
  _one_line_error(capsys, "r.png: Image size (4096 pixels) exceeds limit of 1000 pixels",
                  "KADIFF_MAX_IMAGE_PIXELS")


def test_missing_optional_extra_is_named_in_one_line(monkeypatch, capsys):
  """`kadiff benchmark unet` without diffusers: one line naming the extra that installs it, no traceback."""
  import sys
  from kadiff_jax import cli
  monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without the package looks like
  assert cli.main(["benchmark", "unet", "--config", "tiny", "--iters", "1"]) == 2
  err = _one_line_error(capsys, "'diffusers'", "pip install 'kadiff-jax[reference]'")
  assert "ModuleNotFoundError" not in err


def test_version_and_help_defaults(capsys):
  from kadiff_jax import __version__, cli
  with pytest.raises(SystemExit):
    cli.main(["--version"])
  assert capsys.readouterr().out.strip() == f"kadiff-jax {__version__}"
  with pytest.raises(SystemExit):
    cli.main(["run", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "candidates retrieved (and re-ranked) (default: 5)" in text and "(default: 0.32)" in text
  assert "--seed SEED (default: 0)" in text
