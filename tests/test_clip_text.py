"""CLIP text encoders vs transformers: every hidden state, pooled, projected; both key namings."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as HFConfig, CLIPTextModel, CLIPTextModelWithProjection

from conftest import max_rel_err
from kadiff_jax.models import clip_text
from kadiff_jax.weights import load


def _hf(cfg: clip_text.CLIPTextConfig, proj: bool, seed=0):
  d = cfg.to_transformers(proj)
  d.pop("architectures"), d.pop("model_type")
  torch.manual_seed(seed)
  hf_cfg = HFConfig(**d)
  return (CLIPTextModelWithProjection if proj else CLIPTextModel)(hf_cfg).eval()


@pytest.mark.parametrize("proj,eos", [(False, 2), (True, 2), (True, 999)])
def test_text_encoder_matches_transformers(tmp_path, proj, eos):
  import dataclasses
  cfg = dataclasses.replace(clip_text.tiny(proj), eos_token_id=eos)
  tm = _hf(cfg, proj)
  tm.save_pretrained(tmp_path)  # transformers 5 naming: CLIPTextModel without the text_model. prefix
  params = load.load_component(tmp_path, load.CLIP_TEXT, lambda: clip_text.init_shapes(cfg), cfg, use_cache=False)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 990, (2, 77)).astype(np.int64)
  ids[:, 0] = 998
  ids[0, 9], ids[1, 30] = 999, 999  # EOS; the argmax (legacy) and first-match rules agree here
  ids[0, 10:] = 0  # padding as tokenizer_2 ('!' = 0) does
  with torch.no_grad():
    ref = tm(torch.tensor(ids), output_hidden_states=True)
  out = clip_text.encode(params, jnp.asarray(ids, jnp.int32), config=cfg)
  assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
  for a, b in zip(out.hidden_states, ref.hidden_states):
    assert max_rel_err(a, b.numpy()) < 1e-5
  assert max_rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) < 1e-5
  if proj:
    assert max_rel_err(out.text_embeds, ref.text_embeds.numpy()) < 1e-5
  else:
    assert max_rel_err(out.pooled, ref.pooler_output.numpy()) < 1e-5


def test_prefixed_names_of_real_sdxl_repos_load(tiny_dir):
  """The tiny model is written with `text_model.` prefixes, as the SDXL repos are."""
  from kadiff_jax.weights import files
  state, _ = files.read_state_dict(tiny_dir / "text_encoder")
  assert all(k.startswith("text_model.") for k in state)
  tm = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder").eval()
  cfg = clip_text.CLIPTextConfig.from_transformers(tm.config.to_dict(), with_projection=False)
  params = load.load_component(tiny_dir / "text_encoder", load.CLIP_TEXT, lambda: clip_text.init_shapes(cfg), cfg,
                               use_cache=False)
  ids = np.arange(77)[None] % 990
  with torch.no_grad():
    ref = tm(torch.tensor(ids), output_hidden_states=True).hidden_states[-2].numpy()
  assert max_rel_err(clip_text.encode(params, jnp.asarray(ids), config=cfg).hidden_states[-2], ref) < 1e-5


@pytest.mark.parametrize("folder", ["tokenizer", "tokenizer_2"])
def test_clip_tokenizer_matches_transformers(tiny_dir, folder):
  """Our tokenizers-only CLIPTokenizer gives transformers' ids: padded batches, truncation, single words."""
  from transformers import CLIPTokenizer as Reference
  from kadiff_jax.clip_tokenizer import CLIPTokenizer
  ref, ours = Reference.from_pretrained(str(tiny_dir / folder)), CLIPTokenizer(tiny_dir / folder)
  texts = ["a photo of a dog", "hello!", "Hello, World!!  tabs\tand\nnewlines", "it's the dog's bowl, isn't it",
           "café naïve ÉCOLE", "123 4567 3.14", "emoji 🐶🎉 and 漢字", "", "<|endoftext|> inside", "x " * 100,
           "a!b!c", "don\u2019t", "monochrome, lowres, bad anatomy, worst quality, low quality"]
  kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ours(texts, **kw)["input_ids"], ref(texts, **kw)["input_ids"])
  for word in ("dog", "hello!", "café", "chow", "'s"):
    assert ours(word, add_special_tokens=False)["input_ids"] == ref(word, add_special_tokens=False)["input_ids"]
  assert ours.model_max_length == ref.model_max_length == 77
  assert ours.decode(ours("a photo of a dog")["input_ids"][1:-1]) == "a photo of a dog"
