"""The search key of ImageRAGTurbo: a prompt's vector from the diffusion model's own text encoder (spec Q4).

The paper searches "in the text-feature space of SD's own text encoder", so
the query costs no extra encoder. Choice Q4: `pooled` (default) is the
final-normed hidden state at the EOS token (CLIPTextModel's pooler output),
`mean` the mean of the final-normed states over the prompt's tokens up to
and including EOS; either is L2-normalised, so dot products are the cosines
λ of Eq. 5. It follows the retrieval `Embedder` protocol (id, fingerprint,
dim, encode), so an H-space database is an ordinary retrieval index over it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.models import clip_text
from kadiff_jax.pipelines import conditioning
from kadiff_jax.programs import persistent_jit
from kadiff_jax.weights.models import DiffusionModels

TEXT_KEYS = ("pooled", "mean")


def params_fingerprint(*trees) -> str:
  """A content fingerprint of param trees: every leaf's path, shape and a strided sample of up to 4096 of its
  values (taken where the leaf lives, so only the sample is copied) rounded to bf16, so the same checkpoint loaded
  in fp32 or bf16 agrees. Cheap on billions of weights; two different checkpoints agree on it only by design."""
  h = hashlib.sha256()
  for tree in trees:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      flat = leaf.reshape(-1)
      sample = np.asarray(flat[::max(1, flat.size // 4096)]).astype(jnp.bfloat16)
      h.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|".encode())
      h.update(sample.tobytes())
  return h.hexdigest()[:20]


@persistent_jit(static_argnames=("config", "key"))
def _text_keys(params, ids, *, config, key):
  out = clip_text.encode(params, ids, config=config, dtype=jax.tree_util.tree_leaves(params)[0].dtype)
  if key == "pooled":
    v = out.pooled.astype(jnp.float32)
  else:
    eos = (jnp.argmax(ids, axis=-1) if config.eos_token_id == 2 else jnp.argmax(ids == config.eos_token_id, axis=-1))
    keep = (jnp.arange(ids.shape[1])[None] <= eos[:, None]).astype(jnp.float32)
    v = jnp.sum(out.last_hidden_state.astype(jnp.float32) * keep[..., None], 1) / jnp.sum(keep, 1, keepdims=True)
  return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class ModelTextKey:
  """Unit text keys [N, D] from the model's (first) text encoder; an Embedder for `retrieval.store`."""

  def __init__(self, models: DiffusionModels, key: str = "pooled"):
    if key not in TEXT_KEYS:
      raise ValueError(f"text key {key!r}: expected one of {TEXT_KEYS}")
    self.models, self.key = models, key
    self.dim = models.text_config.hidden_size
    self.id = f"{models.family.name}-text-encoder:{key}"
    self.fingerprint = params_fingerprint(models.text_params) + f":{key}"

  def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    texts = list(texts)
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    out = []
    for start in range(0, len(texts), batch_size):
      chunk = texts[start:start + batch_size]
      rows = min(batch_size, 1 << (len(chunk) - 1).bit_length())  # few program shapes: powers of two
      ids = conditioning.tokenize(self.models.tokenizer, chunk + [""] * (rows - len(chunk)))
      v = _text_keys(self.models.text_params, ids, config=self.models.text_config, key=self.key)
      out.append(np.asarray(v)[:len(chunk)])
    return np.concatenate(out)
