"""`kadiff run`: retrieval over a DreamBooth corpus with the real MiniLM, then KA-Diff on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kadiff_jax import cli, image_io

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
pytestmark = pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="../shared/data/dreambooth not present")


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_run_retrieves_generates_and_records(tmp_path, tiny_dir, capsys):
  idx = tmp_path / "idx"
  assert cli.main(["retrieve", "build", "--corpus", str(DREAMBOOTH), "--index", str(idx)]) == 0
  queries = tmp_path / "queries.jsonl"
  queries.write_text("\n".join([
      json.dumps({"id": "chow", "prompt": "a chow chow in the snow", "seed": 3}),
      json.dumps({"id": "nothing", "prompt": "quantum chromodynamics lecture notes"}),
      json.dumps({"prompt": "a rubber duck on the beach", "mask": "auto"})]))
  argv = ["run", "--index", str(idx), "--queries", str(queries), "--model", str(tiny_dir), "--steps", "3", "--baseline",
          "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), "--min-score", "0.3"]
  capsys.readouterr()
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  summary = json.loads(printed[-1])
  # stdout names each query's chosen reference (or why there is none) before the summary
  assert printed[0].startswith("chow: 'a chow chow in the snow' -> 'Chow Chow' (dog2, score 0.")
  assert printed[1].startswith("nothing: no match for 'quantum chromodynamics lecture notes'")
  assert "'Rubber duck' (duck_toy" in printed[2] and "mask words ['rubber', 'duck']" in printed[2]
  assert summary == {"queries": 3, "generated": 2, "already_done": 0, "redone": 0, "no_match": 1}
  out = tmp_path / "out"
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [f"{i}{s}" for i in ("chow", "0003_a_rubber_duck_on_the_beach") for s in (".png", "_baseline.png",
                                                                             "_grid.png", ".json")]
      + ["nothing.json", "0003_a_rubber_duck_on_the_beach_mask.png", "config.yaml"])

  rec = json.loads((out / "chow.json").read_text())
  assert rec["status"] == "done" and rec["chosen"]["id"] == "dog2" and rec["seed"] == 3
  assert rec["ref_prompt"] == "A red Chow Chow walking on a forest path." and rec["ref_prompt_source"] == "caption"
  assert rec["mask"] == {"source": "none"} and rec["inputs"]["options"]["inject_layers"] == "up_blocks.*"
  assert [r["id"] for r in rec["retrieval"]["results"]][0] == "dog2" and len(rec["retrieval"]["results"]) == 5
  meta = image_io.read_png_metadata(out / "chow.png")
  assert meta["reference"] == rec["chosen"]["image"] and meta["prompt"] == "a chow chow in the snow"
  grid = np.asarray(Image.open(out / "chow_grid.png"))
  assert grid.shape[1] == 4 * 256 + 5 * 4  # reference | mask | baseline | ours, 64 px tiles shown at 256
  duck = json.loads((out / "0003_a_rubber_duck_on_the_beach.json").read_text())
  assert duck["chosen"]["id"] == "duck_toy"
  assert duck["mask"]["source"] == "auto" and duck["mask"]["words"] and 0 < duck["mask"]["foreground_fraction"] < 1
  assert duck["outputs"]["mask"] == "0003_a_rubber_duck_on_the_beach_mask.png"
  assert duck["mask"]["words"] == ["rubber", "duck"] and duck["mask_words_source"] == "title"  # the entity's, not
  # the caption's background ("on asphalt")
  none = json.loads((out / "nothing.json").read_text())
  assert none["status"] == "no_match" and "under min_score 0.3" in none["reason"]
  assert none["retrieval"]["results"][0]["score"] < 0.3

  # A rerun finds everything done; records are rewritten identically (atomically).
  before = [(out / n).read_text() for n in ("chow.json", "0003_a_rubber_duck_on_the_beach.json")]
  assert cli.main(argv) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["already_done"] == 2
  assert [(out / n).read_text() for n in ("chow.json", "0003_a_rubber_duck_on_the_beach.json")] == before
  assert not [p for p in out.iterdir() if ".tmp" in p.name]

  # The Python API: the same query gives the same pixels and the same job fingerprint
  from kadiff_jax import KnowledgeAugmentedPipeline
  kap = KnowledgeAugmentedPipeline.from_pretrained(str(tiny_dir), index=str(idx), cache_dir=str(tmp_path / "c"))
  got = kap("a chow chow in the snow", mask=None, seed=3, steps=3, min_score=0.3)
  # the run batched chow with the duck: only float rounding of the larger batch differs
  diff = np.abs(np.asarray(got.images[0]).astype(int) - np.asarray(Image.open(out / "chow.png")).astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01
  assert got.record["chosen"]["id"] == "dog2" and got.record["status"] == "done" and not got.record["weak_match"]
  from kadiff_jax import records
  ran = json.loads((out / "chow.json").read_text())["inputs"]  # the same job, but the run also made a baseline
  assert records.changes(got.record["images"][0]["inputs"], ran) == ["baseline: false -> true"]
  cheese = kap("a xylophone made of cheese", steps=3)  # under the measured default threshold: no images
  assert cheese.images == [] and cheese.record["status"] == "no_match"


def test_calibrated_no_match_threshold(tmp_path, capsys):
  """The default --min-score is the one `kadiff retrieve calibrate` measures on DreamBooth vs off-topic queries."""
  from kadiff_jax.kadiff.run import MIN_SCORE
  idx = tmp_path / "idx"
  assert cli.main(["retrieve", "build", "--corpus", str(DREAMBOOTH), "--index", str(idx)]) == 0
  capsys.readouterr()
  assert cli.main(["retrieve", "calibrate", "--index", str(idx)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["on_topic"]["n"] == 60 and result["off_topic"]["n"] == 30
  assert abs(result["threshold"] - MIN_SCORE) < 0.02 and result["misclassified"] <= 2
  assert result["on_topic"]["p5"] > MIN_SCORE > result["off_topic"]["p95"]


def test_run_bad_input(tmp_path, capsys):
  q = tmp_path / "q.jsonl"
  q.write_text('{"prompt": "a", "colour": "red"}\n')
  assert cli.main(["run", "--index", str(tmp_path), "--queries", str(q), "--out", str(tmp_path / "o")]) == 2
  assert "expected 'prompt'" in capsys.readouterr().err
  assert cli.main(["run", "--index", str(tmp_path / "missing"), "a dog", "--out", str(tmp_path / "o")]) == 2
  assert "not a retrieval index" in capsys.readouterr().err
  assert cli.main(["run", "--index", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert "give a prompt" in capsys.readouterr().err
