"""DreamBooth evaluation runner and correspondence pictures, end to end on tiny models."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kadiff_jax import cli, image_io
from kadiff_jax.evaluation import dreambooth as db
from kadiff_jax.evaluation import report
from kadiff_jax.kadiff import visualize as V
from kadiff_jax.metrics.clip_score import CLIPScorer
from kadiff_jax.metrics.dino import DINOScorer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  """The real DreamBooth folder where ../shared has it, else a two-subject folder in the same layout."""
  if (SHARED / db.PROMPTS_FILE).is_file():
    return SHARED
  root = tmp_path_factory.mktemp("dreambooth")
  rng = np.random.default_rng(0)
  for name in ("dog", "can"):
    (root / name).mkdir()
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (80, 64, 3)).astype(np.uint8)).save(root / name / f"{i:02d}.jpg")
  objects = ",\n".join(f"'a {{0}} {{1}} {p}'.format(unique_token, class_token)" for p in ("in the jungle", "in the snow"))
  live = ",\n".join(f"'a {{0}} {{1}} {p}'.format(unique_token, class_token)" for p in ("in the jungle", "wearing a red hat"))
  (root / db.PROMPTS_FILE).write_text(f"Classes\n\nsubject_name,class\ndog,dog\ncan,can\n\nPrompts\n\nObject Prompts\n\n"
                                      f"prompt_list = [\n{objects}\n]\n\nLive Subject Prompts\n\nprompt_list = [\n{live}\n]\n")
  return root


def test_dataset_layout_and_plan(dataset_dir, tmp_path):
  ds = db.load_dataset(dataset_dir)
  names = {s.name: s for s in ds.subjects}
  assert names["dog"].live and not names["can"].live
  if dataset_dir == SHARED:
    assert len(ds.subjects) == 30 and len(ds.object_prompts) == 25 and len(ds.live_prompts) == 25
    assert ds.live_prompts[10] == "a {0} {1} wearing a red hat"
  items = db.plan(ds, ["dog", "can"], [0, 1], [0, 7])
  assert [i.id for i in items[:2]] == ["dog-p00-s0", "dog-p00-s7"] and len(items) == 8
  assert items[0].prompt == "a dog in the jungle" and items[0].ref_prompt == "a photo of a dog"
  assert db.plan(ds, ["dog"], [1], unique_token="sks")[0].prompt.startswith("a sks dog ")
  with pytest.raises(ValueError, match=r"unknown subjects \['unicorn'\]"):
    db.plan(ds, ["unicorn"])
  with pytest.raises(ValueError, match=r"prompt indices \[99\]"):
    db.plan(ds, ["dog"], [99])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    db.load_dataset(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="prompts_and_classes.txt"):
    db.load_dataset(tmp_path / "empty")


@pytest.mark.slow
def test_evaluate_dreambooth_end_to_end_and_resume(tmp_path, tiny_dir, tiny_clip, tiny_dino, dataset_dir, capsys):
  out = tmp_path / "eval"
  argv = ["evaluate", "dreambooth", "--data", str(dataset_dir), "--out", str(out), "--subjects", "dog,can",
          "--prompts", "0,1", "--seeds", "0", "--model", str(tiny_dir), "--steps", "4",
          "--clip", str(tiny_clip[0]), "--dino", str(tiny_dino[0]), "--cache-dir", str(tmp_path / "cache")]
  assert cli.main(argv) == 0
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["items"] == 4 and last["generated"] == {"kadiff+baseline": 4, "masactrl": 4}
  with open(out / "per_image.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 12 and {r["method"] for r in rows} == set(db.METHODS)
  for r in rows:
    assert 0 <= float(r["clip_t"]) <= 2.5 and -1 <= float(r["clip_i"]) <= 1 and -1 <= float(r["dino"]) <= 1
    assert (out / r["image"]).is_file()
  # one row recomputed directly with the scorers: the CSV holds what the metrics say about that file
  r = next(r for r in rows if r["method"] == "masactrl")
  item = next(i for i in db.plan(db.load_dataset(dataset_dir), ["dog", "can"], [0, 1]) if i.id == r["id"])
  clip, dino = CLIPScorer(str(tiny_clip[0])), DINOScorer(str(tiny_dino[0]))
  assert float(r["clip_t"]) == pytest.approx(float(clip.clip_t([out / r["image"]], [item.prompt])[0]), abs=1e-5)
  assert float(r["dino"]) == pytest.approx(float(dino.score([out / r["image"]], [item.reference])[0]), abs=1e-5)
  assert float(r["clip_i"]) == pytest.approx(float(clip.clip_i([out / r["image"]], [item.reference])[0]), abs=1e-5)
  # the three methods differ (injection and mutual attention change the image)
  ours, base, masa = (np.asarray(image_io.load_rgb(db.image_path(out, m, "dog-p00-s0"))) for m in db.METHODS)
  assert not np.array_equal(ours, base) and not np.array_equal(ours, masa)
  with open(out / "per_subject.csv") as f:
    subj = list(csv.DictReader(f))
  assert len(subj) == 6 and all(s["images"] == "2" for s in subj)
  md = (out / "summary.md").read_text()
  assert all(name in md for name in ("KA-Diff (ours)", "IP-Adapter", "MasaCtrl-style", "CLIP-T", "DINO"))
  chart = np.asarray(Image.open(out / "chart.png"))
  assert chart.shape == (380, 720, 3) and len(np.unique(chart.reshape(-1, 3), axis=0)) > 5
  assert (out / "images" / "kadiff" / "dog-p00-s0_mask.png").is_file()  # the automatic mask, by default

  # resume: nothing to do; a deleted image is the only one regenerated
  (out / "images" / "masactrl" / "can-p01-s0.png").unlink()
  assert cli.main(argv) == 0
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["generated"] == {"kadiff+baseline": 0, "masactrl": 1}

  # bad input: a missing dataset folder, an image the metric encoders can't read
  assert cli.main([*argv[:3], str(tmp_path / "missing"), *argv[4:]]) == 2
  assert "does not exist" in capsys.readouterr().err
  (out / "images" / "kadiff" / "dog-p01-s0.png").write_bytes(b"not an image")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "cannot read" in err and "dog-p01-s0.png" in err


@pytest.mark.slow
def test_evaluate_offline_with_tiny_metric_models(tmp_path, tiny_dir, dataset_dir, capsys, monkeypatch):
  """No network: the tiny SDXL, and `--clip tiny --dino tiny` made in the cache; summary.md names them."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  out = tmp_path / "eval"
  assert cli.main(["evaluate", "dreambooth", "--data", str(dataset_dir), "--out", str(out), "--subjects", "dog",
                   "--prompts", "0", "--methods", "kadiff", "--model", str(tiny_dir), "--steps", "3",
                   "--clip", "tiny", "--dino", "tiny", "--cache-dir", str(tmp_path / "cache")]) == 0
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["items"] == 1 and set(last["summary"]["kadiff"]) == {"clip_t", "clip_i", "dino"}
  md = (out / "summary.md").read_text()
  assert "CLIP `tiny`" in md and "DINO `tiny`" in md and "random tiny models" in md
  assert "ViT-B/32" not in md


def test_report_numbers():
  rows = [{"subject": s, "cls": "dog", "prompt_index": p, "seed": 0, "method": m, "clip_t": v, "clip_i": v / 2,
           "dino": v / 4} for s in ("a", "b") for p in (0, 1) for m, v in (("kadiff", 0.8), ("baseline", 0.4))]
  rows[0] = {**rows[0], "clip_t": 1.0}
  table = report.summary(rows)
  mean, sem = table["kadiff"]["clip_t"]
  want = np.array([1.0, 0.8, 0.8, 0.8])
  assert mean == pytest.approx(want.mean()) and sem == pytest.approx(want.std(ddof=1) / 2)
  assert table["baseline"]["dino"] == (pytest.approx(0.1), 0.0)
  subj = report.per_subject(rows)
  assert [(s["subject"], s["method"], s["images"]) for s in subj] == [("a", "baseline", 2), ("a", "kadiff", 2),
                                                                      ("b", "baseline", 2), ("b", "kadiff", 2)]
  assert subj[1]["clip_t"] == pytest.approx(0.9)


def test_matches_image_draws_each_match_in_its_source_colour():
  r, size = 4, 64
  ref = np.zeros((40, 40, 3), np.uint8)
  gen = np.full((40, 40, 3), 128, np.uint8)
  source = np.arange(r * r)[::-1].copy()  # target j matched to source n-1-j (a point reflection)
  inject = np.zeros(r * r, bool)
  inject[[0, 5, 10]] = True
  img = V.matches_image(ref, gen, source, inject, r, size=size)
  assert img.shape == (size, 2 * size, 3)
  cell = size // r
  for j in (0, 5, 10):
    ty, tx = divmod(j, r)
    sy, sx = divmod(int(source[j]), r)
    colour = V.position_colour(np.array([source[j]]), r)[0]
    np.testing.assert_array_equal(img[ty * cell + cell // 2, size + tx * cell + cell // 2], colour)
    np.testing.assert_array_equal(img[sy * cell + cell // 2, sx * cell + cell // 2], colour)
  untouched = img[size - 3, size + 2]  # far from every drawn match: the generated image as it was
  np.testing.assert_array_equal(untouched, [128, 128, 128])


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_visualize_correspondence_cli(tmp_path, tiny_dir, capsys):
  ref = next(iter(sorted((SHARED / "dog").glob("*.jpg"))), None) if SHARED.is_dir() else None
  if ref is None:
    ref = tmp_path / "ref.png"
    image_io.write_png(ref, np.random.default_rng(5).integers(0, 256, (96, 96, 3)).astype(np.uint8))
  out = tmp_path / "viz"
  argv = ["visualize", "correspondence", "--model", str(tiny_dir), "--reference", str(ref), "--prompt",
          "a dog in the snow", "--ref-prompt", "a photo of a dog", "--mask", "auto", "--steps", "6", "--size", "128",
          "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
  assert cli.main(argv) == 0
  head = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert head["resolution"] == 8 and head["mask"]["source"] == "auto"
  for name in ("ours", "matches", "distance", "injected", "cross_attention"):
    im = np.asarray(Image.open(out / f"{name}.png"))
    assert im.ndim == 3 and im.std() > 0, name
  summary = json.loads((out / "correspondence.json").read_text())
  lo, hi = summary["injecting_steps"]
  assert (lo, hi) == (2, 5)  # 19-49 of 50 scaled to 6 steps
  for rows in summary["per_step"].values():
    for row in rows:
      assert 0 <= row["injected"] <= row["matched"] <= row["sources"]
      if not lo <= row["step"] <= hi:
        assert row["matched"] == 0
    assert any(row["injected"] > 0 for row in rows)
  # the written config.yaml is this command's own: it parses back (the parent's sub-command names stay out)
  from kadiff_jax import cli_args
  again = cli_args.parse(cli.build_parser(), ["visualize", "correspondence", "--config", str(out / "config.yaml")])
  assert (again.reference, again.mask, again.size, again.steps) == (str(ref), "auto", 128, 6)
  assert cli.main(argv[:-4] + ["--step", "1", "--out", str(out)]) == 2
  assert "injection runs at steps 2-5" in capsys.readouterr().err
  shutil.rmtree(out)
