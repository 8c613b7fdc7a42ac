"""KA-Diff generation (spec 5-6): a denoiser over the one sampler with correspondence-aware K/V injection.

Per job the UNet sees the rows of `KADIFF` [uncond_gen, uncond_ref, cond_gen,
cond_ref] (`BASELINE`, the plain IP-Adapter image, needs only the two gen
rows). At step s the ref latent is the inverted trajectory's entry s, and the
correspondence uses the reference's inversion features of step s-1 and the
cond_gen `up_blocks.0` output of this same pass at step s-1, carried as the
denoiser's state (quirk Q3): no second pass. Thresholds and injection steps
are traced, one per job, so changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax import image_io, sharding
from kadiff_jax.job import Job
from kadiff_jax.kadiff import correspondence as corr_lib
from kadiff_jax.kadiff.injection import InjectionArgs, KVInjection, MutualSelfAttention
from kadiff_jax.kadiff.options import KADiffOptions, kadiff_scheduler
from kadiff_jax.kadiff.reference import PreparedReference, ip_scale
from kadiff_jax.models import ip_adapter, unet
from kadiff_jax.pipelines import conditioning
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.sampling import KADIFF, RowLayout, sample
from kadiff_jax.weights.sdxl import SDXLModels

BASELINE = RowLayout(("uncond_gen", "cond_gen"), "cond_gen", "uncond_gen")
LAYOUTS = {"kadiff": KADIFF, "masactrl": KADIFF, "baseline": BASELINE}


def _empty_corr(b: int, r: int) -> corr_lib.Correspondence:
  n = r * r
  return corr_lib.Correspondence(jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool), jnp.full((b, n), jnp.inf))


@functools.partial(jax.jit, static_argnames=("unet_config", "steps", "mode", "selector", "inject", "resolutions",
                                             "dtype", "upcast", "record"))
def kadiff_denoise(unet_params, noise, trajectory, ref_features, masks, cond, guidance, hook_args, thresholds,
                   inject_steps, *, unet_config, steps, mode, selector, inject, resolutions, dtype, upcast,
                   record=()):
  """Returns (final gen latents [B, h, w, C], aux); aux["x"] [S, B, h, w, C] with "trajectory" in `record`,
  aux["correspondence"] {r: Correspondence of [S, B, r*r]} with "correspondence" in `record`.

  noise [B, h, w, C]; trajectory [B, S+1, h, w, C] and ref_features [B, S, hf, wf, Cf] in denoising
  order; masks [B, M, M] bool; cond and hook_args["ip_adapter"] rows follow `LAYOUTS[mode]`;
  thresholds [B] float; inject_steps [B, 2] int (first, last; inclusive).
  """
  layout = LAYOUTS[mode]
  scheduler = kadiff_scheduler()
  b = noise.shape[0]
  hooks = [ip_adapter.IPAdapterAttention(upcast=upcast)]
  if mode == "kadiff":
    hooks.append(KVInjection(selector, inject, layout))
  elif mode == "masactrl":
    hooks.append(MutualSelfAttention(selector, layout))

  def denoiser(x, t, s, feat_prev):
    z_ref = trajectory[:, s]
    if layout is KADIFF:
      rows = layout.interleave({"uncond_gen": x, "uncond_ref": z_ref, "cond_gen": x, "cond_ref": z_ref})
    else:
      rows = layout.broadcast(x)
    active = (s >= inject_steps[:, 0]) & (s <= inject_steps[:, 1]) & (s > 0)  # [B]; step 0 has no previous features
    corr = {}
    if mode == "kadiff":
      f_ref = ref_features[:, jnp.maximum(s - 1, 0)]
      for r in resolutions:
        corr[r] = jax.lax.cond(jnp.any(active),
                               lambda: corr_lib.batched_correspondence(f_ref, feat_prev, masks, r, thresholds),
                               lambda: _empty_corr(b, r))
    args = {**hook_args, "kv_injection": InjectionArgs(active, corr), "mutual_self_attention": InjectionArgs(active, corr)}
    eps, aux = unet.apply(unet_params, rows, t, cond, config=unet_config, dtype=dtype, hooks=tuple(hooks),
                          hook_args=args, capture=("up_blocks.0",) if mode == "kadiff" else ())
    feat = layout.take(aux["up_blocks.0"], "cond_gen").astype(jnp.float32) if mode == "kadiff" else feat_prev
    return layout.guide(eps, guidance), feat, ({"correspondence": corr} if "correspondence" in record else {})

  feat0 = jnp.zeros_like(ref_features[:, 0], jnp.float32)
  return sample(denoiser, scheduler, scheduler.set_timesteps(steps), noise, feat0,
                trajectory="trajectory" in record)


class GenerationItem(NamedTuple):
  """One job with everything it is generated from."""

  job: Job
  reference: PreparedReference
  mask: np.ndarray   # [size, size] bool: the reference's concept (correspondence sources)
  noise: np.ndarray  # [h, w, C] initial latents (before `use_init_latents`)


class Generated(NamedTuple):
  latents: np.ndarray  # [B, h, w, C] final latents
  images: np.ndarray   # [B, H, W, 3] uint8
  aux: dict            # "trajectory": [S, B, h, w, C]; "correspondence": {r: Correspondence of [S, B, r*r]}


def _conditioning(models: SDXLModels, adapter, items: Sequence[GenerationItem], options: KADiffOptions,
                  layout: RowLayout):
  """The layout's rows of embeddings and IP-Adapter tokens (spec 6.1): gen rows from the job's prompt, ref rows
  from the prepared reference; uncond rows from the negative prompt; every row gets the reference's tokens."""
  n = len(items)
  gen = conditioning.encode_prompts(models, [it.job.prompt for it in items])
  neg = conditioning.encode_prompts(models, [options.negative_prompt] * n)
  ref_embeds = jnp.asarray(np.stack([it.reference.embeds for it in items]))
  ref_pooled = jnp.asarray(np.stack([it.reference.pooled for it in items]))
  tok_c = jnp.asarray(np.stack([it.reference.ip_tokens for it in items]))
  tok_u = jnp.asarray(np.stack([it.reference.ip_uncond for it in items]))
  per_role = {"uncond_gen": (neg.embeds, neg.pooled, tok_u), "uncond_ref": (neg.embeds, neg.pooled, tok_u),
              "cond_gen": (gen.embeds, gen.pooled, tok_c), "cond_ref": (ref_embeds, ref_pooled, tok_c)}
  pick = lambda k: layout.interleave({role: per_role[role][k] for role in layout.roles})
  ids = conditioning.time_ids(options.size, options.size, n)
  cond = unet.UNetCond(pick(0), pick(1), layout.broadcast(ids))
  scales = jnp.asarray([ip_scale(adapter, options) if it.job.ip_scale is None else it.job.ip_scale
                        for it in items], jnp.float32)
  return cond, ip_adapter.IPAdapterRows(pick(2), layout.broadcast(scales))


def initial_latents(items: Sequence[GenerationItem], use_init: bool) -> np.ndarray:
  """Spec 5: with `use_init`, copy z_ref[T] into the noise where the mask (bilinear to latent size) > 0.5."""
  noise = np.stack([it.noise for it in items])
  if not use_init:
    return noise
  h = noise.shape[1]
  out = []
  for z, it in zip(noise, items):
    m_lat = np.asarray(corr_lib.resize_bilinear(jnp.asarray(it.mask, jnp.float32)[..., None], h))[..., 0] > 0.5
    out.append(np.where(m_lat[..., None], it.reference.latents[0], z))
  return np.stack(out)


def injection_resolutions(models: SDXLModels, options: KADiffOptions) -> tuple[int, ...]:
  """Grid sides of the selected self-attention layers at this size (fails when none is selected)."""
  latent = options.size // models.vae_scale_factor
  sites = options.layer_selector().select(tuple(unet.attention_sites(models.unet_config).values()),
                                          "inject_layers")
  return tuple(sorted({s.grid(latent)[0] for s in sites}))


def run_jobs(models: SDXLModels, adapter, items: Sequence[GenerationItem], options: KADiffOptions,
             mode: str | None = None, mesh=None, record: Sequence[str] = ()) -> Generated:
  """Generates one batch of items (data-parallel over the mesh).

  `record` may hold "trajectory" (every step's latents) and "correspondence" (every step's matches).
  """
  options = options.for_model(models)
  mode = mode or options.mode
  layout = LAYOUTS[mode]
  n = len(items)
  cond, ip_rows = _conditioning(models, adapter, items, options, layout)
  mesh = mesh or sharding.data_mesh()
  shard = lambda a: sharding.shard_jobs(a, mesh, n)
  lo, hi = options.step_range()
  z, aux = kadiff_denoise(
      sharding.replicate(models.unet_params, mesh), shard(initial_latents(items, options.use_init_latents)),
      shard(np.stack([it.reference.latents for it in items])), shard(np.stack([it.reference.features for it in items])),
      shard(np.stack([it.mask for it in items])), sharding.shard_jobs(cond, mesh, n, layout.rows),
      jnp.float32(options.guidance),
      sharding.place_hook_inputs({"ip_adapter": ip_adapter.hook_inputs(adapter, *ip_rows)}, mesh, n, layout.rows),
      shard(np.full((n,), options.threshold, np.float32)), shard(np.tile(np.int32([lo, hi]), (n, 1))),
      unet_config=models.unet_config, steps=options.steps, mode=mode, selector=options.layer_selector(),
      inject=options.inject, resolutions=injection_resolutions(models, options) if mode != "baseline" else (),
      dtype=jax.tree_util.tree_leaves(models.unet_params)[0].dtype, upcast=models.unet_config.upcast_attention,
      record=tuple(sorted(record)))
  vae_dtype = jax.tree_util.tree_leaves(models.vae_params)[0].dtype
  images = t2i.decode(sharding.replicate(models.vae_params, mesh), z, config=models.vae_config, dtype=vae_dtype)
  out_aux = {}
  if "trajectory" in record:
    out_aux["trajectory"] = sharding.to_host(aux["x"])[:, :n]
  if "correspondence" in record:
    out_aux["correspondence"] = {r: corr_lib.Correspondence(*(sharding.to_host(a)[:, :n] for a in c))
                                 for r, c in aux["correspondence"].items()}
  return Generated(sharding.to_host(z)[:n], image_io.to_uint8(sharding.to_host(images)[:n]), out_aux)
