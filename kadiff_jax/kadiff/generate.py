"""KA-Diff generation (spec 5-6): denoise [gen, ref] together with correspondence-aware K/V injection.

One jitted `lax.scan` over the DDIM steps. Per job the UNet sees four rows
[uncond_gen, uncond_ref, cond_gen, cond_ref]; at step s the ref latent is the
inverted trajectory's entry s, and the correspondence uses the reference's
inversion features of step s-1 and the cond_gen `up_blocks.0` output of this
same pass at step s-1, carried in the scan state (quirk Q3): no second pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from kadiff_jax import image_io, sharding
from kadiff_jax.kadiff import correspondence as corr_lib
from kadiff_jax.kadiff.injection import COND_GEN, ROWS, InjectionArgs, KVInjection, MutualSelfAttention
from kadiff_jax.kadiff.options import KADiffOptions, kadiff_scheduler
from kadiff_jax.kadiff.reference import ReferenceCache, ip_reference
from kadiff_jax.models import ip_adapter, unet
from kadiff_jax.models.attention import LayerSelector
from kadiff_jax.pipelines import conditioning
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.weights.sdxl import SDXLModels


def site_resolution(config: unet.UNetConfig, path: str, latent: int) -> int:
  """Spatial size of the attention layer at `path` for a square latent of side `latent`."""
  region, _, rest = path.partition(".")
  n = config.num_blocks
  if region == "mid_block":
    return latent // 2 ** (n - 1)
  b = int(rest.split(".")[0])
  return latent // 2 ** b if region == "down_blocks" else latent // 2 ** (n - 1 - b)


def injection_resolutions(config: unet.UNetConfig, selector: LayerSelector, latent: int) -> tuple[int, ...]:
  sites = [s for s in unet.attention_sites(config).values() if selector.selects(s)]
  return tuple(sorted({site_resolution(config, s.path, latent) for s in sites}))


def _empty_corr(b: int, r: int) -> corr_lib.Correspondence:
  n = r * r
  return corr_lib.Correspondence(jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool), jnp.full((b, n), jnp.inf))


@functools.partial(jax.jit, static_argnames=("unet_config", "steps", "mode", "selector", "inject", "threshold",
                                             "step_range", "resolutions", "dtype", "upcast", "trajectory_out",
                                             "correspondence_out"))
def kadiff_denoise(unet_params, noise, trajectory, ref_features, masks, cond, guidance, ip_args, *, unet_config,
                   steps, mode, selector, inject, threshold, step_range, resolutions, dtype, upcast,
                   trajectory_out=False, correspondence_out=False):
  """Returns final gen latents [B, h, w, C]; with `trajectory_out` also every step's, [S, B, h, w, C], and
  with `correspondence_out` every step's correspondence {r: Correspondence of [S, B, r*r]} (a tuple).

  noise [B, h, w, C]; trajectory [B, S+1, h, w, C] and ref_features [B, S, hf, wf, Cf] in denoising
  order; masks [B, M, M] bool; cond has 4B rows; ip_args: IPAdapterArgs over the 4B rows.
  """
  scheduler = kadiff_scheduler()
  state = scheduler.set_timesteps(steps)
  b = noise.shape[0]
  hooks = [ip_adapter.IPAdapterAttention(upcast=upcast)]
  if mode == "kadiff":
    hooks.append(KVInjection(selector, inject))
  elif mode == "masactrl":
    hooks.append(MutualSelfAttention(selector))
  lo, hi = step_range

  def body(carry, s):
    z_gen, feat_prev = carry
    z_ref = trajectory[:, s]
    x = jnp.stack([z_gen, z_ref, z_gen, z_ref], axis=1).reshape((ROWS * b,) + z_gen.shape[1:])
    active = (s >= lo) & (s <= hi) & (s > 0)  # step 0 has no previous features
    corr = {}
    if mode == "kadiff":
      f_ref = ref_features[:, jnp.maximum(s - 1, 0)]
      for r in resolutions:
        corr[r] = jax.lax.cond(active, lambda: corr_lib.batched_correspondence(f_ref, feat_prev, masks, r, threshold),
                               lambda: _empty_corr(b, r))
    args = {"ip_adapter": ip_args, "kv_injection": InjectionArgs(active, corr),
            "mutual_self_attention": InjectionArgs(active, corr)}
    eps, aux = unet.apply(unet_params, x, state.timesteps[s], cond, config=unet_config, dtype=dtype,
                          hooks=tuple(hooks), hook_args=args, capture=("up_blocks.0",))
    eps = eps.astype(jnp.float32).reshape((b, ROWS) + z_gen.shape[1:])
    e_gen = eps[:, 0] + guidance * (eps[:, COND_GEN] - eps[:, 0])  # rows 0 and 2: uncond/cond gen
    feat = aux["up_blocks.0"].reshape((b, ROWS) + aux["up_blocks.0"].shape[1:])[:, COND_GEN].astype(jnp.float32)
    z_next = scheduler.step(state, s, z_gen, e_gen)
    return (z_next, feat), (z_next if trajectory_out else None, corr if correspondence_out else None)

  feat0 = jnp.zeros_like(ref_features[:, 0], jnp.float32)
  (z, _), (per_step, corrs) = jax.lax.scan(body, (noise, feat0), jnp.arange(steps))
  if not (trajectory_out or correspondence_out):
    return z
  return (z,) + ((per_step,) if trajectory_out else ()) + ((corrs,) if correspondence_out else ())


@dataclasses.dataclass(frozen=True)
class KADiffJob:
  prompt: str
  reference: str
  ref_prompt: str
  mask: str | None = None  # None: the whole reference is the concept
  seed: int = 0
  index: int = 0


def _conditioning(models: SDXLModels, adapter, jobs: Sequence[KADiffJob], references, options: KADiffOptions):
  """4 rows per job: [uncond_gen, uncond_ref, cond_gen, cond_ref] embeddings and IP-Adapter args."""
  n = len(jobs)
  gen = conditioning.encode_prompts(models, [j.prompt for j in jobs])
  ref = conditioning.encode_prompts(models, [j.ref_prompt for j in jobs])
  neg = conditioning.encode_prompts(models, [options.negative_prompt] * n)
  pixels = ip_adapter.preprocess_references([ip_reference(r, options.size) for r in references], adapter)
  tok_c, tok_u = ip_adapter.image_tokens(adapter, jnp.asarray(pixels))
  four = lambda a, b, c, d: jnp.stack([a, b, c, d], axis=1).reshape((ROWS * n,) + a.shape[1:])
  ids = conditioning.time_ids(options.size, options.size, n)
  cond = unet.UNetCond(four(neg.embeds, neg.embeds, gen.embeds, ref.embeds),
                       four(neg.pooled, neg.pooled, gen.pooled, ref.pooled), four(ids, ids, ids, ids))
  scale = adapter.default_scale if options.ip_scale is None else options.ip_scale
  ip_args = ip_adapter.IPAdapterArgs(adapter.layers, four(tok_u, tok_u, tok_c, tok_c),
                                     jnp.full((ROWS * n,), scale, jnp.float32))
  return cond, ip_args


def initial_latents(noise: np.ndarray, caches: Sequence[ReferenceCache], masks: np.ndarray, use_init: bool):
  """Spec 5: with `use_init`, copy z_ref[T] into the noise where the mask (bilinear to latent size) > 0.5."""
  if not use_init:
    return noise
  h = noise.shape[1]
  out = []
  for z, c, m in zip(noise, caches, masks):
    m_lat = np.asarray(corr_lib.resize_bilinear(jnp.asarray(m, jnp.float32)[..., None], h))[..., 0] > 0.5
    out.append(np.where(m_lat[..., None], c.latents[0], z))
  return np.stack(out)


def run_jobs(models: SDXLModels, adapter, jobs: Sequence[KADiffJob], caches: Sequence[ReferenceCache],
             references: Sequence[Image.Image], masks: np.ndarray, noise: np.ndarray, options: KADiffOptions,
             mode: str | None = None, mesh=None, trajectory_out: bool = False, correspondence_out: bool = False):
  """Generates one batch of jobs; returns (latents [B, h, w, C], uint8 images [B, H, W, 3]), plus the
  per-step latents [S, B, h, w, C] with `trajectory_out` and the per-step correspondences
  {r: Correspondence of [S, B, r*r]} with `correspondence_out`."""
  options = options.for_model(models)
  mode = mode or options.mode
  n = len(jobs)
  cond, ip_args = _conditioning(models, adapter, jobs, references, options)
  latent = options.size // models.vae_scale_factor
  selector = options.layer_selector()
  mesh = mesh or sharding.data_mesh()
  padded = sharding.padded_size(n, mesh)
  shard = lambda a, k=1: sharding.shard_batch(sharding.pad_rows(jnp.asarray(a), n, padded, k), mesh)
  init = initial_latents(noise, caches, masks, options.use_init_latents)
  z = kadiff_denoise(
      sharding.replicate(models.unet_params, mesh), shard(init), shard(np.stack([c.latents for c in caches])),
      shard(np.stack([c.features for c in caches])), shard(masks),
      jax.tree_util.tree_map(lambda a: shard(a, ROWS), cond), jnp.float32(options.guidance),
      ip_adapter.IPAdapterArgs(sharding.replicate(ip_args.layers, mesh), shard(ip_args.tokens, ROWS),
                               shard(ip_args.scale, ROWS)),
      unet_config=models.unet_config, steps=options.steps, mode=mode, selector=selector, inject=options.inject,
      threshold=float(options.threshold), step_range=options.step_range(),
      resolutions=injection_resolutions(models.unet_config, selector, latent),
      dtype=jax.tree_util.tree_leaves(models.unet_params)[0].dtype,
      upcast=models.unet_config.upcast_attention, trajectory_out=trajectory_out,
      correspondence_out=correspondence_out)
  per_step = corrs = None
  if trajectory_out or correspondence_out:
    z, *extra = z
    per_step = extra.pop(0) if trajectory_out else None
    corrs = extra.pop(0) if correspondence_out else None
  vae_dtype = jax.tree_util.tree_leaves(models.vae_params)[0].dtype
  images = t2i.decode(sharding.replicate(models.vae_params, mesh), z, config=models.vae_config, dtype=vae_dtype)
  out = (sharding.to_host(z)[:n], image_io.to_uint8(sharding.to_host(images)[:n]))
  if trajectory_out:
    out += (sharding.to_host(per_step)[:, :n],)
  if correspondence_out:
    out += ({r: corr_lib.Correspondence(*(sharding.to_host(a)[:, :n] for a in c)) for r, c in corrs.items()},)
  return out
