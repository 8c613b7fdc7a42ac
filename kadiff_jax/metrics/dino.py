"""DINO score (spec section 8): cosine of DINO ViT-S/16 CLS features, with our Flax ViT.

Preprocessing as the DreamBooth evaluation: shortest side to 256 (bicubic),
centre crop 224, ImageNet mean/std.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.metrics import rgb_images
from kadiff_jax.models import clip_vision, vit
from kadiff_jax.weights import convert, files

DEFAULT_DINO = "facebook/dino-vits16"


class DINOScorer:
  """DINO CLS similarity with a ViTModel folder, a Hub id, or "tiny" (a random one, made on first use)."""

  def __init__(self, model: str = DEFAULT_DINO, resize: int = 256):
    from kadiff_jax.tiny_model import tiny_part
    folder = tiny_part("dino") if model == "tiny" else files.resolve_model(model)
    self.config = vit.ViTConfig.from_transformers(files.read_json(folder / "config.json"))
    state, _ = files.read_state_dict(folder)
    self.params = convert.torch_to_params(state, vit.init_shapes(self.config), component=f"DINO ViT {model}",
                                          renames=[(r"^vit\.", "")], ignore=[r"^pooler\."])
    self.resize = resize * self.config.image_size // 224  # 256 for 224, kept proportional for other sizes
    cfg = self.config
    self._cls = jax.jit(lambda p, px: vit.encode(p, px, config=cfg)[:, 0].astype(jnp.float32))

  def pixels(self, images) -> np.ndarray:
    """Paths, PIL images or uint8 arrays -> [N, 224, 224, 3] DINO pixels."""
    return np.stack([clip_vision.preprocess(im, self.resize, vit.IMAGENET_MEAN, vit.IMAGENET_STD,
                                            crop=self.config.image_size) for im in rgb_images(images, "DINO")])

  def features(self, images) -> np.ndarray:
    """Images (paths, PIL or uint8 arrays) -> unit-norm CLS features [N, D]."""
    f = np.asarray(self._cls(self.params, self.pixels(images)))
    return f / np.linalg.norm(f, axis=-1, keepdims=True)

  def score(self, images, references) -> np.ndarray:
    """[N] = cos(DINO(image_i), DINO(reference_i))."""
    if len(images) != len(references):
      raise ValueError(f"DINO: {len(images)} images but {len(references)} references")
    return (self.features(images) * self.features(references)).sum(-1)
