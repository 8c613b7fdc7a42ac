"""The H-space database of ImageRAGTurbo (HSPACE_SPEC §2-3): text keys, and each entry's retrieved-branch features.

For every corpus entry (any corpus `kadiff retrieve build` reads) it keeps
the entry's caption embedded by the model's own text encoder (the search key,
`text_key.ModelTextKey`), and either the cached retrieved branch
h0_r = f_enc(E(x_r), t = 0, τ(caption)) (`cache="h"`, exact: h0_r depends on
the entry only) or the clean latent E(x_r) alone (`cache="latent"`, about a
fifth of the bytes at 512 px; h0_r is recomputed per query, spec Q11).
Images are centre-cropped to a square and resized to the model's size.

Layout of a database directory, written whole through a sibling temporary
folder (`retrieval.store.atomic_dir`) like a retrieval index:

  manifest.json     format, version, model {source, family, fingerprint}, cache, text key, image size,
                    feature shape and dtype, count, SHA-256 of every other file
  index/            a retrieval index over the caption keys (its own manifest and checksums)
  features.npy      [N, ...] h0_r maps or latents (NHWC), row i belonging to feature_ids.json[i]
  feature_ids.json  docid per row

A database answers only to the model it was built with: another model's
text keys and H-space are a different space, so opening it with another
model (by param fingerprint) is refused, naming both.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import ImageOps
from tqdm.auto import tqdm

from kadiff_jax import sharding
from kadiff_jax.models import unet, vae
from kadiff_jax.pipelines import conditioning
from kadiff_jax.programs import persistent_jit
from kadiff_jax.ragturbo.text_key import ModelTextKey, params_fingerprint
from kadiff_jax.weights.models import DiffusionModels
from retrieval import corpus as corpus_lib
from retrieval import store

FORMAT = "kadiff-hspace-database"
VERSION = 1
CACHES = ("h", "latent")
WHAT = "kadiff H-space database"


class DatabaseError(ValueError):
  """An H-space database is missing, damaged, empty, or was built for another model."""


def model_identity(models: DiffusionModels) -> dict:
  """What a database's features depend on: the text encoder, the UNet's encoder half and the VAE."""
  return {"source": str(models.source), "family": models.family.name,
          "fingerprint": params_fingerprint(models.text_params, models.unet_params, models.vae_params)}


@persistent_jit(static_argnames=("config", "dtype"))
def _latents(vae_params, pixels, *, config, dtype):
  return vae.encode(vae_params, pixels.astype(dtype), config=config, dtype=dtype).astype(jnp.float32)


@persistent_jit(static_argnames=("config", "dtype"))
def retrieved_hspace(unet_params, latents, cond: unet.UNetCond, *, config, dtype):
  """h0_r = f_enc(z0_r, t = 0, τ(p_r)) [B, h, w, C]: the retrieved branch, encoder only (spec §3)."""
  h, _ = unet.encode(unet_params, latents.astype(dtype), jnp.zeros((latents.shape[0],), jnp.float32), cond,
                     config=config, dtype=dtype, implementation=sharding.attention_implementation(dtype))
  return h.astype(jnp.float32)


def hspace_of_latents(models: DiffusionModels, latents: np.ndarray, prompts: Sequence[str], mesh=None) -> np.ndarray:
  """h0_r of clean latents [B, h, w, C] with their own prompts, data-parallel over the mesh."""
  mesh = mesh or sharding.data_mesh()
  n = len(prompts)
  size = latents.shape[1] * models.vae_scale_factor
  text = conditioning.encode_prompts(models, list(prompts))
  cond = sharding.shard_jobs(conditioning.unet_cond(models, text.embeds, text.pooled, size, size), mesh, n)
  dtype = jax.tree_util.tree_leaves(models.unet_params)[0].dtype
  h = retrieved_hspace(sharding.replicate(models.unet_params, mesh),
                       sharding.shard_jobs(jnp.asarray(latents, jnp.float32), mesh, n), cond,
                       config=models.unet_config, dtype=dtype)
  return sharding.to_host(h)[:n]


def entry_pixels(image, size: int) -> np.ndarray:
  """An entry's image centre-cropped to a square, resized to size x size, in [-1, 1] [H, W, 3]."""
  a = np.asarray(ImageOps.fit(image.convert("RGB"), (size, size), method=3), np.float32)  # 3: bicubic
  return a / 127.5 - 1.0


def compute_features(models: DiffusionModels, entries: Sequence[corpus_lib.CorpusEntry], cache: str, size: int, *,
                     batch_size: int = 8, image_cache_dir=None, progress: bool = False, mesh=None) -> np.ndarray:
  """[N, ...] features of `entries`: h0_r maps (`cache="h"`) or clean latents (`"latent"`), batched over the mesh."""
  from retrieval.retriever import load_image
  if cache not in CACHES:
    raise DatabaseError(f"cache={cache!r}: expected one of {CACHES}")
  mesh = mesh or sharding.data_mesh()
  vae_dtype = jax.tree_util.tree_leaves(models.vae_params)[0].dtype
  vae_params = sharding.replicate(models.vae_params, mesh)
  out = []
  for start in tqdm(range(0, len(entries), batch_size), disable=not progress, desc="H-space features",
                    unit="batch"):
    chunk = list(entries[start:start + batch_size])
    n = len(chunk)
    chunk += chunk[-1:] * (min(batch_size, len(entries)) - n)  # the last batch padded: one program shape
    pixels = np.stack([entry_pixels(load_image(e.image, cache_dir=image_cache_dir), size) for e in chunk])
    z = sharding.to_host(_latents(vae_params, sharding.shard_jobs(jnp.asarray(pixels), mesh, len(chunk)),
                                  config=models.vae_config, dtype=vae_dtype))[:len(chunk)]
    if cache == "h":
      z = hspace_of_latents(models, z, [corpus_lib.caption_text(e) for e in chunk], mesh)
    out.append(z[:n].astype(np.float32))
  return np.concatenate(out)


class HSpaceDatabase:
  """Caption keys (a retrieval index) and per-entry features, for one model."""

  def __init__(self, index: store.RetrievalIndex, ids: Sequence[str], features: np.ndarray, manifest: dict):
    self.index, self.manifest = index, manifest
    self.ids, self.features = list(ids), features
    self.row = {d: i for i, d in enumerate(self.ids)}

  @property
  def cache(self) -> str:
    return self.manifest["cache"]

  @property
  def text_key(self) -> str:
    return self.manifest["text_key"]

  def __len__(self) -> int:
    return len(self.ids)

  # --- building and changing ------------------------------------------------------------------------
  @classmethod
  def build(cls, entries: Sequence[corpus_lib.CorpusEntry], models: DiffusionModels, *, cache: str = "h",
            text_key: str = "pooled", size: int | None = None, batch_size: int = 8, backend: str | None = None,
            image_cache_dir=None, progress: bool = False) -> "HSpaceDatabase":
    if cache not in CACHES:
      raise DatabaseError(f"cache={cache!r}: expected one of {CACHES}")
    size = size or models.default_size
    if size <= 0 or size % models.vae_scale_factor:
      raise DatabaseError(f"size={size}: expected a positive multiple of {models.vae_scale_factor}")
    entries = corpus_lib.validate(entries)
    index = store.RetrievalIndex.build(entries, ModelTextKey(models, text_key), backend=backend,
                                       document="caption", progress=progress)
    features = compute_features(models, entries, cache, size, batch_size=batch_size, image_cache_dir=image_cache_dir,
                                progress=progress)
    manifest = {"format": FORMAT, "version": VERSION, "model": model_identity(models), "cache": cache,
                "text_key": text_key, "size": size, "feature_shape": list(features.shape[1:]),
                "feature_dtype": str(features.dtype),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return cls(index, [e.id for e in entries], features, manifest)

  def upsert(self, entries: Sequence[corpus_lib.CorpusEntry], models: DiffusionModels, *, batch_size: int = 8,
             image_cache_dir=None) -> None:
    """Adds new entries and replaces existing ones (same docid)."""
    self.check_model(models)
    entries = corpus_lib.validate(entries, source="upserted entries")
    feats = compute_features(models, entries, self.cache, self.manifest["size"], batch_size=batch_size,
                             image_cache_dir=image_cache_dir)
    self.index.upsert(entries, ModelTextKey(models, self.text_key))
    rows = list(self.features)
    for e, f in zip(entries, feats):
      if e.id in self.row:
        rows[self.row[e.id]] = f
      else:
        self.row[e.id] = len(self.ids)
        self.ids.append(e.id)
        rows.append(f)
    self.features = np.stack(rows) if rows else self.features

  def delete(self, docids: Sequence[str]) -> None:
    self.index.delete(docids)  # refuses unknown or repeated ids
    gone = set(docids)
    keep = [i for i, d in enumerate(self.ids) if d not in gone]
    self.ids = [self.ids[i] for i in keep]
    self.features = self.features[keep]
    self.row = {d: i for i, d in enumerate(self.ids)}

  # --- disk ---------------------------------------------------------------------------------------
  def save(self, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    manifest = dict(self.manifest, count=len(self.ids))

    def fill(tmp: Path) -> None:
      self.index.save(tmp / "index")
      np.save(tmp / "features.npy", np.ascontiguousarray(self.features), allow_pickle=False)
      (tmp / "feature_ids.json").write_text(json.dumps(self.ids))
      manifest["checksums"] = store.checksums(tmp)
      (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks the folder complete

    store.atomic_dir(folder, fill, FORMAT, WHAT)
    self.manifest = manifest
    self.index = store.RetrievalIndex.load(folder / "index", verify=False)  # the saved copy, in its final place
    return folder

  @classmethod
  def load(cls, folder: str | os.PathLike, models: DiffusionModels | None = None, *, backend: str | None = None,
           verify: bool = True) -> "HSpaceDatabase":
    """Opens a database directory; with `models`, refuses one built with another model."""
    folder = Path(folder)
    store.recover(folder, FORMAT)
    try:
      manifest = store.read_manifest(folder, FORMAT, VERSION, "H-space database", "kadiff hspace build")
    except store.StoreError as e:
      raise DatabaseError(str(e)) from None
    for key in ("model", "cache", "text_key", "size", "count", "checksums", "feature_shape"):
      if key not in manifest:
        raise DatabaseError(f"{folder / 'manifest.json'}: field {key!r} is missing")
    if verify:
      bad = store.mismatched_files(folder, manifest)
      if bad:
        raise DatabaseError(f"{folder}: {', '.join(bad[:5])} do not match the manifest's checksums (a damaged, "
                            "half-written or altered database); rebuild it")
    try:
      index = store.RetrievalIndex.load(folder / "index", backend, verify=False)  # covered by our checksums
      features = np.load(folder / "features.npy", allow_pickle=False, mmap_mode="r")
      ids = json.loads((folder / "feature_ids.json").read_text())
    except (OSError, ValueError, store.StoreError) as e:
      raise DatabaseError(f"{folder}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if (len(ids) != manifest["count"] or features.shape[0] != len(ids)
        or list(features.shape[1:]) != manifest["feature_shape"] or sorted(ids) != sorted(index.index.docids)):
      raise DatabaseError(f"{folder}: manifest says {manifest['count']} entries of features "
                          f"{manifest['feature_shape']}; the files hold {len(ids)} ids, features "
                          f"{tuple(features.shape)} and {len(index)} index entries")
    db = cls(index, ids, features, manifest)
    if models is not None:
      db.check_model(models)
    return db

  # --- using --------------------------------------------------------------------------------------
  def check_model(self, models: DiffusionModels) -> None:
    want = self.manifest["model"]
    have = model_identity(models)
    if have["fingerprint"] != want["fingerprint"]:
      raise DatabaseError(f"this H-space database was built with model {want['source']} ({want['family']}, "
                          f"fingerprint {want['fingerprint']}); the loaded model {have['source']} "
                          f"({have['family']}) has fingerprint {have['fingerprint']}: its text keys and H-space "
                          "differ. Build a database with this model (`kadiff hspace build`)")

  def check_k(self, k: int) -> None:
    """Fails unless k neighbours can be found (an empty database, or k above its size)."""
    if len(self) == 0:
      raise DatabaseError("the H-space database is empty: add entries with `kadiff hspace upsert`")
    if k < 1 or k > len(self):
      raise DatabaseError(f"k={k}: expected 1 to {len(self)} (the database holds {len(self)} entries)")

  def search(self, query_vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Top-k (docid, cosine) per query vector."""
    self.check_k(k)
    return self.index.search(np.asarray(query_vectors, np.float32), k)

  def hspace(self, models: DiffusionModels, docids: Sequence[str], mesh=None) -> np.ndarray:
    """h0_r [n, h, w, C] of entries: read from the cache, or computed from their latents and captions."""
    feats = np.stack([np.asarray(self.features[self.row[d]], np.float32) for d in docids])
    if self.cache == "h":
      return feats
    captions = [corpus_lib.caption_text(e) for e in self.entries(docids)]
    return hspace_of_latents(models, feats, captions, mesh)

  def entries(self, docids: Sequence[str]) -> list[corpus_lib.CorpusEntry]:
    found = self.index.entries(docids)
    return [found[d] for d in docids]
