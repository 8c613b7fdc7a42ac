"""KA-Diff generation (spec 5-6): a denoiser over the one sampler with correspondence-aware K/V injection.

The release runs four UNet rows per job (`KADIFF`: uncond_gen, uncond_ref,
cond_gen, cond_ref). In `--mode kadiff` the uncond_ref row influences nothing
(the ref latent is replaced from the inverted trajectory every step and only
cond_ref's keys/values are read), and jobs with the same reference have
identical ref rows; so by default jobs are packed into reference groups
(`KADIFF_GROUPED`: k uncond_gen, k cond_gen, one cond_ref per group). MasaCtrl
keeps both ref rows per group; `BASELINE` (the plain IP-Adapter image) needs
only the gen rows. At step s the ref latent is the inverted trajectory's entry
s, and the correspondence uses the reference's inversion features of step s-1
and the cond_gen DIFT block output of this same pass at step s-1, carried
as the denoiser's state (quirk Q3): no second pass. Thresholds and injection
steps are traced, one per job, so changing them never recompiles.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax import image_io, sharding
from kadiff_jax.programs import persistent_jit
from kadiff_jax.job import Job
from kadiff_jax.kadiff import correspondence as corr_lib
from kadiff_jax.kadiff.grouping import GroupPlan, plan_groups
from kadiff_jax.kadiff.injection import InjectionArgs, KVInjection, MutualSelfAttention
from kadiff_jax.kadiff.options import KADiffOptions, kadiff_scheduler
from kadiff_jax.kadiff.reference import PreparedReference, ip_scale
from kadiff_jax.models import ip_adapter, unet
from kadiff_jax.pipelines import conditioning
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.sampling import KADIFF, KADIFF_GROUPED, MASACTRL_GROUPED, RowLayout, sample
from kadiff_jax.weights.models import DiffusionModels

BASELINE = RowLayout(("uncond_gen", "cond_gen"), "cond_gen", "uncond_gen")
_REF_ROLES = ("uncond_ref", "cond_ref")


def layout_for(mode: str, row_layout: str = "grouped") -> RowLayout:
  """The rows a mode runs (`row_layout` "per_job" is the release's 4 rows per job)."""
  if mode == "baseline":
    return BASELINE
  if row_layout == "per_job":
    return KADIFF
  return KADIFF_GROUPED if mode == "kadiff" else MASACTRL_GROUPED


def _empty_corr(b: int, r: int) -> corr_lib.Correspondence:
  n = r * r
  return corr_lib.Correspondence(jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool), jnp.full((b, n), jnp.inf))


@persistent_jit(static_argnames=("unet_config", "steps", "mode", "layout", "selector", "inject", "resolutions",
                                 "dtype", "upcast", "record", "dift_block"))
def kadiff_denoise(unet_params, noise, trajectory, ref_features, masks, cond, guidance, hook_args, thresholds,
                   inject_steps, *, unet_config, steps, mode, layout, selector, inject, resolutions, dtype, upcast,
                   record=(), dift_block="up_blocks.0"):
  """Returns (final gen latents [B, h, w, C], aux); aux["x"] [S, B, h, w, C] with "trajectory" in `record`,
  aux["correspondence"] {r: Correspondence of [S, B, r*r]} with "correspondence" in `record`.

  Jobs come in G groups of `layout.group` (B = G * group): noise [B, h, w, C], masks [B, M, M] bool,
  thresholds [B] float, inject_steps [B, 2] int (first, last; inclusive) per job; trajectory [G, S+1, h, w, C]
  and ref_features [G, S, hf, wf, Cf] per group, in denoising order; cond and hook_args["ip_adapter"] rows
  follow `layout`.
  """
  scheduler = kadiff_scheduler()
  b = noise.shape[0]
  hooks = [ip_adapter.IPAdapterAttention(upcast=upcast)]
  if mode == "kadiff":
    hooks.append(KVInjection(selector, inject, layout))
  elif mode == "masactrl":
    hooks.append(MutualSelfAttention(selector, layout))
  per_job = lambda a: jnp.repeat(a, layout.group, axis=0)  # a per-group value for each of its jobs

  def denoiser(x, t, s, feat_prev):
    z_ref = trajectory[:, s]
    rows = layout.interleave({role: (z_ref if role in layout.shared else per_job(z_ref)) if role in _REF_ROLES
                              else x for role in layout.roles})
    active = (s >= inject_steps[:, 0]) & (s <= inject_steps[:, 1]) & (s > 0)  # [B]; step 0 has no previous features
    corr = {}
    if mode == "kadiff":
      f_ref = per_job(ref_features[:, jnp.maximum(s - 1, 0)])
      for r in resolutions:
        corr[r] = jax.lax.cond(jnp.any(active),
                               lambda: corr_lib.batched_correspondence(f_ref, feat_prev, masks, r, thresholds),
                               lambda: _empty_corr(b, r))
    injection = InjectionArgs(active, corr)
    args = {**hook_args, "kv_injection": injection, "mutual_self_attention": injection}
    eps, aux = unet.apply(unet_params, rows, t, cond, config=unet_config, dtype=dtype, hooks=tuple(hooks),
                          hook_args=args, capture=(dift_block,) if mode == "kadiff" else (),
                          implementation=sharding.attention_implementation(dtype))
    feat = layout.take(aux[dift_block], "cond_gen").astype(jnp.float32) if mode == "kadiff" else feat_prev
    return layout.guide(eps, guidance), feat, ({"correspondence": corr} if "correspondence" in record else {})

  feat0 = jnp.zeros((b,) + ref_features.shape[2:], jnp.float32)
  return sample(denoiser, scheduler, scheduler.set_timesteps(steps), noise, feat0,
                trajectory="trajectory" in record)


class GenerationItem(NamedTuple):
  """One job with everything it is generated from."""

  job: Job
  reference: PreparedReference
  mask: np.ndarray   # [size, size] bool: the reference's concept (correspondence sources)
  noise: np.ndarray  # [h, w, C] initial latents (before `use_init_latents`)


class Generated(NamedTuple):
  latents: np.ndarray  # [N, h, w, C] final latents of the items in `items`
  images: np.ndarray   # [N, H, W, 3] uint8
  aux: dict            # "trajectory": [S, N, h, w, C]; "correspondence": {r: Correspondence of [S, N, r*r]}
  items: tuple[int, ...] = ()  # which items, in order: all of them, or (gather=False) those on this process


def _conditioning(models: DiffusionModels, adapter, slots: Sequence[GenerationItem], options: KADiffOptions,
                  layout: RowLayout):
  """The layout's rows of embeddings and IP-Adapter tokens (spec 6.1) for the job slots [G * group]: gen rows
  from the job's prompt, ref rows from the prepared reference; uncond rows from the negative prompt; every row
  gets the reference's tokens."""
  n = len(slots)
  # rows are assembled on the host (numpy) and placed once, so no small device programs run per batch
  gen = jax.tree_util.tree_map(np.asarray, conditioning.encode_prompts(models, [it.job.prompt for it in slots]))
  neg = jax.tree_util.tree_map(np.asarray, conditioning.encode_prompts(models, [options.negative_prompt] * n))
  ref_embeds = np.stack([it.reference.embeds for it in slots])
  ref_pooled = np.stack([it.reference.pooled for it in slots])
  tok_c = np.stack([it.reference.ip_tokens for it in slots])
  tok_u = np.stack([it.reference.ip_uncond for it in slots])
  per_role = {"uncond_gen": (neg.embeds, neg.pooled, tok_u), "uncond_ref": (neg.embeds, neg.pooled, tok_u),
              "cond_gen": (gen.embeds, gen.pooled, tok_c), "cond_ref": (ref_embeds, ref_pooled, tok_c)}
  pick = lambda k: layout.assemble({role: per_role[role][k] for role in layout.roles})
  cond = conditioning.unet_cond(models, pick(0), pick(1), options.size, options.size)
  return cond, ip_adapter.IPAdapterRows(pick(2), layout.broadcast(_ip_scales(adapter, slots, options)))


def _ip_scales(adapter, items: Sequence[GenerationItem], options: KADiffOptions) -> np.ndarray:
  return np.asarray([ip_scale(adapter, options) if it.job.ip_scale is None else it.job.ip_scale for it in items],
                    np.float32)


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


def injection_resolutions(unet_config: unet.UNetConfig, latent: int, selector) -> tuple[int, ...]:
  """Grid sides of the selected self-attention layers at this latent size (fails when none is selected)."""
  sites = selector.select(tuple(unet.attention_sites(unet_config).values()), "inject_layers")
  return tuple(sorted({s.grid(latent)[0] for s in sites}))


def plan_batch(adapter, items: Sequence[GenerationItem], options: KADiffOptions, mode: str,
               devices: int = 1) -> GroupPlan:
  """How `run_jobs` packs the items into rows: jobs sharing a prepared reference and IP-Adapter scale share its
  ref rows (grouped layouts)."""
  keys = [(id(it.reference), float(s)) for it, s in zip(items, _ip_scales(adapter, items, options))]
  return plan_groups(keys, layout_for(mode, options.row_layout), devices, options.group_size)


def _local_rows(x: jax.Array, p: GroupPlan) -> tuple[list[int], list[np.ndarray]]:
  """(item indices, rows) of x [slots, ...] held by this process's devices: each item once, no fillers."""
  items, rows = [], []
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = shard.index[0].start or 0
    data = np.asarray(shard.data)
    for r in range(data.shape[0]):
      s = start + r
      if s < len(p.slots) and p.position[p.slots[s]] == s and p.slots[s] not in items:
        items.append(p.slots[s])
        rows.append(data[r])
  return items, rows


def run_jobs(models: DiffusionModels, adapter, items: Sequence[GenerationItem], options: KADiffOptions,
             mode: str | None = None, mesh=None, record: Sequence[str] = (), *, plan: GroupPlan | None = None,
             gather: bool = True) -> Generated:
  """Generates one batch of items (data-parallel over the mesh, whole reference groups per device).

  `record` may hold "trajectory" (every step's latents) and "correspondence" (every step's matches).
  `plan` (from `plan_batch`) fixes which devices compute which items, e.g. to keep a job's baseline on the devices
  that made its KA-Diff image. With `gather=False` every process gets back only the items its own devices
  computed (no copy of the batch crosses hosts) and `record` must be empty.
  """
  options = options.for_model(models)
  mode = mode or options.mode
  mesh = mesh or sharding.data_mesh()
  p = plan or plan_batch(adapter, items, options, mode, mesh.size)
  p = p._replace(layout=layout_for(mode, options.row_layout).grouped(p.layout.group))
  if record and not gather:
    raise ValueError("record needs gather=True (it returns every item's steps)")
  layout, g = p.layout, p.groups
  slots = [items[i] for i in p.slots]
  firsts = [items[i] for i in p.group_items()]
  cond, ip_rows = _conditioning(models, adapter, slots, options, layout)
  per_job = lambda a: sharding.shard_jobs(a, mesh, g, layout.group)  # whole groups per device
  per_group = lambda a: sharding.shard_jobs(a, mesh, g)
  per_row = lambda a: sharding.shard_jobs(a, mesh, g, layout.rows)
  lo, hi = options.step_range()
  n = len(slots)
  z, aux = kadiff_denoise(
      sharding.replicate(models.unet_params, mesh), per_job(initial_latents(slots, options.use_init_latents)),
      per_group(np.stack([it.reference.latents for it in firsts])),
      per_group(np.stack([it.reference.features for it in firsts])),
      per_job(np.stack([it.mask for it in slots])), per_row(cond), jnp.float32(options.guidance),
      sharding.place_hook_inputs({"ip_adapter": ip_adapter.hook_inputs(adapter, *ip_rows)}, mesh, g, layout.rows),
      per_job(np.full((n,), options.threshold, np.float32)), per_job(np.tile(np.int32([lo, hi]), (n, 1))),
      unet_config=models.unet_config, steps=options.steps, mode=mode, layout=layout,
      selector=options.layer_selector(), inject=options.inject,
      resolutions=injection_resolutions(models.unet_config, options.size // models.vae_scale_factor,
                                        options.layer_selector()) if mode != "baseline" else (),
      dtype=jax.tree_util.tree_leaves(models.unet_params)[0].dtype, upcast=models.unet_config.upcast_attention,
      record=tuple(sorted(record)), dift_block=options.dift_block)
  vae_dtype = jax.tree_util.tree_leaves(models.vae_params)[0].dtype
  images = t2i.decode(sharding.replicate(models.vae_params, mesh), z, config=models.vae_config, dtype=vae_dtype)
  if not gather:
    mine, z_rows = _local_rows(z, p)
    _, im_rows = _local_rows(images, p)
    stack = lambda rows, like: np.stack(rows) if rows else np.zeros((0,) + like.shape[1:], like.dtype)
    return Generated(stack(z_rows, z), image_io.to_uint8(stack(im_rows, images)), {}, tuple(mine))
  pos = np.asarray(p.position)  # each item's slot: back in the items' order
  out_aux = {}
  if "trajectory" in record:
    out_aux["trajectory"] = sharding.to_host(aux["x"])[:, pos]
  if "correspondence" in record:
    out_aux["correspondence"] = {r: corr_lib.Correspondence(*(sharding.to_host(a)[:, pos] for a in c))
                                 for r, c in aux["correspondence"].items()}
  return Generated(sharding.to_host(z)[pos], image_io.to_uint8(sharding.to_host(images)[pos]), out_aux,
                   tuple(range(len(items))))


def abstract_inputs(unet_config: unet.UNetConfig, layout: RowLayout, groups: int, latent: int, steps: int,
                    ip_tokens: int, dtype, text_tokens: int = 77):
  """`kadiff_denoise`'s inputs after the UNet params, as shapes only, and its static arguments, for `groups`
  groups of `layout` at this latent size (the release's injection settings; for compiling without data)."""
  from kadiff_jax.kadiff.options import default_dift_block, default_inject_layers
  from kadiff_jax.models.attention import HookInputs, parse_layers
  s = jax.ShapeDtypeStruct
  b, rows = groups * layout.group, groups * layout.rows
  c = unet_config.in_channels
  ctx = unet_config.cross_attention_dim[0]
  params = unet.init_shapes(unet_config, dtype)
  row = lambda *shape: s((rows,) + shape, jnp.float32)
  cond = unet.UNetCond(row(text_tokens, ctx), *((row(unet_config.projection_class_embeddings_input_dim
                                                     - 6 * unet_config.addition_time_embed_dim), row(6))
                                                 if unet_config.addition_embed_type else (None, None)))
  dift = default_dift_block(unet_config)
  feat = jax.eval_shape(lambda p, x, cd: unet.apply(p, x, 0.0, cd, config=unet_config, dtype=dtype,
                                                    capture=(dift,))[1][dift],
                        params, s((1, latent, latent, c), jnp.float32),
                        jax.tree_util.tree_map(lambda a: s((1,) + a.shape[1:], a.dtype), cond)).shape[1:]
  ip_layers = {path: {n: s((ctx, site.channels), dtype) for n in ("to_k_ip", "to_v_ip")}
               for path, site in unet.attention_sites(unet_config).items() if site.kind == "cross"}
  hook_args = {"ip_adapter": HookInputs(ip_layers, ip_adapter.IPAdapterRows(row(ip_tokens, ctx), row()))}
  selector = parse_layers(default_inject_layers(unet_config), kind="self")
  size = latent * 8
  args = (s((b, latent, latent, c), jnp.float32), s((groups, steps + 1, latent, latent, c), jnp.float32),
          s((groups, steps) + feat, jnp.float32), s((b, size, size), jnp.bool_), cond, s((), jnp.float32),
          hook_args, s((b,), jnp.float32), s((b, 2), jnp.int32))
  static = dict(unet_config=unet_config, steps=steps, mode="kadiff", layout=layout, selector=selector,
                inject=("k", "v"), resolutions=injection_resolutions(unet_config, latent, selector), dtype=dtype,
                upcast=unet_config.upcast_attention, dift_block=dift)
  return args, static


def peak_bytes(compiled) -> int | None:
  """A compiled program's peak device memory from XLA's `memory_analysis()` (None where the backend has none)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def groups_per_device(unet_params, unet_config: unet.UNetConfig, layout: RowLayout, latent: int, steps: int,
                      ip_tokens: int, memory_bytes: int) -> int:
  """How many groups of `layout` one device holds: the injection pass compiled from shapes at 1 and 2 groups,
  its peak memory fitted as fixed + per group, and 90% of `memory_bytes` divided out (at least 1)."""
  dtype = jax.tree_util.tree_leaves(unet_params)[0].dtype
  params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), unet_params)
  peaks = []
  for g in (1, 2):
    args, static = abstract_inputs(unet_config, layout, g, latent, steps, ip_tokens, dtype)
    peaks.append(peak_bytes(kadiff_denoise.lower(params, *args, **static).compile()))
  if None in peaks:
    return 1
  per_group = max(peaks[1] - peaks[0], 1)
  return max(int((0.9 * memory_bytes - (peaks[0] - per_group)) // per_group), 1)


JOBS_PER_GROUP = 8  # the group size the automatic batch plans for (k = 8: 17 rows per 8 images)


def auto_batch_size(models: DiffusionModels, adapter, options: KADiffOptions, mesh) -> int:
  """Jobs per batch when none is given: on an accelerator, as many groups of k jobs (`group_size`, else 8) as fit
  each device's memory, from the injection pass's memory analysis; on CPU, one group per device."""
  options = options.for_model(models)
  k = options.group_size or JOBS_PER_GROUP
  memory = sharding.device_memory()
  if jax.default_backend() == "cpu" or memory is None:
    return k * mesh.size
  layout = layout_for(options.mode, options.row_layout)
  layout = layout.grouped(k) if layout.shared else KADIFF  # per_job: k groups of one job
  groups = groups_per_device(models.unet_params, models.unet_config, layout, options.size // models.vae_scale_factor,
                             options.steps, adapter.num_tokens, memory)
  return groups * layout.group * mesh.size
