"""Attention interpolation (AID / PAID): slerp and lerp, our batched frames against the release's one call per
middle (`paid_release.py`, written from PAID_SPEC.md over diffusers' SDXL pipeline), the Beta prior, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import paid_release
from conftest import max_rel_err, nchw, nhwc
from kadiff_jax import cli
from kadiff_jax.interpolation import blend, coefficients
from kadiff_jax.interpolation.pipeline import InterpolationOptions, interpolate
from kadiff_jax.job import Job
from kadiff_jax.pipelines import text_to_image as t2i


def test_slerp_and_lerp_follow_the_release():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
  b[0, 0] = a[0, 0] * 2.0  # parallel vectors: lerp
  a[1, 1] = 0.0            # undefined cosine: lerp
  for t in (0.0, 0.3, 0.5, 0.8, 1.0):
    ref = paid_release.slerp(torch.tensor(a), torch.tensor(b), t).numpy()
    np.testing.assert_allclose(np.asarray(blend.slerp(a, b, t)), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(blend.lerp(a, b, t)), torch.lerp(torch.tensor(a), torch.tensor(b),
                                                                            t).numpy(), rtol=0, atol=2.4e-7)  # fma
  whole = np.asarray(blend.slerp(a, b, 0.3, axis=None))  # Q2's option: the tensor as one vector
  assert not np.allclose(whole, np.asarray(blend.slerp(a, b, 0.3)))
  na, nb = a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)
  th = np.arccos(na @ nb)
  np.testing.assert_allclose(whole.ravel(), (np.sin(0.7 * th) * a.ravel() + np.sin(0.3 * th) * b.ravel())
                             / np.sin(th), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def release_pipe(tiny_dir):
  from diffusers import StableDiffusionXLPipeline
  return StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))


def _endpoints():
  return np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("variant,guide,init", [("fused_outer", None, "linear"), ("fused_inner", None, "slerp"),
                                                ("outer", None, "linear"), ("inner", None, "linear"),
                                                ("fused_outer", "a cat driving a car", "linear")])
def test_batched_frames_equal_the_release_one_call_per_middle(tiny_models, release_pipe, variant, guide, init):
  z = _endpoints()
  opts = InterpolationOptions(steps=6, variant=variant, init=init)  # W = int(6 * 0.5) = 3
  ours = interpolate(tiny_models, "a photo of a cat", "a dog in the snow", [0.3, 0.7], opts, guide_prompt=guide,
                     init_latents=nhwc(z))
  for k, t in ((1, 0.3), (2, 0.7)):
    lat, img = paid_release.interpolate_single(release_pipe, "a photo of a cat", "a dog in the snow", t,
                                               torch.tensor(z[:1]), torch.tensor(z[1:]), steps=6, variant=variant,
                                               guide_prompt=guide, init=init)
    for row, frame in ((0, 0), (1, k), (2, 3)):  # A, this middle, B
      assert max_rel_err(nchw(ours.latents[frame:frame + 1]), lat[row:row + 1]) < 1e-3, (t, row)
      assert np.abs(ours.images[frame].astype(int) - (img[row] * 255).round().astype(int)).max() <= 1, (t, row)
  assert np.abs(ours.latents[1] - ours.latents[0]).max() > 1e-2 and np.abs(ours.latents[2] - ours.latents[1]).max() > 1e-3


def test_endpoints_are_plain_generations_and_warmup_zero_is_plain(tiny_models):
  z = _endpoints()
  opts = InterpolationOptions(steps=6, scheduler="euler")
  ours = interpolate(tiny_models, "a photo of a cat", "a dog in the snow", [0.5], opts, init_latents=nhwc(z))
  plain, _ = t2i.generate(tiny_models, [Job.numbered("a photo of a cat", 0, 0), Job.numbered("a dog in the snow",
                                                                                            0, 1)],
                          t2i.GenerationOptions(steps=6, guidance=5.0, scheduler="euler"), init_latents=nhwc(z),
                          progress=False)
  assert max_rel_err(ours.latents[[0, 2]], plain) < 1e-5
  # no warm-up: the middle is a plain generation from the slerped noise and lerped prompt embeddings
  off = interpolate(tiny_models, "a photo of a cat", "a dog in the snow", [0.5],
                    InterpolationOptions(steps=6, warmup_steps=0), init_latents=nhwc(z))
  assert np.abs(off.latents[1] - ours.latents[1]).max() > 1e-2
  assert max_rel_err(off.latents[[0, 2]], ours.latents[[0, 2]]) < 1e-5


def test_beta_prior_and_coefficient_checks():
  assert coefficients.beta_prior(3) == pytest.approx([0.679481], abs=1e-6)  # the app's alpha 6, beta 3
  np.testing.assert_allclose(coefficients.beta_prior(5, 1, 1), [0.25, 0.5, 0.75])
  t = coefficients.beta_prior(7, 3, 3)
  assert all(a < b for a, b in zip(t, t[1:])) and t[1] == pytest.approx(1 - t[3])
  with pytest.raises(ValueError, match="frames=2: expected at least 3"):
    coefficients.beta_prior(2)
  with pytest.raises(ValueError, match=r"coefs \[1.0\]: each must lie strictly between 0"):
    coefficients.check_coefficients([0.5, 1.0])
  with pytest.raises(ValueError, match="variant='middle': expected one of"):
    InterpolationOptions(variant="middle")


def test_interpolate_cli_writes_frames_strip_gif_and_record(tmp_path, tiny_dir, capsys):
  z = tmp_path / "z.npy"
  np.save(z, _endpoints())
  out = tmp_path / "o"
  assert cli.main(["interpolate", "--model", str(tiny_dir), "--prompt-a", "a cat", "--prompt-b", "a dog", "--frames",
                   "4", "--alpha", "1", "--beta", "1", "--steps", "4", "--init-latents", str(z), "--out",
                   str(out)]) == 0
  head = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert head["frames"] == 4 and head["coefficients"] == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-6)
  rec = json.loads((out / "interpolation.json").read_text())
  assert rec["frames"] == [f"frame_0{k}.png" for k in range(4)] and rec["warmup_steps"] == 2
  assert rec["options"]["variant"] == "fused_outer" and rec["options"]["guidance"] == 5.0
  frames = [np.asarray(Image.open(out / n)) for n in rec["frames"]]
  assert all(f.shape == (64, 64, 3) for f in frames) and not np.array_equal(frames[0], frames[3])
  gif = Image.open(out / "interpolation.gif")
  assert gif.n_frames == 4
  strip = np.asarray(Image.open(out / "strip.png"))
  assert strip.shape[0] > 256 and strip.shape[1] > 4 * 256  # frames scaled to 256, captions under them
  capsys.readouterr()
  assert cli.main(["interpolate", "--model", str(tiny_dir), "--prompt-a", "a", "--prompt-b", "b", "--coefs", "0.5",
                   "--frames", "3", "--out", str(tmp_path / "x")]) == 2
  assert "--coefs and --frames: give the coefficients one way" in capsys.readouterr().err
  assert cli.main(["interpolate", "--model", str(tiny_dir), "--prompt-a", "a", "--prompt-b", "b", "--coefs", "0.5,2",
                   "--out", str(tmp_path / "x")]) == 2
  assert "--coefs '0.5,2': coefs [2.0]: each must lie strictly between 0 (A) and 1 (B)" in capsys.readouterr().err


def test_min_spread_path_is_the_brute_force_optimum():
  from itertools import combinations
  from kadiff_jax.interpolation import selection
  rng = np.random.default_rng(7)
  for m, n in ((6, 3), (7, 4), (8, 5)):
    f = rng.standard_normal((m, 5))
    d = selection.cosine_distances(f)
    spread = lambda p: max(d[a, b] for a, b in zip(p, p[1:])) - min(d[a, b] for a, b in zip(p, p[1:]))
    best = min(spread((0, *mid, m - 1)) for mid in combinations(range(1, m - 1), n - 2))
    path = selection.min_spread_path(d, n)
    assert path[0] == 0 and path[-1] == m - 1 and len(path) == n and path == sorted(set(path))
    assert spread(path) <= best + 2e-6


def test_beta_fit_and_next_coefficient():
  from scipy import stats
  from kadiff_jax.interpolation import selection
  xs = np.linspace(0, 1, 9)
  gaps = np.diff(stats.beta.cdf(xs, 2.0, 5.0))
  a, b = selection.fit_beta(xs, gaps)
  assert a == pytest.approx(2.0, rel=1e-3) and b == pytest.approx(5.0, rel=1e-3)
  assert selection.next_coefficient([0, 0.5, 1], [0.1, 0.3], 1, 1, uniform=True) == (1, 0.75)
  j, t = selection.next_coefficient([0, 0.5, 1], [0.3, 0.1], 3, 3)
  cdf = lambda x: stats.beta.cdf(x, 3, 3)
  assert j == 0 and cdf(t) == pytest.approx((cdf(0) + cdf(0.5)) / 2)


def test_explore_splits_the_widest_gaps_and_returns_a_path():
  from kadiff_jax.interpolation import selection
  calls = []

  def frames_at(t):  # a fake interpolation whose "images" are their coefficients
    calls.append(t)
    return 0.0, t, 1.0

  feature = lambda ims: np.stack([[np.cos(1.4 * x ** 2), np.sin(1.4 * x ** 2)] for x in ims])  # fast change near B
  found = selection.explore(frames_at, feature, frames=4, exploration=8)
  assert len(calls) == 6 and calls[0] == 0.5 and len(found.coefficients) == 8
  assert found.coefficients == sorted(found.coefficients) and found.images == found.coefficients
  assert sum(x > 0.5 for x in found.coefficients) > sum(x < 0.5 for x in found.coefficients)  # explores near B
  assert found.chosen[0] == 0 and found.chosen[-1] == 7 and len(found.chosen) == 4


def test_interpolate_cli_dynamic_and_select(tmp_path, tiny_dir, capsys):
  out = tmp_path / "dyn"
  assert cli.main(["interpolate", "--model", str(tiny_dir), "--prompt-a", "a cat", "--prompt-b", "a dog",
                   "--guide-prompt", "a cat driving a car", "--dynamic", "--frames", "3", "--exploration", "4",
                   "--steps", "2", "--clip", "tiny", "--select", "clip", "--out", str(out)]) == 0
  rec = json.loads((out / "interpolation.json").read_text())
  assert len(rec["explored"]["coefficients"]) == 4 and len(rec["coefficients"]) == 3
  assert rec["coefficients"][0] == 0 and rec["coefficients"][-1] == 1
  assert rec["selected"]["frame"] == "frame_01.png" and len(rec["selected"]["clip_t"]) == 1
  assert (out / "selected.png").is_file() and Image.open(out / "interpolation.gif").n_frames == 3


def test_evaluate_interpolation_scores_resumes_and_refuses_changes(tmp_path, tiny_dir, capsys):
  pairs = tmp_path / "pairs.txt"
  pairs.write_text("a photo of a cat\ta photo of a dog\ta cat in a hat\n"
                   + json.dumps({"id": "sea", "prompt_a": "a beach", "prompt_b": "a forest", "seed": 2}) + "\n")
  out = tmp_path / "ev"
  argv = ["evaluate", "interpolation", "--model", str(tiny_dir), "--pairs", str(pairs), "--frames", "3",
          "--methods", "text,aid_outer,paid", "--clip", "tiny", "--lpips-backbone", "tiny", "--steps", "2", "--out",
          str(out)]
  assert cli.main(argv) == 0
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["pairs"] == 2 and last["rows"] == 5  # paid only where a guide prompt is given
  import csv
  rows = list(csv.DictReader((out / "scores.csv").open()))
  assert {(r["pair"], r["method"]) for r in rows} == {("pair001", "text"), ("pair001", "aid_outer"),
                                                      ("pair001", "paid"), ("sea", "text"), ("sea", "aid_outer")}
  for r in rows:
    assert 0 < float(r["smoothness"]) <= 1 and float(r["consistency"]) > 0 and float(r["max_lpips"]) >= float(
        r["consistency"]) and 0 <= float(r["clip_fidelity"]) <= 2.5
  text = {r["pair"]: r for r in rows if r["method"] == "text"}
  outer = {r["pair"]: r for r in rows if r["method"] == "aid_outer"}
  assert text["sea"]["consistency"] != outer["sea"]["consistency"]  # the attention interpolation changes frames
  assert "| AID-O |" in (out / "summary.md").read_text() and np.asarray(Image.open(out / "chart.png")).std() > 0
  stamp = (out / "sea__text_frame_01.png").stat().st_mtime_ns
  assert cli.main(argv) == 0  # resume: scored again from the frames on disk, nothing regenerated
  assert (out / "sea__text_frame_01.png").stat().st_mtime_ns == stamp
  again = {(r["pair"], r["method"]): r for r in csv.DictReader((out / "scores.csv").open())}
  assert again[("sea", "text")]["consistency"] == text["sea"]["consistency"]
  capsys.readouterr()
  assert cli.main(argv[:-4] + ["--steps", "3", "--out", str(out)]) == 2
  assert "options.steps: 2 -> 3" in capsys.readouterr().err
