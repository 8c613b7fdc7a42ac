"""Reference preparation (spec 4-5): image and mask loading, DDIM inversion with DIFT capture, the cache.

`invert_reference` runs the inversion as one jitted `lax.scan` and returns a
`ReferenceCache`: the latent trajectory in denoising order (entry s is what
the denoiser sees at step s; entry 0 is z_T, the last is z0_ref) and the
cond-half `up_blocks.0` features, also in denoising order (entry s was
captured at the timestep of denoising step s). A cache is saved as npz +
JSON manifest and refused when loaded for a different model or schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from kadiff_jax import image_io
from kadiff_jax.kadiff import concept_mask
from kadiff_jax.kadiff.options import KADiffOptions, kadiff_scheduler
from kadiff_jax.models import ip_adapter, unet, vae
from kadiff_jax.pipelines import conditioning
from kadiff_jax.weights.sdxl import SDXLModels

CACHE_VERSION = 2


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
class ReferenceCache:
  latents: np.ndarray   # [S + 1, h, w, C] denoising order: [0] = z_T ... [S] = z0_ref
  features: np.ndarray  # [S, H/16, W/16, C_dift] denoising order: [s] captured at timestep t_s
  timesteps: np.ndarray  # [S] denoising-order timesteps
  manifest: dict[str, Any]
  cross_attention: np.ndarray | None = None  # [r, r, T] cond-row text attention, mean over layers and steps

  def save(self, path: str | os.PathLike) -> Path:
    """Writes `path`.npz and `path`.json atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    extra = {} if self.cross_attention is None else {"cross_attention": self.cross_attention}
    np.savez(tmp, latents=self.latents, features=self.features, timesteps=self.timesteps, **extra)
    os.replace(tmp, path.with_suffix(".npz"))
    tmp_json = path.with_name(f".{path.name}.tmp{os.getpid()}.json")
    tmp_json.write_text(json.dumps(self.manifest, indent=2, sort_keys=True))
    os.replace(tmp_json, path.with_suffix(".json"))
    return path.with_suffix(".npz")


def cache_manifest(models: SDXLModels, adapter: ip_adapter.IPAdapter, reference_sha: str, ref_prompt: str,
                   options: KADiffOptions) -> dict[str, Any]:
  """What a cache depends on; loading compares it field by field."""
  return {"version": CACHE_VERSION, "model": str(models.source),
          "unet": hashlib.sha256(json.dumps(models.unet_config.to_diffusers(), sort_keys=True).encode()).hexdigest()[:16],
          "ip_adapter": adapter.source, "ip_scale": _scale(adapter, options), "reference_sha256": reference_sha,
          "ref_prompt": ref_prompt, "steps": options.steps, "size": options.size,
          "scheduler": dataclasses.asdict(kadiff_scheduler().config), "inversion_guidance": options.inversion_guidance,
          "inversion_uncond": options.inversion_uncond, "negative_prompt": options.negative_prompt,
          "mask_layers": options.mask_layers}


def load_cache(path: str | os.PathLike, expected: dict[str, Any] | None = None) -> ReferenceCache:
  """Loads a cache; with `expected` (a manifest), refuses one made differently, naming the fields."""
  path = Path(path)
  npz, js = path.with_suffix(".npz"), path.with_suffix(".json")
  if not npz.is_file() or not js.is_file():
    raise FileNotFoundError(f"reference cache {path}: expected {npz.name} and {js.name}")
  manifest = json.loads(js.read_text())
  if expected is not None:
    diff = {k: (manifest.get(k), v) for k, v in expected.items() if manifest.get(k) != v}
    if diff:
      lines = ", ".join(f"{k}: cache has {a!r}, this run needs {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ValueError(f"reference cache {npz} was made for a different setup ({lines}); delete it or use another")
  with np.load(npz) as z:
    return ReferenceCache(z["latents"], z["features"], z["timesteps"], manifest,
                          z["cross_attention"] if "cross_attention" in z.files else None)


def _scale(adapter, options: KADiffOptions) -> float:
  return adapter.default_scale if options.ip_scale is None else float(options.ip_scale)


@functools.partial(jax.jit, static_argnames=("unet_config", "vae_config", "scheduler", "num_steps", "dtype",
                                             "hooks", "vae_dtype"))
def _invert(unet_params, vae_params, pixels, cond, guidance, hook_args, *, unet_config, vae_config, scheduler,
            num_steps, dtype, hooks, vae_dtype):
  """Encodes [B, H, W, 3] and inverts it; returns (latents [B, S+1, ...], features [B, S, ...]) in inversion
  order, and the cond rows' text cross-attention maps [B, r, r, T] averaged over layers and steps."""
  state = scheduler.set_timesteps(num_steps)
  z0 = vae.encode(vae_params, pixels.astype(vae_dtype), config=vae_config, dtype=vae_dtype).astype(jnp.float32)

  def body(z, k):
    i = num_steps - 1 - k  # ascending timesteps: index into the descending schedule
    t = state.timesteps[i]
    eps, aux = unet.apply(unet_params, jnp.repeat(z, 2, axis=0), t, cond, config=unet_config, dtype=dtype,
                          hooks=hooks, hook_args=hook_args, capture=("up_blocks.0",))
    eps = eps.astype(jnp.float32).reshape((-1, 2) + z.shape[1:])
    eps = eps[:, 0] + guidance * (eps[:, 1] - eps[:, 0])
    z_next = scheduler.invert_step(state, i, z, eps)
    feat = aux["up_blocks.0"].reshape((-1, 2) + aux["up_blocks.0"].shape[1:])[:, 1]  # cond half
    return z_next, (z_next, feat, concept_mask.aggregate_layers(aux))

  _, (zs, feats, attn) = jax.lax.scan(body, z0, jnp.arange(num_steps))
  latents = jnp.concatenate([z0[None], zs], axis=0)  # [S+1, B, ...], inversion order
  return jnp.moveaxis(latents, 0, 1), jnp.moveaxis(feats, 0, 1), attn.mean(axis=0)


def inversion_conditioning(models: SDXLModels, adapter: ip_adapter.IPAdapter, ref_prompts: list[str],
                           references: list[Image.Image], options: KADiffOptions):
  """UNet conditioning and IP-Adapter args for inversion rows [uncond_i, cond_i] per reference (Q1)."""
  n = len(ref_prompts)
  pos = conditioning.encode_prompts(models, ref_prompts)
  pixels = ip_adapter.preprocess_references([ip_reference(r, options.size) for r in references], adapter)
  tok_c, tok_u = ip_adapter.image_tokens(adapter, jnp.asarray(pixels))
  if options.inversion_uncond == "reference":  # Q1: cond sequence in both halves, zero pooled for uncond
    neg_embeds, neg_pooled, neg_tokens = pos.embeds, jnp.zeros_like(pos.pooled), tok_c
  else:
    neg = conditioning.encode_prompts(models, [options.negative_prompt] * n)
    neg_embeds, neg_pooled, neg_tokens = neg.embeds, neg.pooled, tok_u
  pair = lambda a, b: jnp.stack([a, b], axis=1).reshape((2 * n,) + a.shape[1:])
  ids = conditioning.time_ids(options.size, options.size, n)
  cond = unet.UNetCond(pair(neg_embeds, pos.embeds), pair(neg_pooled, pos.pooled), pair(ids, ids))
  scale = jnp.full((2 * n,), _scale(adapter, options), jnp.float32)
  return cond, ip_adapter.IPAdapterArgs(adapter.layers, pair(neg_tokens, tok_c), scale)


def invert_reference(models: SDXLModels, adapter: ip_adapter.IPAdapter, reference, ref_prompt: str,
                     options: KADiffOptions = KADiffOptions()) -> ReferenceCache:
  """DDIM-inverts one reference image (path or PIL) conditioned on `ref_prompt` and its own image tokens."""
  options = options.for_model(models)
  image = image_io.load_rgb(reference)
  sha = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
  cond, ip_args = inversion_conditioning(models, adapter, [ref_prompt], [image], options)
  pixels = jnp.asarray(reference_pixels(image, options.size))[None]
  sched = kadiff_scheduler()
  latents, feats, attn = _invert(
      models.unet_params, models.vae_params, pixels, cond, jnp.float32(options.inversion_guidance),
      {"ip_adapter": ip_args}, unet_config=models.unet_config, vae_config=models.vae_config, scheduler=sched,
      num_steps=options.steps, dtype=jax.tree_util.tree_leaves(models.unet_params)[0].dtype,
      hooks=(ip_adapter.IPAdapterAttention(upcast=models.unet_config.upcast_attention),
             concept_mask.CrossAttentionMaps(concept_mask.mask_selector(options.mask_layers))),
      vae_dtype=jax.tree_util.tree_leaves(models.vae_params)[0].dtype)
  timesteps = np.asarray(sched.set_timesteps(options.steps).timesteps)
  # inversion order -> denoising order: latents reversed; the feature captured at inversion call k
  # (timestep t_{S-1-k}) belongs to denoising step S-1-k.
  return ReferenceCache(np.asarray(latents[0])[::-1].copy(), np.asarray(feats[0])[::-1].copy(), timesteps,
                        cache_manifest(models, adapter, sha, ref_prompt, options), np.asarray(attn[0]))
