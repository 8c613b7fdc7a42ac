"""Reference preparation (spec 4-5): everything KA-Diff needs of a reference, computed once.

`prepare_references` reads each reference image once and returns a
`PreparedReference`: the image, its IP-Adapter tokens, the ref_prompt's
embeddings, and its DDIM inversion, run batched over the mesh on the one
sampler (the image resized and VAE-encoded inside it): the
latent trajectory in denoising order (entry s is what the denoiser sees at
step s; entry 0 is z_T, the last is z0_ref) and the cond-row DIFT features (the
output of `options.dift_block`), also in denoising order (entry s was captured at the
timestep of denoising step s). The inversion's text cross-attention maps are
recorded only when an automatic mask is asked for.

The inversion is cached as one `.npz` per reference that holds its own
manifest (written to a temporary name, then renamed: a reader never sees half
an entry). A cache made for another model, schedule or option set is refused
by name; an unreadable one is inverted again with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from kadiff_jax import image_io, sharding
from kadiff_jax.programs import persistent_jit
from kadiff_jax.records import image_sha256
from kadiff_jax.kadiff import concept_mask
from kadiff_jax.kadiff.options import KADiffOptions, kadiff_scheduler
from kadiff_jax.models import ip_adapter, unet, vae
from kadiff_jax.pipelines import conditioning
from kadiff_jax.progress import step
from kadiff_jax.sampling import CFG, sample
from kadiff_jax.weights.models import DiffusionModels

log = logging.getLogger(__name__)
CACHE_VERSION = 3


def load_mask(path_or_image, size: int, padding: str = "foreground") -> np.ndarray:
  """Q2: grey, fitted into a size x size square keeping aspect, padded (white by default), > 127."""
  im = image_io.load_rgb(path_or_image).convert("L")
  fill = 255 if padding == "foreground" else 0
  im = ImageOps.pad(im, (size, size), color=fill)
  return np.asarray(im) > 127


def reference_pixels(image: Image.Image, size: int) -> np.ndarray:
  """The reference resized to size x size (plain resize, as the reference does) in [-1, 1], [H, W, 3]."""
  a = np.asarray(image.resize((size, size), resample=Image.BICUBIC), np.float32)
  return a / 127.5 - 1.0


def ip_reference(image: Image.Image, size: int) -> Image.Image:
  """What the IP-Adapter sees: the reference resized to half the generation size (plain resize)."""
  return image.resize((size // 2, size // 2), resample=Image.BICUBIC)


@dataclasses.dataclass(frozen=True)
class Inversion:
  """A reference's DDIM inversion: what the cache holds."""

  latents: np.ndarray    # [S + 1, h, w, C] denoising order: [0] = z_T ... [S] = z0_ref
  features: np.ndarray   # [S, H/16, W/16, C_dift] denoising order: [s] captured at timestep t_s
  timesteps: np.ndarray  # [S] denoising-order timesteps
  manifest: dict[str, Any]
  cross_attention: np.ndarray | None = None  # [r, r, T] cond-row text attention, mean over layers and steps

  def save(self, path: str | os.PathLike) -> Path:
    """Writes `path` (.npz added if missing) as one file, atomically: the manifest travels inside."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    extra = {} if self.cross_attention is None else {"cross_attention": self.cross_attention}
    with open(tmp, "wb") as f:
      np.savez(f, latents=self.latents, features=self.features, timesteps=self.timesteps,
               manifest=np.asarray(json.dumps(self.manifest, sort_keys=True)), **extra)
    os.replace(tmp, path)
    return path


def inversion_manifest(models: DiffusionModels, adapter: ip_adapter.IPAdapter, reference_sha: str, ref_prompt: str,
                       options: KADiffOptions, auto_mask: bool) -> dict[str, Any]:
  """What an inversion depends on; loading compares it field by field. The mask layers count only
  when the cross-attention maps are recorded (an automatic mask)."""
  return {"version": CACHE_VERSION, "model": str(models.source), "family": models.family.name,
          "dift_block": options.dift_block,
          "unet": hashlib.sha256(json.dumps(models.unet_config.to_diffusers(), sort_keys=True).encode()).hexdigest()[:16],
          "ip_adapter": adapter.source, "ip_scale": ip_scale(adapter, options), "reference_sha256": reference_sha,
          "ref_prompt": ref_prompt, "steps": options.steps, "size": options.size,
          "scheduler": dataclasses.asdict(kadiff_scheduler().config), "inversion_guidance": options.inversion_guidance,
          "inversion_uncond": options.inversion_uncond, "negative_prompt": options.negative_prompt,
          "cross_attention_layers": options.mask_layers if auto_mask else None}


def load_inversion(path: str | os.PathLike, expected: dict[str, Any] | None = None) -> Inversion:
  """Loads a cached inversion; with `expected` (a manifest), refuses one made differently, naming the fields."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"reference cache {path} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      manifest = json.loads(str(z["manifest"]))
      arrays = {k: z[k] for k in z.files if k != "manifest"}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise CacheUnreadable(f"reference cache {path} is unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(manifest, dict):
    raise CacheUnreadable(f"reference cache {path}: its manifest is not a JSON object")
  if expected is not None:
    diff = {k: (manifest.get(k), v) for k, v in expected.items() if manifest.get(k) != v}
    if diff:
      lines = ", ".join(f"{k}: cache has {a!r}, this run needs {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ValueError(f"reference cache {path} was made for a different setup ({lines}); delete it or use another")
  missing = {"latents", "features", "timesteps"} - set(arrays)
  if missing:
    raise CacheUnreadable(f"reference cache {path} lacks {sorted(missing)}")
  return Inversion(arrays["latents"], arrays["features"], arrays["timesteps"], manifest,
                   arrays.get("cross_attention"))


class CacheUnreadable(ValueError):
  """A cache file that cannot be read (truncated, not an npz, no manifest)."""


@dataclasses.dataclass(frozen=True)
class PreparedReference:
  """One reference, prepared once: what generation, masks and pictures read."""

  path: str                 # where the image came from ("" for an in-memory image)
  image: Image.Image        # RGB, as read
  ref_prompt: str
  embeds: np.ndarray        # [77, D] ref_prompt's sequence embeddings (both SDXL text encoders)
  pooled: np.ndarray        # [P] its pooled embedding
  ip_tokens: np.ndarray     # [N, C] the reference's IP-Adapter image tokens
  ip_uncond: np.ndarray     # [N, C] the adapter's unconditional tokens
  inversion: Inversion

  @property
  def latents(self) -> np.ndarray:
    return self.inversion.latents

  @property
  def features(self) -> np.ndarray:
    return self.inversion.features

  @property
  def timesteps(self) -> np.ndarray:
    return self.inversion.timesteps

  @property
  def cross_attention(self) -> np.ndarray | None:
    return self.inversion.cross_attention


def ip_scale(adapter, options: KADiffOptions) -> float:
  return adapter.default_scale if options.ip_scale is None else float(options.ip_scale)


@persistent_jit(static_argnames=("unet_config", "vae_config", "scheduler", "num_steps", "dtype", "hooks",
                                 "vae_dtype", "cross_attention", "dift_block"))
def _invert(unet_params, vae_params, pixels, cond, guidance, hook_args, *, unet_config, vae_config, scheduler,
            num_steps, dtype, hooks, vae_dtype, cross_attention: bool, dift_block: str):
  """Encodes [B, H, W, 3] and inverts it; returns (latents [B, S+1, ...], features [B, S, ...]) in inversion
  order, and with `cross_attention` the cond rows' text cross-attention maps [B, r, r, T] averaged over
  layers and steps."""
  state = scheduler.set_timesteps(num_steps)
  z0 = vae.encode(vae_params, pixels.astype(vae_dtype), config=vae_config, dtype=vae_dtype).astype(jnp.float32)

  def denoiser(z, t, i, carry):
    eps, aux = unet.apply(unet_params, CFG.broadcast(z), t, cond, config=unet_config, dtype=dtype, hooks=hooks,
                          hook_args=hook_args, capture=(dift_block,),
                          implementation=sharding.attention_implementation(dtype))
    out = {"features": CFG.take(aux[dift_block], "cond")}
    if cross_attention:
      out["cross_attention"] = concept_mask.aggregate_layers(aux)
    return CFG.guide(eps, guidance), carry, out

  _, aux = sample(denoiser, scheduler, state, z0, invert=True, trajectory=True)
  latents = jnp.concatenate([z0[None], aux["x"]], axis=0)  # [S+1, B, ...], inversion order
  attn = aux["cross_attention"].mean(axis=0) if cross_attention else None
  return jnp.moveaxis(latents, 0, 1), jnp.moveaxis(aux["features"], 0, 1), attn


def inversion_conditioning(prepared: Sequence[PreparedReference], models: DiffusionModels, options: KADiffOptions,
                           scale: float):
  """UNet conditioning and IP-Adapter rows for inversion, CFG layout [uncond_i, cond_i] per reference (Q1). Host
  arrays, placed once with the batch (no small device programs run here)."""
  n = len(prepared)
  embeds = np.stack([p.embeds for p in prepared])
  pooled = np.stack([p.pooled for p in prepared])
  tok_c = np.stack([p.ip_tokens for p in prepared])
  if options.inversion_uncond == "reference":  # Q1: cond sequence in both halves, zero pooled for uncond
    neg_embeds, neg_pooled, neg_tokens = embeds, np.zeros_like(pooled), tok_c
  else:
    neg = conditioning.encode_prompts(models, [options.negative_prompt] * n)
    neg_embeds, neg_pooled = np.asarray(neg.embeds), np.asarray(neg.pooled)
    neg_tokens = np.stack([p.ip_uncond for p in prepared])
  cond = conditioning.unet_cond(models, CFG.interleave({"uncond": neg_embeds, "cond": embeds}),
                                CFG.interleave({"uncond": neg_pooled, "cond": pooled}), options.size, options.size)
  rows = ip_adapter.IPAdapterRows(CFG.interleave({"uncond": neg_tokens, "cond": tok_c}),
                                  np.full((CFG.rows * n,), scale, np.float32))
  return cond, rows


def _invert_batch(models, adapter, prepared: list[PreparedReference], options: KADiffOptions, auto_mask: bool,
                  mesh) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
  n = len(prepared)
  cond, rows = inversion_conditioning(prepared, models, options, ip_scale(adapter, options))
  pixels = np.stack([reference_pixels(p.image, options.size) for p in prepared])
  hooks = (ip_adapter.IPAdapterAttention(upcast=models.unet_config.upcast_attention),)
  if auto_mask:
    selector = concept_mask.mask_selector(options.mask_layers)
    selector.select(tuple(unet.attention_sites(models.unet_config).values()), "mask_layers")
    hooks += (concept_mask.CrossAttentionMaps(selector),)
  hook_args = sharding.place_hook_inputs({"ip_adapter": ip_adapter.hook_inputs(adapter, *rows)}, mesh, n, CFG.rows)
  latents, feats, attn = _invert(
      sharding.replicate(models.unet_params, mesh), sharding.replicate(models.vae_params, mesh),
      sharding.shard_jobs(pixels, mesh, n), sharding.shard_jobs(cond, mesh, n, CFG.rows),
      jnp.float32(options.inversion_guidance), hook_args, unet_config=models.unet_config,
      vae_config=models.vae_config, scheduler=kadiff_scheduler(), num_steps=options.steps,
      dtype=jax.tree_util.tree_leaves(models.unet_params)[0].dtype, hooks=hooks,
      vae_dtype=jax.tree_util.tree_leaves(models.vae_params)[0].dtype, cross_attention=auto_mask,
      dift_block=options.dift_block)
  latents, feats = sharding.to_host(latents)[:n], sharding.to_host(feats)[:n]
  attn = sharding.to_host(attn)[:n] if auto_mask else [None] * n
  # inversion order -> denoising order: latents reversed; the feature captured at inversion call k
  # (timestep t_{S-1-k}) belongs to denoising step S-1-k.
  return [(latents[b][::-1].copy(), feats[b][::-1].copy(), attn[b]) for b in range(n)]


def _with_inputs(models, adapter, sources: Sequence[tuple[str, Image.Image, str]],
                 options: KADiffOptions) -> list[PreparedReference]:
  """(path, image, ref_prompt) -> PreparedReference without its inversion: text and image tokens, batched."""
  text = conditioning.encode_prompts(models, [p for _, _, p in sources])
  pixels = ip_adapter.preprocess_references([ip_reference(im, options.size) for _, im, _ in sources], adapter)
  tok_c, tok_u = (np.asarray(a) for a in ip_adapter.image_tokens(adapter, pixels))
  embeds, pooled = np.asarray(text.embeds), np.asarray(text.pooled)
  empty = Inversion(np.zeros(0), np.zeros(0), np.zeros(0), {})
  return [PreparedReference(path, im, prompt, embeds[k], pooled[k], tok_c[k], tok_u[k], empty)
          for k, (path, im, prompt) in enumerate(sources)]


def prepare_references(models: DiffusionModels, adapter: ip_adapter.IPAdapter, requests: Sequence[tuple[Any, str]],
                       options: KADiffOptions, *, auto_mask: bool = False, cache_dir: str | os.PathLike | None = None,
                       mesh=None, batch_size: int | None = None, progress=None) -> list[PreparedReference]:
  """Prepares every (image path or PIL image, ref_prompt) once, in request order (repeats share one).

  Each image is read once. Inversions come from `cache_dir` when it holds a
  matching one; the others run `batch_size` references at a time (default: one
  per device) over the mesh and are saved there. With `auto_mask`, the
  cross-attention maps are recorded too. `progress(k)` is called as k more are done.
  """
  if not requests:
    return []
  options = options.for_model(models)
  mesh = mesh or sharding.data_mesh()
  ident = lambda ref, prompt: (str(ref) if isinstance(ref, (str, os.PathLike)) else id(ref), prompt)
  first: dict[tuple, int] = {}
  sources = []
  for ref, prompt in requests:
    if ident(ref, prompt) not in first:
      first[ident(ref, prompt)] = len(sources)
      sources.append((str(ref) if isinstance(ref, (str, os.PathLike)) else "", image_io.load_rgb(ref), prompt))
  partial = _with_inputs(models, adapter, sources, options)
  manifests = [inversion_manifest(models, adapter, image_sha256(p.image), p.ref_prompt, options, auto_mask)
               for p in partial]
  cache_dir = Path(cache_dir) if cache_dir else None
  paths = [cache_dir / f"ref-{cache_key(m)}.npz" if cache_dir else None for m in manifests]
  inversions: dict[int, Inversion] = {}
  for k, (path, m) in enumerate(zip(paths, manifests)):
    if path is not None and path.is_file():
      try:
        inversions[k] = load_inversion(path, m)
        log.info("reference %s: cache %s", partial[k].path or "<image>", path)
      except CacheUnreadable as e:
        log.warning("%s; inverting it again", e)
  todo = [k for k in range(len(partial)) if k not in inversions]
  timesteps = np.asarray(kadiff_scheduler().set_timesteps(options.steps).timesteps)
  bs = batch_size or mesh.size
  for start in range(0, len(todo), bs):
    chunk = todo[start:start + bs]
    with step("inverting %d reference(s) (%d DDIM steps%s)", len(chunk), options.steps,
              ", recording cross-attention" if auto_mask else ""):
      results = _invert_batch(models, adapter, [partial[k] for k in chunk], options, auto_mask, mesh)
    for k, (lat, feat, attn) in zip(chunk, results):
      inversions[k] = Inversion(lat, feat, timesteps, {**manifests[k], "reference_path": partial[k].path}, attn)
      if paths[k] is not None and sharding.is_writer():
        inversions[k].save(paths[k])
    if progress is not None:
      progress(len(chunk))
  done = [dataclasses.replace(p, inversion=inversions[k]) for k, p in enumerate(partial)]
  return [done[first[ident(ref, prompt)]] for ref, prompt in requests]


def cache_key(manifest: dict) -> str:
  """The cache file name's key: a hash of what the inversion depends on."""
  return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


def prepare_reference(models, adapter, reference, ref_prompt: str, options: KADiffOptions = KADiffOptions(),
                      **kwargs) -> PreparedReference:
  """`prepare_references` for one (image, ref_prompt)."""
  return prepare_references(models, adapter, [(reference, ref_prompt)], options, **kwargs)[0]


def from_cache_file(models, adapter, path: str | os.PathLike, options: KADiffOptions) -> PreparedReference:
  """A reference prepared from a `kadiff invert` output: the image it names (checked by content), its
  ref_prompt, and the stored inversion (checked against this run's model and options)."""
  options = options.for_model(models)
  inv = load_inversion(path)
  image_path, ref_prompt = inv.manifest.get("reference_path"), inv.manifest.get("ref_prompt")
  if not image_path or ref_prompt is None:
    raise ValueError(f"reference cache {path} names no reference image or ref_prompt")
  image = image_io.load_rgb(image_path)
  layers = inv.manifest.get("cross_attention_layers")
  expected = inversion_manifest(models, adapter, image_sha256(image), ref_prompt,
                                dataclasses.replace(options, mask_layers=layers or options.mask_layers),
                                layers is not None)
  load_inversion(path, expected)  # refuses another model, schedule, option set or image, by field
  return dataclasses.replace(_with_inputs(models, adapter, [(str(image_path), image, ref_prompt)], options)[0],
                             inversion=inv)
