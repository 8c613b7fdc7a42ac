"""CLIP-T, CLIP-I and DINO with our Flax encoders against transformers on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kadiff_jax.metrics.clip_score import CLIPScorer
from kadiff_jax.metrics.dino import DINOScorer


def _images(n, seed):
  rng = np.random.default_rng(seed)
  sizes = [(64, 64), (80, 50), (45, 90), (300, 200)]
  return [Image.fromarray(rng.integers(0, 255, (sizes[i % 4][1], sizes[i % 4][0], 3), np.uint8)) for i in range(n)]


def test_clip_t_and_clip_i_match_transformers(tiny_clip):
  from transformers import CLIPImageProcessor, CLIPTokenizer
  folder, model = tiny_clip
  ours = CLIPScorer(str(folder))
  images, refs = _images(4, 0), _images(4, 1)
  prompts = ["a photo of a dog", "a cat in the snow", "", "a " * 100]  # empty and truncated prompts too
  proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
  tok = CLIPTokenizer.from_pretrained(folder)
  with torch.no_grad():
    img = lambda ims: model.get_image_features(**proc(images=ims, return_tensors="pt"))
    txt = model.get_text_features(**tok(prompts, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt"))
    unit = lambda x: torch.nn.functional.normalize(getattr(x, "pooler_output", x), dim=-1)
    gi, ri, t = unit(img(images)), unit(img(refs)), unit(txt)
  want_t = (2.5 * torch.clamp((gi * t).sum(-1), min=0)).numpy()
  want_i = (gi * ri).sum(-1).numpy()
  np.testing.assert_allclose(ours.clip_t(images, prompts), want_t, atol=2e-5)
  np.testing.assert_allclose(ours.clip_i(images, refs), want_i, atol=2e-5)
  assert np.any(want_t > 0)  # the clamp is not all there is
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    ours.clip_t(images[:2], prompts[:1])


def test_dino_matches_transformers(tiny_dino):
  from transformers import CLIPImageProcessor
  folder, model = tiny_dino
  ours = DINOScorer(str(folder))
  images, refs = _images(3, 2), _images(3, 3)
  # Spec section 8: shortest side 256 (bicubic), centre crop 224, ImageNet mean/std.
  proc = CLIPImageProcessor(size={"shortest_edge": 256}, crop_size=224, image_mean=[0.485, 0.456, 0.406],
                            image_std=[0.229, 0.224, 0.225])
  with torch.no_grad():
    cls = lambda ims: torch.nn.functional.normalize(
        model(**proc(images=ims, return_tensors="pt")).last_hidden_state[:, 0], dim=-1)
    want = (cls(images) * cls(refs)).sum(-1).numpy()
  np.testing.assert_allclose(ours.score(images, refs), want, atol=2e-5)
  np.testing.assert_allclose(ours.pixels(images[:1])[0], proc(images=images[:1], return_tensors="np")
                             ["pixel_values"][0].transpose(1, 2, 0), atol=1e-5)


def test_unreadable_images_are_named(tmp_path, tiny_clip, tiny_dino):
  clip, dino = CLIPScorer(str(tiny_clip[0])), DINOScorer(str(tiny_dino[0]))
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  good = _images(1, 4)[0]
  with pytest.raises(ValueError, match=r"CLIP: cannot read .*broken\.png"):
    clip.clip_i([bad], [good])
  with pytest.raises(ValueError, match=r"DINO: cannot read .*missing\.png.*does not exist"):
    dino.score([tmp_path / "missing.png"], [good])
  with pytest.raises(ValueError, match=r"image 0 is a float32 array of shape \(8, 8, 3\)"):
    clip.image_embeds([np.zeros((8, 8, 3), np.float32)])
  # paths, arrays and PIL images of other modes are all read the same way
  good.save(tmp_path / "good.png")
  grey = good.convert("L")
  np.testing.assert_allclose(clip.image_embeds([tmp_path / "good.png", np.asarray(good)]),
                             clip.image_embeds([good, good]), atol=1e-6)
  np.testing.assert_allclose(dino.features([grey]), dino.features([grey.convert("RGB")]), atol=1e-6)


def test_tiny_metric_models_load_in_transformers_and_match_it():
  """`--clip tiny` / `--dino tiny` write real transformers folders (strict loads) that our scorers read."""
  import torch
  from transformers import CLIPModel, ViTModel
  from kadiff_jax.tiny_model import tiny_part
  clip, dino = CLIPScorer("tiny"), DINOScorer("tiny")
  images = list((np.random.default_rng(3).random((2, 40, 48, 3)) * 255).astype(np.uint8))
  ref_clip, info = CLIPModel.from_pretrained(tiny_part("clip"), output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  ref_dino, info = ViTModel.from_pretrained(tiny_part("dino"), output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    e = ref_clip.get_image_features(pixel_values=torch.tensor(clip.pixels(images)).permute(0, 3, 1, 2))
    e = getattr(e, "pooler_output", e)
    t = ref_clip.get_text_features(input_ids=torch.tensor(clip.tokenizer(
        ["a dog", "a red can"], padding="max_length", max_length=77, return_tensors="np")["input_ids"]))
    t = getattr(t, "pooler_output", t)
    f = ref_dino(pixel_values=torch.tensor(dino.pixels(images)).permute(0, 3, 1, 2)).last_hidden_state[:, 0]
  unit = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()
  np.testing.assert_allclose(clip.image_embeds(images), unit(e), atol=1e-5)
  np.testing.assert_allclose(clip.text_embeds(["a dog", "a red can"]), unit(t), atol=1e-5)
  np.testing.assert_allclose(dino.features(images), unit(f), atol=1e-5)
