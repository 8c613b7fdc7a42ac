"""`kadiff app`: the page served on a free localhost port with the tiny model, driven end to end through
gradio_client (each tab, the bad-input paths), and in a real browser (Debian's chromium, through Playwright)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
pytestmark = pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="../shared/data/dreambooth not present")
DOG = DREAMBOOTH / "dog" / "00.jpg"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_dir, tmp_path_factory):
  """The app on a free port, with the tiny model and a DreamBooth index; counts how often models load."""
  from kadiff_jax import cli
  from kadiff_jax.app import cli as app_cli
  from kadiff_jax.weights.options import ModelOptions
  root = tmp_path_factory.mktemp("app")
  assert cli.main(["retrieve", "build", "--corpus", str(DREAMBOOTH), "--index", str(root / "idx")]) == 0
  assert cli.main(["hspace", "build", "--model", str(tiny_dir), "--corpus", str(DREAMBOOTH), "--database",
                   str(root / "hdb")]) == 0
  loads = []
  original = ModelOptions.load
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ModelOptions, "load", lambda self: loads.append(1) or original(self))
    args = cli.build_parser().parse_args(["app", "--model", str(tiny_dir), "--index", str(root / "idx"),
                                          "--database", str(root / "hdb"), "--out", str(root / "out"),
                                          "--port", str(free_port())])
    page, service, url = app_cli.serve(args, block=False)
    try:
      yield {"url": url, "service": service, "loads": loads, "loaded_at_start": len(loads), "root": root}
    finally:
      page.close()


def client(app, tmp_path) -> Client:
  return Client(app["url"], verbose=False, download_files=str(tmp_path / "downloads"))


def stroke_layer(path: Path, size=(512, 512)) -> Path:
  """A drawn layer: transparent, with an opaque square over the middle (where the dog is)."""
  a = np.zeros(size[::-1] + (4,), np.uint8)
  a[128:384, 128:384] = (255, 255, 255, 255)
  Image.fromarray(a, "RGBA").save(path)
  return path


def editor(background: Path | None, layers=()) -> dict:
  return {"background": handle_file(str(background)) if background else None,
          "layers": [handle_file(str(p)) for p in layers], "composite": None, "id": None}


def test_page_header_names_what_is_loaded(app):
  import httpx
  html = httpx.get(app["url"], timeout=30).text
  assert "kadiff" in html
  described = app["service"].describe()
  assert "tiny-sdxl" in described and "SDXL" in described and "30 entries" in described
  assert "ip-adapter-plus_sdxl_vit-h" in described


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_knowledge_tab_retrieves_picks_and_generates(app, tmp_path):
  c = client(app, tmp_path)
  t0 = time.perf_counter()
  line, gallery, choice, shown = c.predict("a chow chow in the snow", "", 5, api_name="/retrieve")
  assert line.startswith("'a chow chow in the snow' -> 'Chow Chow' (dog2, score 0.")
  assert len(gallery) == 5 and gallery[0]["caption"].startswith("0. Chow Chow (dog2, 0.")
  assert all(Path(g["image"]).is_file() for g in gallery) and choice["value"] == 0
  assert [label for label, _ in choice["choices"]][1].startswith("1. ")
  assert Image.open(shown["background"]).size == Image.open(DREAMBOOTH / "dog2" / "00.jpg").size
  t1 = time.perf_counter()
  mask, base, ours, grid, text, record_file = c.predict(None, "a chow chow in the snow", "auto", None, None, 3,
                                                          3, api_name="/generate_retrieved")
  t2 = time.perf_counter()
  assert Image.open(ours).size == (64, 64) and Image.open(base).size == (64, 64)
  assert not np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(base)))
  assert np.asarray(Image.open(grid)).shape[1] == 4 * 256 + 5 * 4
  record = json.loads(text)
  assert json.loads(Path(record_file).read_text()) == record
  assert record["status"] == "done" and record["chosen"]["id"] == "dog2"
  assert record["chosen_by"] == "retrieval" and record["mask"]["source"] == "auto"
  assert record["mask"]["words"] == ["chow"] and record["seed"] == 3
  assert record["inputs"]["options"]["steps"] == 3 and record["inputs"]["baseline"] is True
  overlay = np.asarray(Image.open(mask))
  assert overlay.shape == (64, 64, 3) and (overlay == (255, 0, 0)).all(-1).any()  # the concept outlined
  # the same job from the CLI gives the same pixels
  from kadiff_jax import cli
  out = tmp_path / "cli"
  assert cli.main(["generate", "--mode", "kadiff", "--model", str(app["service"].pipe.models.source),
                   "--reference", str(DREAMBOOTH / "dog2" / "00.jpg"), "--ref-prompt", record["ref_prompt"],
                   "--prompt", "a chow chow in the snow", "--mask", "auto", "--mask-words", "chow", "--seed", "3",
                   "--steps", "3", "--out", str(out)]) == 0
  made = sorted(out.glob("*.png"))
  ours_cli = next(p for p in made if not p.stem.endswith(("_grid", "_mask", "_baseline")))
  assert np.array_equal(np.asarray(Image.open(ours_cli)), np.asarray(Image.open(ours)))

  folders = sorted(p.name for p in (app["root"] / "out").glob("session-*/*"))
  assert any(f.endswith("-retrieve") for f in folders) and any(f.endswith("-generate-retrieved") for f in folders)
  print(f"\nclick to images: retrieve {t1 - t0:.1f}s, first generation {t2 - t1:.1f}s")


def test_knowledge_tab_bad_input(app, tmp_path):
  c = client(app, tmp_path)
  with pytest.raises(AppError, match="retrieve first: no candidates yet"):
    c.predict(None, "a dog", "auto", None, None, 0, 3, api_name="/generate_retrieved")
  with pytest.raises(AppError, match="the prompt is empty"):
    c.predict("  ", "", 5, api_name="/retrieve")
  line, *_ = c.predict("quantum chromodynamics lecture notes", "", 3, api_name="/retrieve")
  assert "no match" in line and "pick a candidate" in line
  with pytest.raises(AppError, match="no match for 'quantum chromodynamics lecture notes'.*pick a candidate"):
    c.predict(None, "lecture notes", "auto", None, None, 0, 3, api_name="/generate_retrieved")
  with pytest.raises(AppError, match="mask 'uploaded': no mask file given"):
    c.predict(0, "lecture notes", "uploaded", None, None, 0, 3, api_name="/generate_retrieved")
  # the page is still alive after the errors
  line, *_ = c.predict("a rubber duck", "", 2, api_name="/retrieve")
  assert "Rubber duck" in line


@pytest.mark.slow
def test_reference_tab_drawn_mask_and_correspondence(app, tmp_path):
  c = client(app, tmp_path)
  layer = stroke_layer(tmp_path / "layer.png", Image.open(DOG).size)
  mask, base, ours, grid, text, record_file = c.predict(
      editor(DOG, [layer]), "a dog", "a dog in the snow", "drawn", None, 0, 3, 0.7, "", "1-2", False,
      api_name="/generate")
  record = json.loads(text)
  assert record["mask"]["source"] == "user" and record["inputs"]["options"]["inject_steps"] == [1, 2]
  assert record["prompt"] == "a dog in the snow" and record["ref_prompt"] == "a dog"
  folder = max((app["root"] / "out").glob("session-*/*-generate/mask.png"), key=lambda p: p.stat().st_mtime).parent
  drawn = np.asarray(Image.open(folder / "mask.png").convert("L")) > 127
  assert drawn[300, 300] and not drawn[10, 10]  # the square that was painted, nothing else
  overlay = np.asarray(Image.open(mask))
  assert overlay[32, 32].tolist() != [0, 0, 0] and (overlay[2, 2] < 100).all()  # outside the square: dimmed
  figures, summary = c.predict(api_name="/correspondence")
  summary = json.loads(summary)
  assert [Path(f["image"]).name for f in figures] == ["matches.png", "distance.png", "injected.png",
                                                      "cross_attention.png"]
  assert summary["prompt"] == "a dog in the snow" and summary["injecting_steps"] == [1, 2]


def test_reference_tab_bad_input(app, tmp_path):
  c = client(app, tmp_path)
  args = lambda **kw: [kw.get("editor", editor(DOG)), "a dog", kw.get("prompt", "a dog in the snow"),
                       kw.get("mask", "auto"), kw.get("mask_file"), 0, kw.get("steps", 3), 0.7, "",
                       kw.get("inject_steps", ""), False]
  with pytest.raises(AppError, match="no reference image; upload one"):
    c.predict(*args(editor=editor(None)), api_name="/generate")
  with pytest.raises(AppError, match="the prompt is empty"):
    c.predict(*args(prompt=" "), api_name="/generate")
  with pytest.raises(AppError, match="mask 'drawn': nothing is drawn on the reference"):
    c.predict(*args(mask="drawn"), api_name="/generate")
  with pytest.raises(AppError, match="expected START-END, e.g. 19-49, got 'soon'"):
    c.predict(*args(inject_steps="soon"), api_name="/generate")
  with pytest.raises(AppError, match="steps=1: expected at least 2"):
    c.predict(*args(steps=1), api_name="/generate")
  not_image = tmp_path / "mask.png"
  not_image.write_text("this is not a picture")
  with pytest.raises(AppError, match="cannot identify image file"):  # Gradio reads the upload before we do
    c.predict(*args(mask="uploaded", mask_file=handle_file(str(not_image))), api_name="/generate")
  with pytest.raises(AppError, match="generate an image first"):
    c.predict(api_name="/correspondence")


@pytest.mark.slow
def test_interpolation_tab(app, tmp_path):
  c = client(app, tmp_path)
  gallery, strip, gif, text, record_file = c.predict(
      "a photo of a cat", "a photo of a dog", "", 3, 0, 3, "fused_outer", "text", None, None, api_name="/interpolate")
  record = json.loads(text)
  assert [g["caption"] for g in gallery] == [f"t = {t:.3f}" for t in record["coefficients"]]
  assert record["coefficients"][0] == 0.0 and record["coefficients"][-1] == 1.0 and len(gallery) == 3
  assert json.loads(Path(record_file).read_text()) == record and record["options"]["steps"] == 3
  assert Image.open(gif).n_frames == 3 and Image.open(strip).size[0] > 3 * 64
  from kadiff_jax import cli
  out = tmp_path / "cli"
  assert cli.main(["interpolate", "--model", str(app["service"].pipe.models.source), "--prompt-a", "a photo of a cat",
                   "--prompt-b", "a photo of a dog", "--frames", "3", "--steps", "3", "--out", str(out)]) == 0
  for k, g in enumerate(gallery):  # the CLI's frames, pixel for pixel
    assert np.array_equal(np.asarray(Image.open(g["image"])), np.asarray(Image.open(out / f"frame_{k:02d}.png")))
  with pytest.raises(AppError, match="mode morph: upload image B"):
    c.predict("a", "b", "", 3, 0, 3, "fused_outer", "morph", None, None, api_name="/interpolate")
  with pytest.raises(AppError, match="Value 2 is less than minimum value 3"):  # the slider's own check
    c.predict("a", "b", "", 2, 0, 3, "fused_outer", "text", None, None, api_name="/interpolate")


@pytest.mark.slow
def test_retrieval_with_reranking(app, tmp_path):
  """With a re-ranker (a tiny random LLaVA-OneVision: its answers are noise), the chosen candidate is the
  re-ranker's, and the labels carry the scores it gave."""
  from kadiff_jax.app.service import AppService
  from kadiff_jax.app.ui import candidate_label
  from retrieval import embed, rerank, retriever, store
  ri = store.RetrievalIndex.load(app["root"] / "idx")
  r = retriever.Retriever(ri, embed.load_embedder(ri.manifest["embedder"]["id"]),
                          reranker=rerank.MLLMReranker("tiny"))
  service = AppService(app["service"].pipe, tmp_path / "out", r, str(app["root"] / "idx"), "tiny")
  s = service.retrieve("s1", "a chow chow in the snow", None, 3)
  assert s["rerank"]["rule"] in ("is_match", "scores", "fallback_top1")
  assert set(s["rerank"]["top1_judgement"]) == {"is_match", "p_match", "reason"}
  chosen = s["candidates"][s["chosen"]]
  assert chosen["id"] == s["decision"]["chosen"]["id"]
  if s["rerank"]["rule"] == "scores":
    assert max(s["candidates"], key=lambda c: c["rerank"]["mean"])["id"] == chosen["id"]
  for i, c in enumerate(s["candidates"]):
    assert ("re-rank" in candidate_label(i, c)) == bool(c["rerank"] and c["rerank"]["mean"] is not None)
  assert "re-ranked by `tiny`" in service.describe()


@pytest.mark.slow
def test_rag_turbo_tab(app, tmp_path):
  """One-step RAG-Turbo (on the tiny SDXL: the H-space seam is every family's) equals the CLI, pixel for pixel."""
  c = client(app, tmp_path)
  plain, ours, gallery, text, _ = c.predict("a teddy bear with a party hat", 4, 2, 0.7, "slerp", 2,
                                            api_name="/rag_turbo")
  record = json.loads(text)
  assert record["inputs"]["mode"] == "rag-turbo" and len(record["retrieved"]) == 2 and len(gallery) == 2
  assert gallery[0]["caption"].startswith(record["retrieved"][0]["id"] + ": λ = ")
  assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(ours)))
  from kadiff_jax import cli
  out = tmp_path / "cli"
  assert cli.main(["generate", "--mode", "rag-turbo", "--model", str(app["service"].pipe.models.source),
                   "--database", str(app["root"] / "hdb"), "--prompt", "a teddy bear with a party hat", "--seed", "4",
                   "--k", "2", "--w", "0.7", "--steps", "2", "--out", str(out)]) == 0
  assert np.array_equal(np.asarray(Image.open(out / "seed4_0000.png")), np.asarray(Image.open(ours)))
  with pytest.raises(AppError, match="the prompt is empty"):
    c.predict(" ", 0, 1, 0.8, "slerp", 1, api_name="/rag_turbo")
  with pytest.raises(AppError, match="'adapter'.* not in the list of choices: \\['slerp'\\]"):  # none loaded
    c.predict("a cat", 0, 1, 0.8, "adapter", 1, api_name="/rag_turbo")
  with pytest.raises(ValueError, match="no H-space adapter is loaded"):  # the service says so too
    app["service"].rag_turbo(None, "a cat", injection="adapter")


def test_models_load_once(app, tmp_path):
  assert app["loaded_at_start"] == 1
  before = len(app["loads"])  # other tests ran the CLI in this process too
  c = client(app, tmp_path)
  _, gallery, *_ = c.predict("a rubber duck", "", 2, api_name="/retrieve")
  # the user picks the second candidate, with no mask; the record says so
  *_, text, _ = c.predict(1, "a rubber duck in the snow", "none", None, None, 1, 3, api_name="/generate_retrieved")
  record = json.loads(text)
  assert record["chosen"]["id"] == gallery[1]["caption"].split("(")[-1].split(",")[0]
  assert record["chosen_by"] == "user" and record["mask"] == {"source": "none"}
  assert len(app["loads"]) == before  # requests reuse the pipeline loaded at start


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_each_tab_in_a_real_browser(app, tmp_path):
  """Headless Chromium opens the page, runs each tab as a user would, and takes a screenshot of each after its
  run (kept in $KADIFF_SCREENSHOTS when set)."""
  sync_api = pytest.importorskip("playwright.sync_api")
  shots = Path(os.environ.get("KADIFF_SCREENSHOTS") or tmp_path / "screenshots")
  shots.mkdir(parents=True, exist_ok=True)
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(app["url"], wait_until="load")
    page.locator("#loaded").wait_for(timeout=60_000)
    assert "tiny-sdxl" in page.locator("#loaded").inner_text()

    page.get_by_role("tab", name="Knowledge-augmented generation").click()
    page.locator("#ka-prompt textarea").fill("a chow chow in the snow")
    page.locator("#ka-retrieve").click()
    page.locator("#ka-candidates img").first.wait_for(timeout=120_000)
    page.locator("#ka-steps input").fill("3")
    page.locator("#ka-generate").click()
    page.locator("#ka-ours img").wait_for(timeout=300_000)
    assert page.locator("#ka-candidates img").count() == 5
    page.screenshot(path=str(shots / "knowledge.png"), full_page=True)

    page.get_by_role("tab", name="From your reference").click()
    with page.expect_file_chooser() as chooser:
      page.locator("#ref-reference").get_by_text("Upload an image").click()
    chooser.value.set_files(str(DOG))
    page.get_by_text("KA-Diff options").click()
    page.locator("#ref-steps input").fill("3")
    page.locator("#ref-ref-prompt textarea").fill("a dog")
    page.locator("#ref-prompt textarea").fill("a dog in the snow")
    page.locator("#ref-generate").click()
    page.locator("#ref-ours img").wait_for(timeout=300_000)
    page.locator("#ref-correspondence").click()
    page.locator("#ref-figures img").first.wait_for(timeout=300_000)
    assert page.locator("#ref-figures img").count() == 4
    page.screenshot(path=str(shots / "reference.png"), full_page=True)

    page.get_by_role("tab", name="Attention interpolation").click()
    page.locator("#int-a textarea").fill("a photo of a cat")
    page.locator("#int-b textarea").fill("a photo of a dog")
    page.locator("#int-steps input").fill("3")
    page.locator("#int-go").click()
    page.locator("#int-gif img").wait_for(timeout=300_000)
    assert page.locator("#int-frames img").count() == 5
    page.screenshot(path=str(shots / "interpolation.png"), full_page=True)

    page.get_by_role("tab", name="RAG-Turbo (one step)").click()
    page.locator("#rt-prompt textarea").fill("a teddy bear with a party hat")
    assert page.locator("#rt-steps input").input_value() == "50"  # the tiny SDXL's family default
    page.locator("#rt-steps input").fill("2")
    page.locator("#rt-go").click()
    page.locator("#rt-ours img").wait_for(timeout=300_000)
    assert page.locator("#rt-neighbours img").count() == 1
    page.screenshot(path=str(shots / "rag_turbo.png"), full_page=True)

    page.get_by_role("tab", name="From your reference").click()
    page.locator("#ref-prompt textarea").fill("")
    page.locator("#ref-generate").click()  # an error is a message in the page, which stays usable
    page.get_by_text("the prompt is empty").first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "error.png"), full_page=True)
    browser.close()
  for name in ("knowledge", "reference", "interpolation", "rag_turbo", "error"):
    assert Image.open(shots / f"{name}.png").size[0] == 1400
