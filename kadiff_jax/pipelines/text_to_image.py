"""Text-to-image on every model family: a denoiser over the one sampler (`kadiff_jax.sampling`), data-parallel.

Noise for image i of a job with seed s is `normal(fold_in(PRNGKey(s), i))`, so
an image's noise does not depend on how jobs are batched or sharded. The same
job run the same way gives bit-identical output; a different batch size can
change float rounding in XLA's matmuls (about 1e-6 relative on the latents).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kadiff_jax import image_io, schedulers, sharding
from kadiff_jax.config import option
from kadiff_jax.models import ip_adapter, unet, vae
from kadiff_jax.models.attention import HookInputs
from kadiff_jax.job import Job
from kadiff_jax.outputs import OutputDir
from kadiff_jax.pipelines import conditioning
from kadiff_jax.programs import persistent_jit
from kadiff_jax.sampling import CFG, NO_CFG, RowLayout, sample
from kadiff_jax.weights.models import DiffusionModels


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
  """Text-to-image options; unset ones come from the model (`for_model`): its family's steps and guidance, its
  folder's scheduler, its UNet's size."""

  steps: int | None = option(None, "denoising steps; default: the model family's (50; 1 for SD-Turbo and "
                             "SDXL-Turbo)")
  guidance: float | None = option(None, "classifier-free guidance (<= 1: no unconditional rows are run); default: "
                                  "the family's (5.0 SDXL, 7.5 SD1.x/2.x, 0 turbo)")
  scheduler: str | None = option(None, "default: the model folder's scheduler where implemented, else ddim",
                                 choices=tuple(schedulers.SCHEDULERS))
  height: int | None = option(None, "image height; default: the UNet's sample_size x VAE factor (1024 for SDXL)")
  width: int | None = option(None, "image width; default as height")

  def __post_init__(self):
    if self.steps is not None and self.steps < 1:
      raise ValueError(f"steps={self.steps}: expected at least 1")
    if self.scheduler is not None and self.scheduler not in schedulers.SCHEDULERS:
      raise ValueError(f"scheduler={self.scheduler!r}: expected one of {sorted(schedulers.SCHEDULERS)}")
    for name in ("height", "width"):
      v = getattr(self, name)
      if v is not None and (v <= 0 or v % 8):
        raise ValueError(f"{name}={v}: expected a positive multiple of 8")

  def for_model(self, models: DiffusionModels) -> "GenerationOptions":
    """These options with every unset value taken from the model, and checked against it."""
    h, w = self.height or models.default_size, self.width or models.default_size
    f = models.vae_scale_factor
    for name, v in (("height", h), ("width", w)):
      if v <= 0 or v % f:
        raise ValueError(f"{name}={v}: expected a positive multiple of {f} (the VAE's downsampling factor)")
    return dataclasses.replace(
        self, steps=self.steps or models.family.steps,
        guidance=models.family.guidance if self.guidance is None else self.guidance,
        scheduler=self.scheduler or folder_scheduler(models), height=h, width=w)

  def size(self, models: DiffusionModels) -> tuple[int, int]:
    o = self.for_model(models)
    return o.height, o.width


def folder_scheduler(models: DiffusionModels) -> str:
  """The scheduler of the model folder (diffusers' default for its pipeline) when we implement it, else DDIM on
  the folder's noise schedule (e.g. for SD1.5's PNDM)."""
  return schedulers.DIFFUSERS_CLASSES.get(models.scheduler_config.get("_class_name"), "ddim")


def image_key(seed: int, index: int) -> jax.Array:
  """The PRNG key of image `index` of a job with `seed`: its initial noise is normal(key), and a stochastic
  scheduler's noise of step i is normal(fold_in(split(key)[1], i))."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), int(index))


def step_keys(seeds_indices: Sequence[tuple[int, int]]) -> np.ndarray:
  """Per-image keys [N, 2] of a stochastic scheduler's step noise (see `image_key`)."""
  return np.stack([np.asarray(jax.random.split(image_key(s, i))[1]) for s, i in seeds_indices]).astype(np.uint32)


def initial_noise(seed: int, indices: Sequence[int], shape: tuple[int, int, int]) -> jax.Array:
  """Per-image Gaussian noise [N, h, w, C]: image i uses fold_in(PRNGKey(seed), i). One kept program (not a
  handful of small eager ones); PRNGKey(seed) of a seed in [0, 2**32) is the raw key [0, seed]."""
  return _noise(np.asarray([0, seed], np.uint32), np.asarray(indices, np.uint32), shape=tuple(shape))


# On CPU, LLVM's default level spends 1-1.5 s on this program's unrolled threefry, level 1 a third of that; integer
# hashing and float ops without fast math give the same bits at every level, and the program runs once per batch
@persistent_jit(static_argnames=("shape",), cpu_options={"xla_backend_optimization_level": 1})
def _noise(key, indices, *, shape):
  return jnp.stack([jax.random.normal(jax.random.fold_in(key, indices[n]), shape, jnp.float32)
                    for n in range(indices.shape[0])])


@persistent_jit(static_argnames=("unet_config", "scheduler", "layout", "dtype", "hooks"))
def denoise(unet_params, noise, cond: unet.UNetCond, sched_state, guidance, hook_args=None, *, unet_config,
            scheduler, layout: RowLayout, dtype=jnp.float32, hooks=()):
  """Every scheduler step from `noise` [B, h, w, C]; returns (latents [B, h, w, C], aux).

  `cond` holds `layout.rows` rows per image (CFG: [uncond_0, cond_0, uncond_1, ...]), so a
  batch shard always holds both halves of its own images. `hooks` (static) and `hook_args`
  (per-row where batched) reach every UNet call.
  """

  def denoiser(x, t, i, state):
    eps, _ = unet.apply(unet_params, layout.broadcast(x), t, cond, config=unet_config, dtype=dtype, hooks=hooks,
                        implementation=sharding.attention_implementation(dtype),
                        hook_args=hook_args)
    return layout.guide(eps, guidance), state, {}

  return sample(denoiser, scheduler, sched_state, noise)


@persistent_jit(static_argnames=("config", "dtype"))
def decode(vae_params, latents, *, config, dtype):
  return vae.decode(vae_params, latents, config=config, dtype=dtype)


def place_params(models: DiffusionModels, adapter, mesh):
  """UNet and VAE params (and IP-Adapter layers) replicated over the mesh, done once per job list."""
  models = dataclasses.replace(models, unet_params=sharding.replicate(models.unet_params, mesh),
                               vae_params=sharding.replicate(models.vae_params, mesh))
  if adapter is not None:
    adapter = dataclasses.replace(adapter, layers=sharding.replicate(adapter.layers, mesh))
  return models, adapter


@dataclasses.dataclass
class Batch:
  prompts: list[str]
  negative_prompts: list[str | None]
  noise: np.ndarray  # [B, h, w, C]
  references: list | None = None      # per image: RGB PIL image or None (IP-Adapter)
  ip_scales: list[float] | None = None
  step_keys: np.ndarray | None = None  # [B, 2] per-image keys of a stochastic scheduler's step noise


def ip_rows(adapter: ip_adapter.IPAdapter, batch: Batch, layout: RowLayout) -> ip_adapter.IPAdapterRows:
  """IP-Adapter tokens and scales per UNet row (the uncond role gets the adapter's uncond tokens)."""
  n = len(batch.prompts)
  refs = batch.references or [None] * n
  have = [i for i, r in enumerate(refs) if r is not None]
  size = adapter.encoder_config.image_size
  pixels = np.zeros((n, size, size, 3), np.float32)
  if have:
    pixels[have] = ip_adapter.preprocess_references([refs[i] for i in have], adapter)
  cond, uncond = ip_adapter.image_tokens(adapter, jnp.asarray(pixels))
  present = jnp.asarray([r is not None for r in refs])
  cond = jnp.where(present[:, None, None], cond, 0.0)  # no reference: zero tokens, and scale 0 below
  uncond = jnp.where(present[:, None, None], uncond, 0.0)
  scales = jnp.asarray([(s if r is not None else 0.0) for r, s in zip(refs, batch.ip_scales or [0.0] * n)],
                       jnp.float32)
  tokens = {role: (uncond if role == layout.uncond else cond) for role in layout.roles}
  return ip_adapter.IPAdapterRows(layout.interleave(tokens), layout.broadcast(scales))


def run_batch(models: DiffusionModels, batch: Batch, options: GenerationOptions, mesh=None,
              adapter: ip_adapter.IPAdapter | None = None, hooks: Sequence = (),
              hook_inputs: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Generates one batch; returns (final latents [B, h, w, C], images [B, H, W, 3] in [-1, 1]).

  `hooks` (attention or H-space hooks, static) run in every UNet call with `hook_inputs` ({name: HookInputs}, whose
  rows are per image: each image's row is repeated into all of its UNet rows)."""
  options = options.for_model(models)
  h, w = options.height, options.width
  f = models.vae_scale_factor
  want = (h // f, w // f, models.unet_config.in_channels)
  if batch.noise.shape[1:] != want:
    raise ValueError(f"initial latents have shape {batch.noise.shape[1:]} per image (NHWC), expected {want} "
                     f"for {h}x{w}")
  dtype = jax.tree_util.tree_leaves(models.unet_params)[0].dtype
  sched = schedulers.from_name(options.scheduler, models.scheduler_config)
  state = sched.set_timesteps(options.steps)
  n = len(batch.prompts)
  mesh = mesh or sharding.data_mesh()
  if schedulers.stochastic(sched):
    if batch.step_keys is None:
      raise ValueError(f"scheduler {options.scheduler!r} adds noise every step: the batch needs step_keys")
    state = sched.with_keys(state, sharding.shard_jobs(np.asarray(batch.step_keys, np.uint32), mesh, n))
  pos = conditioning.encode_prompts(models, batch.prompts)
  layout = CFG if options.guidance > 1.0 else NO_CFG  # guidance <= 1: no unconditional rows at all
  embeds, pooled = {"cond": pos.embeds}, {"cond": pos.pooled}
  if layout.uncond:
    neg = conditioning.encode_negative(models, batch.negative_prompts, pos)
    embeds["uncond"], pooled["uncond"] = neg.embeds, neg.pooled
  cond = sharding.shard_jobs(conditioning.unet_cond(models, layout.interleave(embeds), layout.interleave(pooled),
                                                    h, w), mesh, n, layout.rows)
  noise = sharding.shard_jobs(jnp.asarray(batch.noise, jnp.float32), mesh, n)
  per_row = {name: HookInputs(v.params, jax.tree_util.tree_map(layout.broadcast, v.rows))
             for name, v in (hook_inputs or {}).items()}
  hooks = tuple(hooks)
  if adapter is not None:
    hooks += (ip_adapter.IPAdapterAttention(upcast=models.unet_config.upcast_attention),)
    per_row["ip_adapter"] = ip_adapter.hook_inputs(adapter, *ip_rows(adapter, batch, layout))
  hook_args = sharding.place_hook_inputs(per_row, mesh, n, layout.rows) if per_row else None
  params = sharding.replicate(models.unet_params, mesh)
  latents, _ = denoise(params, noise, cond, state, jnp.float32(options.guidance), hook_args,
                       unet_config=models.unet_config, scheduler=sched, layout=layout, dtype=dtype, hooks=hooks)
  vae_dtype = jax.tree_util.tree_leaves(models.vae_params)[0].dtype
  images = decode(sharding.replicate(models.vae_params, mesh), latents, config=models.vae_config, dtype=vae_dtype)
  return sharding.to_host(latents)[:n], sharding.to_host(images)[:n]


def job_inputs(job: Job, models: DiffusionModels, options: GenerationOptions,
               adapter: ip_adapter.IPAdapter | None = None,
               init_latents: np.ndarray | None = None) -> dict:
  """Everything that decides a text-to-image (or IP-Adapter) job's pixels: its record's fingerprinted inputs."""
  from kadiff_jax import records
  options = options.for_model(models)
  uses_adapter = adapter is not None and job.reference
  return {"model": str(models.source), "family": models.family.name,
          "dtype": str(jax.tree_util.tree_leaves(models.unet_params)[0].dtype),
          "options": dataclasses.asdict(options), "prompt": job.prompt,
          "negative_prompt": job.negative_prompt, "seed": job.seed, "index": job.index,
          "ip_adapter": adapter.source if uses_adapter else None,
          "reference_sha256": records.image_sha256(image_io.load_rgb(job.reference))
          if uses_adapter else None,
          "ip_scale": (adapter.default_scale if job.ip_scale is None else job.ip_scale) if uses_adapter else None,
          "init_latents_sha256": None if init_latents is None else records.array_sha256(init_latents)}


def generate(models: DiffusionModels, jobs: Sequence[Job], options: GenerationOptions, out_dir=None, *,
             init_latents: np.ndarray | None = None, batch_size: int | None = None, mesh=None,
             progress: bool = True, extra_metadata: dict[str, Any] | None = None,
             adapter: ip_adapter.IPAdapter | None = None,
             records: dict[str, dict] | None = None,
             batch_hooks: Callable[[Sequence[Job]], tuple[tuple, dict]] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Generates every job (batched, data-parallel), writing PNGs to `out_dir` if given.

  `init_latents` [N, h, w, C] replaces the seeded noise (NHWC). With `adapter`,
  jobs with a `reference` are conditioned on it through the IP-Adapter.
  `batch_hooks(jobs)` gives each batch's extra (hooks, hook inputs) for
  `run_batch` (e.g. RAG-Turbo's H-space injection of what each job retrieved).
  `records` ({id: record}) are written as `{id}.json` after each job's PNG.
  Returns (latents, uint8 images).
  """
  if adapter is None and any(j.reference for j in jobs):
    raise ValueError("jobs name reference images but no IP-Adapter is loaded (--ip-adapter and --image-encoder)")
  options = options.for_model(models)
  h, w = options.height, options.width
  f = models.vae_scale_factor
  shape = (h // f, w // f, models.unet_config.in_channels)
  if init_latents is not None and init_latents.shape != (len(jobs),) + shape:
    raise ValueError(f"init latents have shape {tuple(init_latents.shape)} (NHWC), expected "
                     f"{(len(jobs),) + shape} for {len(jobs)} images of {h}x{w}")
  mesh = mesh or sharding.data_mesh()
  models, adapter = place_params(models, adapter, mesh)  # once, not per batch
  bs = batch_size or max(mesh.size, min(len(jobs), 8))
  out = OutputDir(out_dir) if out_dir is not None else None
  all_latents, all_images = [], []
  bar = tqdm(total=len(jobs), unit="img", disable=not progress, desc="generate")
  for start in range(0, len(jobs), bs):
    chunk = list(jobs[start:start + bs])
    noise = (init_latents[start:start + bs] if init_latents is not None
             else np.concatenate([np.asarray(initial_noise(j.seed, [j.index], shape)) for j in chunk]))
    refs = scales = None
    if adapter is not None:
      refs = [image_io.load_rgb(j.reference) if j.reference else None for j in chunk]
      scales = [adapter.default_scale if j.ip_scale is None else j.ip_scale for j in chunk]
    batch = Batch([j.prompt for j in chunk], [j.negative_prompt for j in chunk], np.asarray(noise), refs, scales,
                  step_keys([(j.seed, j.index) for j in chunk]))
    hooks, hook_inputs = batch_hooks(chunk) if batch_hooks else ((), None)
    latents, images = run_batch(models, batch, options, mesh, adapter, hooks, hook_inputs)
    images = image_io.to_uint8(images)
    if out is not None and sharding.is_writer():
      for j, img in zip(chunk, images):
        meta = {"prompt": j.prompt, "negative_prompt": j.negative_prompt or "", "seed": str(j.seed),
                "index": str(j.index), **({"reference": j.reference, "ip_adapter": adapter.source,
                                            "ip_scale": str(adapter.default_scale if j.ip_scale is None
                                                            else j.ip_scale)} if adapter and j.reference else {}),
                "kadiff": {"model": str(models.source), "family": models.family.name,
                           **dataclasses.asdict(options), **(extra_metadata or {})}}
        out.write_bytes(f"{j.id}.png", image_io.png_bytes(img, meta))
        if records and j.id in records:
          out.write_text(f"{j.id}.json", json.dumps(records[j.id], indent=1, default=str))
    all_latents.append(latents)
    all_images.append(images)
    bar.update(len(chunk))
  bar.close()
  return np.concatenate(all_latents), np.concatenate(all_images)
