"""MLLM re-ranking: the reference's policy, lenient JSON reading, and a tiny random LLaVA-OneVision."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import rerank

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"


@pytest.mark.parametrize("text,want", [
    ('{"is_match": true, "reason": "same dog"}', {"is_match": True, "reason": "same dog"}),
    ('Sure!\n```json\n{"textual_match_score": 80, "visual_match_score": 65,}\n```', {"textual_match_score": 80,
                                                                                   "visual_match_score": 65}),
    ("{'is_match': False, 'reason': 'a cat'}", {"is_match": False, "reason": "a cat"}),
    ('textual_match_score: 70, "visual_match_score": 40.5', {"textual_match_score": 70.0,
                                                            "visual_match_score": 40.5}),
    ("I cannot tell.", None),
    ("", None),
])
def test_parse_json_answer(text, want):
  assert rerank.parse_json_answer(text) == want


class Scripted:
  """A reranker whose answers are given per docid description."""

  id = "scripted"

  def __init__(self, match, scores):
    self.match, self.scores, self.asked = match, scores, []

  def judge(self, query, description, image):
    self.asked.append(("judge", description))
    return rerank.Judgement(self.match, None)

  def score(self, query, description, image):
    self.asked.append(("score", description))
    t, v = self.scores.get(description, (None, None))
    return rerank.Scores(t, v)


CANDS = [("a", "A", None), ("b", "B", None), ("c", "C", None)]


def test_choose_follows_the_reference_policy():
  r = Scripted(True, {})
  d = rerank.choose("q", CANDS, r)
  assert (d.chosen, d.rule) == ("a", "is_match") and r.asked == [("judge", "A")]
  d = rerank.choose("q", CANDS, Scripted(False, {"A": (50, 50), "B": (90, 30), "C": (70, 60)}))
  assert (d.chosen, d.rule) == ("c", "scores") and d.scores["b"]["mean"] == 60
  d = rerank.choose("q", CANDS, Scripted(None, {"B": (10, None)}))  # unreadable judgement and scores
  assert (d.chosen, d.rule) == ("a", "fallback_top1")
  with pytest.raises(rerank.RerankError, match="empty"):
    rerank.choose("q", [], Scripted(True, {}))


@pytest.fixture(scope="module")
def tiny_mllm(tmp_path_factory):
  from retrieval.tiny_mllm import make_tiny_mllm
  return make_tiny_mllm(tmp_path_factory.mktemp("mllm") / "tiny-llava-onevision")


SHAPES = [(32, 32), (64, 40), (100, 37), (37, 100), (300, 200), (50, 1000)]  # (width, height)


def test_image_token_count_matches_transformers(tiny_mllm):
  """Our count against LlavaOnevisionProcessor's own (called unbound: the class needs torchvision)."""
  from transformers import AutoConfig, AutoImageProcessor
  from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor as P
  cfg = AutoConfig.from_pretrained(tiny_mllm)
  ns = types.SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(tiny_mllm), num_image_tokens=4,
                             vision_aspect_ratio="anyres_max_9")
  ns._get_unpadded_features = types.MethodType(P._get_unpadded_features, ns)
  for grid in ([[32, 32], [32, 64], [64, 32], [64, 64]], [[32, 32], [32, 96], [96, 32], [96, 96], [320, 320]]):
    ns.image_processor.image_grid_pinpoints = grid
    for w, h in SHAPES + [(2000, 90), (90, 2000)]:
      want = P._get_number_of_features(ns, h, w, 32, 32)
      got = rerank.onevision_image_tokens((h, w), base_size=32, grid_pinpoints=grid, patches=2, max_crops=9,
                                          feature_strategy=cfg.vision_feature_select_strategy)
      assert got == want, (w, h, grid)


def test_tiny_llava_onevision_logprob_answers(tiny_mllm):
  import torch
  r = rerank.MLLMReranker(str(tiny_mllm))
  assert r._bool[0] == '{"is_match":'
  for w, h in SHAPES:  # the model itself checks that the <image> token count equals its features
    image = Image.fromarray(np.random.default_rng(w).integers(0, 255, (h, w, 3), np.uint8))
    j = r.judge("a corgi", "Pembroke Welsh Corgi. A dog.", image)
    s = r.score("a corgi", "Pembroke Welsh Corgi. A dog.", image)
    assert 0 < j.p_match < 1 and j.is_match == (j.p_match > 0.5)
    assert 0 <= s.textual <= 100 and 0 <= s.visual <= 100
  # p(match) read independently through generate()'s first-step scores.
  prefix, ids = r._bool
  inputs = r._inputs(rerank.MATCH_PROMPT.format(query="a corgi", description="Pembroke Welsh Corgi. A dog."),
                     image, prefix)
  with torch.no_grad():
    gen = r.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
  p = torch.softmax(gen.scores[0][0].float(), -1)[ids].numpy()
  assert j.p_match == pytest.approx(p[0] / p.sum(), rel=1e-5)
  again = rerank.MLLMReranker(str(tiny_mllm)).judge("a corgi", "Pembroke Welsh Corgi. A dog.", image)
  assert again.p_match == j.p_match  # deterministic


def test_tiny_llava_onevision_generate_falls_back(tiny_mllm):
  r = rerank.MLLMReranker(str(tiny_mllm), scoring="generate", max_new_tokens=6)
  image = Image.new("RGB", (40, 30), (200, 30, 30))
  d = rerank.choose("a corgi", [("x", "X", image), ("y", "Y", image)], r)
  # A random model's answer is not JSON: no judgement, no scores, so the top-1 is kept.
  assert (d.chosen, d.rule) == ("x", "fallback_top1") and d.judgement["is_match"] is None
  with pytest.raises(rerank.RerankError, match="scoring = 'maybe'"):
    rerank.MLLMReranker(str(tiny_mllm), scoring="maybe")
  with pytest.raises(rerank.RerankError, match="could not load|neither an existing folder"):
    rerank.MLLMReranker(str(tiny_mllm.parent / "nope"))


@pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="../shared/data/dreambooth not present")
@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_cli_query_with_rerank(tiny_mllm, tmp_path):
  def kadiff(*args):
    out = subprocess.run([sys.executable, "-m", "kadiff_jax.cli", *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
  kadiff("retrieve", "build", "--corpus", DREAMBOOTH, "--index", tmp_path / "idx")
  out = json.loads(kadiff("retrieve", "query", "--index", tmp_path / "idx", "a yellow bath toy bird", "-k", "3",
                          "--rerank", tiny_mllm, "--json"))
  assert out["rerank"]["rule"] in ("is_match", "scores")
  assert out["results"][0]["id"] == out["rerank"]["chosen"] and len(out["results"]) == 3
  assert {r["id"] for r in out["results"]} >= {"duck_toy"}
  if out["rerank"]["rule"] == "scores":
    assert all("rerank_scores" in r for r in out["results"])
  queries = tmp_path / "q.jsonl"
  queries.write_text('{"query": "a yellow bath toy bird", "id": "duck_toy"}\n'
                     '{"query": "a sausage dog napping on a green couch", "id": "dog5"}\n')
  ev = json.loads(kadiff("retrieve", "evaluate", "--index", tmp_path / "idx", "--queries", queries, "-k", "2",
                         "--rerank", tiny_mllm).splitlines()[-1])
  assert ev["queries"] == 2 and ev["top1"] == 1.0 and 0.0 <= ev["top1_reranked"] <= 1.0
