"""Automatic concept masks: attention capture against diffusers, token alignment, Otsu, and the job path."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from conftest import max_rel_err, nchw, nhwc
from kadiff_jax import image_io
from kadiff_jax.job import Job
from kadiff_jax.kadiff import concept_mask as CM
from kadiff_jax.kadiff import jobs as kjobs
from kadiff_jax.kadiff import reference as R
from kadiff_jax.kadiff.options import KADiffOptions
from kadiff_jax.models import unet
from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
from kadiff_jax.weights.ip_adapter import load_ip_adapter
from test_unet import _inputs, _torch_unet


class _Recorder(AttnProcessor):
  """diffusers' plain processor that also keeps the head-mean attention probabilities."""

  def __init__(self, store, name):
    super().__init__()
    self.store, self.name = store, name

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
    q = attn.head_to_batch_dim(attn.to_q(hidden_states))
    k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
    probs = attn.get_attention_scores(q, k, None)  # [B * heads, Lq, T]
    b = hidden_states.shape[0]
    self.store[self.name] = probs.reshape(b, attn.heads, *probs.shape[1:]).mean(1).numpy()
    return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_cross_attention_maps_match_diffusers_and_leave_output_unchanged():
  cfg = unet.tiny_sdxl()
  tm, params = _torch_unet(cfg)
  x, ehs, te, tid = _inputs(cfg, batch=2, size=8, seq=7)
  store: dict = {}
  procs = {name: (_Recorder(store, name[:-len(".processor")]) if ".attn2." in name else AttnProcessor())
           for name in tm.attn_processors}
  tm.set_attn_processor(procs)
  t = np.array([500.0, 500.0], np.float32)
  with torch.no_grad():
    ref = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ehs),
             added_cond_kwargs={"text_embeds": torch.tensor(te), "time_ids": torch.tensor(tid)}).sample.numpy()
  cond = unet.UNetCond(jnp.asarray(ehs), jnp.asarray(te), jnp.asarray(tid))
  hook = CM.CrossAttentionMaps(CM.mask_selector("*"))
  plain, _ = unet.apply(params, jnp.asarray(nhwc(x)), jnp.asarray(t), cond, config=cfg)
  out, aux = unet.apply(params, jnp.asarray(nhwc(x)), jnp.asarray(t), cond, config=cfg, hooks=(hook,))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))  # capture changes nothing
  assert max_rel_err(nchw(out), ref) < 1e-4
  maps = {k.split("/")[0]: v for k, v in aux.items() if k.endswith("cross_attention_maps.probs")}
  assert set(maps) == set(store) and len(maps) == sum(s.kind == "cross" for s in unet.attention_sites(cfg).values())
  for path, ours in maps.items():
    want = store[path][1::2]  # the hook reports the cond row of each [uncond, cond] pair
    assert ours.shape[0] == 1 and ours.shape[1] * ours.shape[2] == want.shape[1]
    np.testing.assert_allclose(np.asarray(ours).reshape(want.shape), want, atol=2e-6)
  agg = np.asarray(CM.aggregate_layers(aux))
  assert agg.shape == (1, 4, 4, 7)
  np.testing.assert_allclose(agg.sum(-1), 1.0, atol=1e-5)  # bilinear resizing keeps each pixel a distribution
  with pytest.raises(ValueError, match="matches no attn2 layer"):
    CM.aggregate_layers({})


def test_subject_positions(tiny_models):
  tok = tiny_models.tokenizer
  prompt = "A photo of a corgi dog, on the beach"
  ids = tok(prompt)["input_ids"]
  positions, words = CM.subject_positions(tok, prompt)
  assert words == ["corgi", "dog", "beach"]
  want = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
  assert [ids[p] for p in positions] == [t for w in want for t in w]
  positions, words = CM.subject_positions(tok, prompt, ["Dog"])
  assert words == ["dog"] and [ids[p] for p in positions] == want[1]
  with pytest.raises(ValueError, match=r"mask words \['cat'\] do not occur"):
    CM.subject_positions(tok, prompt, ["cat"])
  with pytest.raises(ValueError, match="no subject word"):
    CM.subject_positions(tok, "a photo of the")
  long = "a photo of " + "red " * 100 + "dog"  # the subject word falls past the 77-token context
  positions, words = CM.subject_positions(tok, long)
  assert words == ["red"] and max(positions) <= 75


def _otsu_brute_force(values, bins=256):
  """Between-class variance for every histogram split, computed directly from the values."""
  edges = np.linspace(0, 1, bins + 1)
  centres = (np.floor(np.clip(values, 0, 1 - 1e-12) * bins) + 0.5) / bins  # each value at its bin centre
  best, best_t = -1.0, None
  for t in edges[1:-1]:
    lo, hi = centres[centres < t], centres[centres >= t]
    if len(lo) == 0 or len(hi) == 0:
      continue
    w0, w1 = len(lo) / len(centres), len(hi) / len(centres)
    v = w0 * w1 * (lo.mean() - hi.mean()) ** 2
    if v > best + 1e-15:
      best, best_t = v, t
  return best_t


def test_otsu_threshold_matches_brute_force():
  rng = np.random.default_rng(0)
  for k in range(5):
    a = np.concatenate([rng.normal(0.2 + 0.05 * k, 0.05, 500), rng.normal(0.7, 0.08, 300 + 100 * k)]).clip(0, 1)
    assert CM.otsu_threshold(a) == pytest.approx(_otsu_brute_force(a), abs=1e-12)
    assert 0.3 < CM.otsu_threshold(a) < 0.65


def test_concept_mask_from_a_synthetic_attention_map(tiny_models):
  tok = tiny_models.tokenizer
  prompt = "a photo of a dog"
  (pos,), _ = CM.subject_positions(tok, prompt)
  attn = np.full((8, 8, 77), 0.01, np.float32)
  attn[2:6, 1:4, pos] = 0.5  # the subject token attends to a block
  cm = CM.concept_mask(attn, tok, prompt, 64)
  assert cm.mask.shape == (64, 64) and cm.heatmap.min() >= 0 and cm.heatmap.max() <= 1
  assert cm.mask[16:48, 8:32].mean() > 0.9 and cm.mask[:, 40:].sum() == 0  # the block, upsampled
  assert cm.record()["words"] == ["dog"] and cm.record()["source"] == "auto"
  fixed = CM.concept_mask(attn, tok, prompt, 64, threshold=0.99)
  assert fixed.mask.sum() < cm.mask.sum()
  flat = CM.concept_mask(np.full((8, 8, 77), 0.01, np.float32), tok, prompt, 64)
  assert flat.mask.all()  # no structure: the whole reference, with a warning


@pytest.fixture(scope="module")
def adapter(tiny_dir, tiny_models):
  return load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config)


def test_auto_mask_from_inversion_is_deterministic_and_user_mask_wins(tmp_path, tiny_models, adapter):
  ref = tmp_path / "ref.png"
  rng = np.random.default_rng(3)
  image_io.write_png(ref, rng.integers(0, 256, (72, 96, 3)).astype(np.uint8))
  opts = KADiffOptions(steps=4).for_model(tiny_models)
  prep = lambda o, **kw: R.prepare_reference(tiny_models, adapter, str(ref), "a photo of a dog", o, **kw)
  a, b = prep(opts, auto_mask=True), prep(opts, auto_mask=True)
  np.testing.assert_array_equal(a.cross_attention, b.cross_attention)
  assert a.cross_attention.shape == (4, 4, 77)  # the largest attn2 grid of the 64 px tiny model
  np.testing.assert_allclose(a.cross_attention.sum(-1), 1.0, atol=1e-5)
  only_up = prep(KADiffOptions(steps=4, mask_layers="up_blocks.*").for_model(tiny_models), auto_mask=True)
  assert not np.allclose(only_up.cross_attention, a.cross_attention)
  np.testing.assert_array_equal(only_up.latents, a.latents)  # capture never changes the inversion
  plain = prep(opts)  # no automatic mask asked: no maps recorded, and the mask layers are not in its key
  assert plain.cross_attention is None
  np.testing.assert_array_equal(plain.latents, a.latents)
  assert plain.inversion.manifest["cross_attention_layers"] is None
  # with a user mask, a mask layer selection that matches nothing is irrelevant (it used to fail inversion)
  prep(KADiffOptions(steps=4, mask_layers="999").for_model(tiny_models))
  with pytest.raises(ValueError, match="mask_layers '999' matches no cross-attention layer"):
    prep(KADiffOptions(steps=4, mask_layers="999").for_model(tiny_models), auto_mask=True)
  # the cache keeps the maps, and the mask layer selection is part of what a cache is checked against
  path = a.inversion.save(tmp_path / "c")
  np.testing.assert_array_equal(R.load_inversion(path).cross_attention, a.cross_attention)
  with pytest.raises(ValueError, match="cross_attention_layers"):
    R.load_inversion(path, only_up.inversion.manifest)

  auto = Job("j", "a dog", reference=str(ref), ref_prompt="a photo of a dog", mask=kjobs.AUTO_MASK)
  m1, rec1 = kjobs.job_mask(auto, a, tiny_models.tokenizer, opts)
  m2, _ = kjobs.job_mask(auto, b, tiny_models.tokenizer, opts)
  np.testing.assert_array_equal(m1, m2)
  assert m1.shape == (64, 64) and m1.dtype == bool and 0 < m1.mean() < 1
  assert rec1["source"] == "auto" and rec1["words"] == ["dog"]
  user = tmp_path / "user.png"
  image_io.write_png(user, np.zeros((64, 64, 3), np.uint8) + np.uint8(255))
  m3, rec3 = kjobs.job_mask(dataclasses.replace(auto, mask=str(user)), a, tiny_models.tokenizer, opts)
  assert m3.all() and rec3 == {"source": "user", "path": str(user)}
  with pytest.raises(ValueError, match="cross-attention maps"):
    kjobs.job_mask(auto, plain, tiny_models.tokenizer, opts)


def test_generate_cli_with_auto_mask_writes_and_records_it(tmp_path, tiny_dir):
  from kadiff_jax import cli
  ref = tmp_path / "ref.png"
  image_io.write_png(ref, np.random.default_rng(4).integers(0, 256, (64, 64, 3)).astype(np.uint8))
  out = tmp_path / "out"
  argv = ["generate", "--model", str(tiny_dir), "--mode", "kadiff", "--reference", str(ref), "--ref-prompt",
          "a photo of a dog", "--prompt", "a dog in the snow", "--mask", "auto", "--steps", "4",
          "--inject-layers", "up_blocks.*", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
  assert cli.main(argv) == 0
  mask = np.asarray(image_io.load_rgb(out / "seed0_0000_mask.png"))
  assert mask.shape == (64, 64, 3) and set(np.unique(mask)) <= {0, 255}
  meta = image_io.read_png_metadata(out / "seed0_0000.png")
  assert json.loads(meta["mask_source"])["source"] == "auto"
  assert cli.main(argv[:-4] + ["--mask-threshold", "2", "--out", str(out)]) == 2


def test_mask_cli_writes_mask_heatmap_and_iou(tmp_path, tiny_dir, capsys):
  from kadiff_jax import cli
  ref = tmp_path / "ref.png"
  image_io.write_png(ref, np.random.default_rng(6).integers(0, 256, (64, 64, 3)).astype(np.uint8))
  truth = np.zeros((64, 64, 3), np.uint8)
  truth[10:50, 5:40] = 255
  image_io.write_png(tmp_path / "truth.png", truth)
  argv = ["mask", "--model", str(tiny_dir), "--reference", str(ref), "--ref-prompt", "a photo of a dog", "--steps", "4",
          "--out", str(tmp_path / "m.png"), "--compare", str(tmp_path / "truth.png"), "--cache-dir", str(tmp_path / "c")]
  capsys.readouterr()
  assert cli.main(argv) == 0
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  mask = np.asarray(image_io.load_rgb(tmp_path / "m.png"))[..., 0] > 127
  t = truth[..., 0] > 127
  assert rec["iou"] == pytest.approx((mask & t).sum() / (mask | t).sum(), abs=1e-6)
  assert rec["foreground_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
  heat = np.asarray(image_io.load_rgb(tmp_path / "m_heatmap.png"))  # a figure: the overlay and its colour bar
  assert heat.shape[0] > 64 and heat.shape[1] > heat.shape[0] and heat.std() > 0
  assert cli.main(argv[:-2] + ["--mask-words", "cat"]) == 2
  assert "do not occur in ref_prompt" in capsys.readouterr().err
