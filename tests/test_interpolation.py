"""Attention interpolation (AID / PAID): slerp and lerp, our batched frames against the release's one call per
middle (`paid_release.py`, written from PAID_SPEC.md over diffusers' SDXL pipeline), the Beta prior, the CLI."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import paid_release
from conftest import max_rel_err, nchw, nhwc, tiny_ip_pipe
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


SLOW = pytest.mark.slow  # the other variants' formulas are also checked in NumPy in the default suite


@pytest.mark.parametrize("variant,guide,init", [("fused_outer", None, "linear"),
                                                pytest.param("fused_inner", None, "slerp", marks=SLOW),
                                                pytest.param("outer", None, "linear", marks=SLOW),
                                                pytest.param("inner", None, "linear", marks=SLOW),
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
  assert np.abs(ours.latents[1] - ours.latents[0]).max() > 1e-2
  assert np.abs(ours.latents[2] - ours.latents[1]).max() > 1e-3


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


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
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


@pytest.fixture(scope="module")
def ip_release_pipe(tiny_dir):
  return tiny_ip_pipe(tiny_dir)


def _picture(seed):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 40, 3)).astype(np.uint8))


@pytest.mark.parametrize("mode,variant,with_a", [("morph", "fused_outer", True),
                                                 pytest.param("morph", "fused_inner", True, marks=pytest.mark.slow),
                                                 ("morph", "fused_outer", False),
                                                 ("scale-control", "fused_outer", False)])
def test_image_modes_equal_the_release(tiny_dir, tiny_models, ip_release_pipe, mode, variant, with_a):
  from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
  from kadiff_jax.weights.ip_adapter import load_ip_adapter
  adapter = load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config)
  z = _endpoints()
  image_a, image_b = (_picture(1) if with_a else None), _picture(2)
  prompts = ("a photo of a cat", "a photo of a cat" if mode == "scale-control" else "a dog in the snow")
  ours = interpolate(tiny_models, *prompts, [0.4], InterpolationOptions(steps=6, variant=variant),
                     init_latents=nhwc(z), mode=mode, adapter=adapter, image_a=image_a, image_b=image_b)
  lat, img = paid_release.interpolate_single(ip_release_pipe, *prompts, 0.4, torch.tensor(z[:1]),
                                             torch.tensor(z[1:]), steps=6, variant=variant, mode=mode,
                                             image_a=image_a, image_b=image_b)
  for row in range(3):
    assert max_rel_err(nchw(ours.latents[row:row + 1]), lat[row:row + 1]) < 1e-3, row
    assert np.abs(ours.images[row].astype(int) - (img[row] * 255).round().astype(int)).max() <= 1, row
  text = interpolate(tiny_models, *prompts, [0.4], InterpolationOptions(steps=6, variant=variant),
                     init_latents=nhwc(z))
  assert np.abs(text.latents[2] - ours.latents[2]).max() > 1e-2  # B sees its image
  if mode == "scale-control":
    np.testing.assert_allclose(ours.latents[0], text.latents[0], rtol=0, atol=1e-4 * np.abs(text.latents).max())


def test_image_mode_flags_are_checked_before_loading(tmp_path, capsys):
  base = ["interpolate", "--model", str(tmp_path / "absent"), "--prompt-a", "a", "--prompt-b", "b", "--out",
          str(tmp_path / "o")]
  for extra, message in ((["--image-b", "x.png"], "--image-a/--image-b need --mode morph or scale-control"),
                         (["--mode", "morph"], "--mode morph needs --image-b"),
                         (["--mode", "scale-control", "--image-a", "a.png", "--image-b", "b.png"],
                          "--mode scale-control reads --image-b only"),
                         (["--mode", "morph", "--image-b", str(tmp_path / "missing.png")], "missing.png")):
    capsys.readouterr()
    assert cli.main(base + extra) == 2
    assert message in capsys.readouterr().err


def _np_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v per head, [L, heads, d] arrays, in float64."""
  logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("hqk,khd->qhd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("variant", ["fused_outer", "fused_inner", "outer", "inner"])
def test_each_variant_equals_the_spec_formula_in_numpy(variant):
  """Spec 3 transcribed independently: rows [A, M1, M2, B] with c = (0, .3, .7, 1), per row and head."""
  import jax.numpy as jnp
  from kadiff_jax.interpolation.attention import InterpolatedAttention, InterpolationArgs
  from kadiff_jax.models.attention import AttentionCall, AttentionSite, dot_product_attention, run_hooks
  from kadiff_jax.sampling import RowLayout
  rng = np.random.default_rng(11)
  q, k, v = (rng.standard_normal((4, 6, 2, 8)).astype(np.float32) for _ in range(3))
  c = np.array([0.0, 0.3, 0.7, 1.0])
  site = AttentionSite("x.attn1", "self", 1, 0, "up", 16, 2, 0)
  call = AttentionCall(site, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), (2, 3), None, None)
  hook = InterpolatedAttention(RowLayout(("cond",), "cond", group=4), variant)
  active = np.array([True, True, False, True])  # row 2 plain: the flag is per row
  out, _ = run_hooks(call, (hook,), {"interpolation": InterpolationArgs(jnp.asarray(c, jnp.float32),
                                                                        jnp.asarray(active))},
                     lambda a, b, d: dot_product_attention(a, b, d))
  q, k, v = (x.astype(np.float64) for x in (q, k, v))
  for r in range(4):
    if not active[r]:
      want = _np_attention(q[r], k[r], v[r])
    elif variant == "fused_outer":
      want = (1 - c[r]) * _np_attention(q[r], np.concatenate([k[r], k[0]]), np.concatenate([v[r], v[0]])) + \
          c[r] * _np_attention(q[r], np.concatenate([k[r], k[3]]), np.concatenate([v[r], v[3]]))
    elif variant == "outer":
      want = (1 - c[r]) * _np_attention(q[r], k[0], v[0]) + c[r] * _np_attention(q[r], k[3], v[3])
    else:
      kt, vt = (1 - c[r]) * k[0] + c[r] * k[3], (1 - c[r]) * v[0] + c[r] * v[3]
      if variant == "fused_inner":
        kt, vt = np.concatenate([k[r], kt]), np.concatenate([v[r], vt])
      want = _np_attention(q[r], kt, vt)
    np.testing.assert_allclose(np.asarray(out[r]), want, rtol=1e-5, atol=1e-6)


def test_slerp_formula_in_numpy_and_the_warmup_count():
  rng = np.random.default_rng(4)
  a, b = rng.standard_normal((2, 5, 16))
  t = 0.35
  for i in range(5):
    c = a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i])
    th = np.arccos(c)
    want = np.sin(th - th * t) / np.sin(th) * a[i] + np.sin(th * t) / np.sin(th) * b[i]
    np.testing.assert_allclose(np.asarray(blend.slerp(a[i], b[i], t)), want, rtol=1e-5)
  close = a[0] + 1e-3 * b[0]  # |cos| > 0.9995: lerp
  np.testing.assert_allclose(np.asarray(blend.slerp(a[0], close, t)), a[0] + t * (close - a[0]), rtol=1e-6)
  assert InterpolationOptions(steps=50, warmup_ratio=0.58).warmup() == 28  # int(50 * 0.58) = int(28.999...) (Q5)
  assert InterpolationOptions(steps=50, warmup_ratio=0.58, warmup_steps=29).warmup() == 29


def test_batched_middles_equal_separate_calls_and_t_moves_only_middles(tiny_models):
  z = nhwc(_endpoints())
  opts = InterpolationOptions(steps=4)
  both = interpolate(tiny_models, "a cat", "a dog", [0.3, 0.7], opts, init_latents=z)
  for k, t in ((1, 0.3), (2, 0.7)):
    alone = interpolate(tiny_models, "a cat", "a dog", [t], opts, init_latents=z)
    for a, b in ((0, 0), (k, 1), (3, 2)):
      assert max_rel_err(both.latents[a], alone.latents[b]) < 2e-5
  moved = interpolate(tiny_models, "a cat", "a dog", [0.3, 0.5], opts, init_latents=z)
  assert max_rel_err(moved.latents[[0, 1, 3]], both.latents[[0, 1, 3]]) < 2e-5
  assert np.abs(moved.latents[2] - both.latents[2]).max() > 1e-2


@pytest.mark.slow  # three whole commands (~40 s)
def test_paid_morph_and_scale_control_from_the_cli(tmp_path, tiny_dir, capsys):
  ref_a, ref_b = tmp_path / "a.png", tmp_path / "b.png"
  _picture(1).save(ref_a)
  _picture(2).save(ref_b)
  common = ["interpolate", "--model", str(tiny_dir), "--steps", "3", "--coefs", "0.5"]
  runs = {"paid": ["--prompt-a", "a cat", "--prompt-b", "a dog", "--guide-prompt", "a cat driving a car"],
          "morph": ["--prompt-a", "a photo", "--prompt-b", "a photo", "--mode", "morph", "--ip-adapter", "tiny",
                    "--image-a", str(ref_a), "--image-b", str(ref_b)],
          "scale": ["--prompt-a", "a photo", "--prompt-b", "a photo", "--mode", "scale-control", "--ip-adapter",
                    "tiny", "--image-b", str(ref_b)]}
  frames = {}
  for name, extra in runs.items():
    assert cli.main(common + extra + ["--out", str(tmp_path / name)]) == 0, name
    rec = json.loads((tmp_path / name / "interpolation.json").read_text())
    assert rec["mode"] == {"paid": "text", "morph": "morph", "scale": "scale-control"}[name]
    frames[name] = [np.asarray(Image.open(tmp_path / name / f)) for f in rec["frames"]]
  assert not np.array_equal(frames["morph"][0], frames["morph"][2])  # A and B see different images
  assert json.loads((tmp_path / "paid" / "interpolation.json").read_text())["guide_prompt"] == "a cat driving a car"
  # bad input, one line each
  bad = {("--frames", "1"): "--frames 1: expected at least 3",
         ("--mode", "morph", "--guide-prompt", "g", "--image-b", str(ref_b)): "--guide-prompt with --mode morph"}
  for extra, message in bad.items():
    capsys.readouterr()
    argv = ["interpolate", "--model", str(tiny_dir), "--prompt-a", "a", "--prompt-b", "b", *extra, "--out",
            str(tmp_path / "x")]
    assert cli.main(argv) == 2 and message in capsys.readouterr().err
  bare = tmp_path / "bare"  # a model folder with no IP-Adapter of its own
  import shutil
  shutil.copytree(tiny_dir, bare, ignore=shutil.ignore_patterns("ip_adapter"))
  capsys.readouterr()
  assert cli.main(["interpolate", "--model", str(bare), "--prompt-a", "a", "--prompt-b", "b", "--mode", "morph",
                   "--image-b", str(ref_b), "--out", str(tmp_path / "y")]) == 2
  assert "an IP-Adapter needs both ip_adapter (--ip-adapter FILE) and image_encoder" in capsys.readouterr().err


def test_several_interpolations_in_one_batch_equal_each_alone(tiny_models):
  from kadiff_jax.interpolation.pipeline import Request, interpolate_many
  opts = InterpolationOptions(steps=3)
  requests = [Request("a cat", "a dog", seed=1), Request("a beach", "a forest", guide_prompt="a lake", seed=2)]
  both = interpolate_many(tiny_models, requests, [0.5], opts)
  for req, got in zip(requests, both):
    alone = interpolate(tiny_models, req.prompt_a, req.prompt_b, [0.5], opts, guide_prompt=req.guide_prompt,
                        seed=req.seed)
    assert max_rel_err(got.latents, alone.latents) < 2e-5
  assert np.abs(both[0].latents - both[1].latents).max() > 1e-2


@pytest.mark.slow
def test_interpolations_split_over_4_cpu_devices(tmp_path, tiny_dir):
  """Whole frame groups per device: 3 interpolations on 4 devices (one dummy group) equal one device's run."""
  import subprocess
  import sys
  import textwrap
  script = textwrap.dedent(f"""
      import numpy as np, jax
      from kadiff_jax.weights.models import load_models
      from kadiff_jax.interpolation.pipeline import InterpolationOptions, Request, interpolate_many
      m = load_models({str(tiny_dir)!r})
      reqs = [Request("a cat", "a dog", seed=s) for s in range(3)]
      out = interpolate_many(m, reqs, [0.3, 0.6], InterpolationOptions(steps=3))
      np.save({str(tmp_path / "lat.npy")!r}, np.stack([o.latents for o in out]))
      print(len(jax.devices()))
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip().splitlines()[-1] == "4"
  from kadiff_jax.interpolation.pipeline import Request, interpolate_many
  from kadiff_jax.weights.models import load_models
  m = load_models(str(tiny_dir))
  one = interpolate_many(m, [Request("a cat", "a dog", seed=s) for s in range(3)], [0.3, 0.6],
                         InterpolationOptions(steps=3), mesh=__import__("kadiff_jax.sharding").sharding.data_mesh(
                             jax.devices()[:1]))
  assert max_rel_err(np.load(tmp_path / "lat.npy"), np.stack([o.latents for o in one])) < 2e-5
