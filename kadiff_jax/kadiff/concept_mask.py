"""Automatic concept masks from the reference's own inversion (no external segmenter).

During DDIM inversion a hook records, for the cond row, the text cross-attention
probabilities of every selected attn2 layer (head-averaged). They are resized
(bilinear) to the largest selected resolution, averaged over layers and
steps, and stored in the reference cache as one [r, r, 77] map per token.
The concept mask is then

    m = sum over the subject tokens of the ref_prompt of that map,
    min-max normalised to [0, 1], resized bilinearly to the generation size,
    thresholded with Otsu's rule (or a fixed fraction).

Subject tokens default to the ref_prompt's words minus a short list of
function and framing words ("a", "photo", "of", ...); `words` picks them by
hand. A user mask always takes precedence over this one (see `jobs.run`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.kadiff.correspondence import resize_bilinear
from kadiff_jax.models.attention import AttentionCall, AttentionSite, LayerSelector, parse_layers

log = logging.getLogger(__name__)

FRAMING_WORDS = frozenset(
    "a an the of in on at with and or to for by from its it this that is are photo photograph picture image "
    "close up closeup view shot high quality best".split())


@dataclasses.dataclass(frozen=True)
class CrossAttentionMaps:
  """Attention hook: reports the cond row's text cross-attention probabilities, head-averaged.

  `rows` is the number of UNet rows per image; the cond row is the last of
  each group (inversion: [uncond, cond]). Output is unchanged.
  """

  selector: LayerSelector = LayerSelector("cross", patterns=("*",))
  rows: int = 2
  name: str = "cross_attention_maps"
  needs_args = False

  def selects(self, site: AttentionSite) -> bool:
    return self.selector.selects(site)

  def __call__(self, call: AttentionCall, attend, args):
    out = attend(call.q, call.k, call.v)
    q = call.q[self.rows - 1::self.rows].astype(jnp.float32)
    k = call.k[self.rows - 1::self.rows].astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1).mean(axis=1)  # [B, Lq, T]
    h, w = call.spatial
    return out, {"probs": probs.reshape(probs.shape[0], h, w, probs.shape[-1])}


def mask_selector(spec: str) -> LayerSelector:
  """Cross-attention layers to aggregate: "*" (all), flat numbers, or module-path globs."""
  return parse_layers(spec, kind="cross")


def aggregate_layers(aux: dict[str, jax.Array]) -> jax.Array:
  """Mean over the reported layers of their maps resized to the largest one: [B, r, r, T]."""
  maps = [v for key, v in sorted(aux.items()) if key.endswith(f"/{CrossAttentionMaps.name}.probs")]
  if not maps:
    raise ValueError("no cross-attention maps were reported: the mask layer selection matches no attn2 layer")
  r = max(m.shape[1] for m in maps)
  resize = jax.vmap(lambda m: resize_bilinear(m, r))
  return sum(resize(m) for m in maps) / len(maps)


def subject_positions(tokenizer, prompt: str, words: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
  """Token positions (in the 77-token sequence) of the subject words of `prompt`, and those words.

  CLIP's BPE works word by word, so the prompt's ids are the concatenation of
  each word's ids after the start token; positions past the context are dropped.
  """
  prompt_words = [w for w in re.findall(r"[\w'-]+|[^\w\s]+", prompt.lower()) if w.strip()]
  pieces = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in prompt_words]
  full = tokenizer(prompt.lower(), add_special_tokens=False)["input_ids"]
  if [t for p in pieces for t in p] != list(full):
    raise ValueError(f"cannot align the words of ref_prompt {prompt!r} with its tokens")
  wanted = ([w.lower() for w in words] if words else [w for w in prompt_words
                                                       if w not in FRAMING_WORDS and re.match(r"\w", w)])
  if words:
    missing = [w for w in wanted if w not in prompt_words]
    if missing:
      raise ValueError(f"mask words {missing} do not occur in ref_prompt {prompt!r}")
  limit = tokenizer.model_max_length - 1  # the last slot holds the end token
  positions, used, pos = [], [], 1
  for w, p in zip(prompt_words, pieces):
    if w in wanted:
      span = [i for i in range(pos, pos + len(p)) if i < limit]
      if span:
        positions.extend(span)
        used += [w] if w not in used else []
    pos += len(p)
  if not positions:
    raise ValueError(f"ref_prompt {prompt!r} has no subject word to build a mask from (give mask words)")
  return positions, used


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold of values in [0, 1]: maximises the between-class variance of the histogram."""
  hist, edges = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0.0, 1.0))
  p = hist.astype(np.float64) / max(hist.sum(), 1)
  centres = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(p)
  mu0 = np.cumsum(p * centres)
  mu_t = mu0[-1]
  w1 = 1.0 - w0
  with np.errstate(divide="ignore", invalid="ignore"):
    between = (mu_t * w0 - mu0) ** 2 / (w0 * w1)
  between = np.where((w0 > 0) & (w1 > 0), between, -1.0)
  return float(edges[int(np.argmax(between)) + 1])  # values >= this upper edge are foreground


@dataclasses.dataclass(frozen=True)
class ConceptMask:
  mask: np.ndarray       # [size, size] bool
  heatmap: np.ndarray    # [size, size] float32 in [0, 1]
  threshold: float
  words: tuple[str, ...]
  positions: tuple[int, ...]

  def record(self) -> dict:
    return {"source": "auto", "words": list(self.words), "token_positions": list(self.positions),
            "threshold": round(self.threshold, 6), "foreground_fraction": round(float(self.mask.mean()), 6)}


def concept_heatmap(cross_attention: np.ndarray, positions: Sequence[int], size: int) -> np.ndarray:
  """Subject tokens' summed map, normalised to [0, 1] and resized to size x size: [size, size]."""
  m = np.asarray(cross_attention, np.float64)[..., list(positions)].sum(-1)
  lo, hi = m.min(), m.max()
  m = (m - lo) / (hi - lo) if hi > lo else np.ones_like(m)
  return np.asarray(resize_bilinear(jnp.asarray(m, jnp.float32)[..., None], size))[..., 0].clip(0, 1)


def concept_mask(cross_attention: np.ndarray, tokenizer, ref_prompt: str, size: int,
                 words: Sequence[str] | None = None, threshold: str | float = "otsu") -> ConceptMask:
  """The automatic mask from a cache's cross-attention maps [r, r, T] (see the module docstring)."""
  positions, used = subject_positions(tokenizer, ref_prompt, words)
  heat = concept_heatmap(cross_attention, positions, size)
  if threshold == "otsu":
    t = otsu_threshold(heat) if heat.max() > heat.min() else 0.0
  else:
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
      raise ValueError(f"mask threshold {threshold!r}: expected 'otsu' or a number in [0, 1]")
  mask = heat >= t
  if mask.all():
    log.warning("automatic mask for %r covers the whole reference (flat attention map)", ref_prompt)
  return ConceptMask(mask, heat.astype(np.float32), t, tuple(used), tuple(positions))
