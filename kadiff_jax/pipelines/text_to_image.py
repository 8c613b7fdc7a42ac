"""SDXL text-to-image: the denoising loop as one jitted `lax.scan`, data-parallel.

Noise for image i of a job with seed s is `normal(fold_in(PRNGKey(s), i))`, so
an image's noise does not depend on how jobs are batched or sharded. The same
job run the same way gives bit-identical output; a different batch size can
change float rounding in XLA's matmuls (about 1e-6 relative on the latents).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kadiff_jax import image_io, schedulers, sharding
from kadiff_jax.models import unet, vae
from kadiff_jax.pipelines import conditioning
from kadiff_jax.weights.sdxl import SDXLModels


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
  steps: int = 50
  guidance: float = 5.0
  scheduler: str = "euler"
  height: int | None = None  # default: the UNet's sample_size x VAE factor (1024 for SDXL)
  width: int | None = None
  dtype: str = "fp32"

  def size(self, models: SDXLModels) -> tuple[int, int]:
    h = self.height or models.default_size
    w = self.width or models.default_size
    f = models.vae_scale_factor
    for name, v in (("height", h), ("width", w)):
      if v <= 0 or v % f:
        raise ValueError(f"{name}={v}: expected a positive multiple of {f} (the VAE's downsampling factor)")
    return h, w


DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def initial_noise(seed: int, indices: Sequence[int], shape: tuple[int, int, int]) -> jax.Array:
  """Per-image Gaussian noise [N, h, w, C]: image i uses fold_in(PRNGKey(seed), i)."""
  key = jax.random.PRNGKey(seed)
  return jnp.stack([jax.random.normal(jax.random.fold_in(key, int(i)), shape, jnp.float32) for i in indices])


@functools.partial(jax.jit, static_argnames=("unet_config", "scheduler", "do_cfg", "dtype"))
def denoise(unet_params, noise, cond: unet.UNetCond, sched_state, guidance, *, unet_config, scheduler,
            do_cfg: bool, dtype=jnp.float32):
  """Runs every scheduler step on `noise` [B, h, w, C].

  With CFG, `cond` has 2B rows interleaved per image, [neg_0, pos_0, neg_1, pos_1, ...],
  so a batch shard always holds both halves of its own images.
  """

  def body(x, i):
    t = sched_state.timesteps[i]
    xin = scheduler.scale_model_input(sched_state, i, x)
    if do_cfg:
      xin = jnp.repeat(xin, 2, axis=0)  # [2B, h, w, C]
    eps, _ = unet.apply(unet_params, xin, t, cond, config=unet_config, dtype=dtype)
    eps = eps.astype(jnp.float32)
    if do_cfg:
      eps = eps.reshape((-1, 2) + eps.shape[1:])  # [B, 2, h, w, C]
      eps = eps[:, 0] + guidance * (eps[:, 1] - eps[:, 0])
    return scheduler.step(sched_state, i, x, eps), None

  x0 = noise * scheduler.init_noise_sigma(sched_state)
  latents, _ = jax.lax.scan(body, x0, jnp.arange(sched_state.timesteps.shape[0]))
  return latents


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def decode(vae_params, latents, *, config, dtype):
  return vae.decode(vae_params, latents, config=config, dtype=dtype)


@dataclasses.dataclass
class Batch:
  prompts: list[str]
  negative_prompts: list[str | None]
  noise: np.ndarray  # [B, h, w, C]


def run_batch(models: SDXLModels, batch: Batch, options: GenerationOptions, mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """Generates one batch; returns (final latents [B, h, w, C], images [B, H, W, 3] in [-1, 1])."""
  h, w = options.size(models)
  f = models.vae_scale_factor
  want = (h // f, w // f, models.unet_config.in_channels)
  if batch.noise.shape[1:] != want:
    raise ValueError(f"initial latents have shape {batch.noise.shape[1:]} per image (NHWC), expected {want} "
                     f"for {h}x{w}")
  dtype = compute_dtype(options.dtype)
  sched = schedulers.from_name(options.scheduler, models.scheduler_config)
  state = sched.set_timesteps(options.steps)
  n = len(batch.prompts)
  pos = conditioning.encode_prompts(models, batch.prompts)
  do_cfg = options.guidance > 1.0
  ids = conditioning.time_ids(h, w, n)
  if do_cfg:
    neg = conditioning.encode_negative(models, batch.negative_prompts, pos)
    pairs = [(neg.embeds, pos.embeds), (neg.pooled, pos.pooled), (ids, ids)]
    rows = [jnp.stack(p, axis=1).reshape((2 * n,) + p[0].shape[1:]) for p in pairs]  # [neg_i, pos_i] per image
  else:
    rows = [pos.embeds, pos.pooled, ids]
  mesh = mesh or sharding.data_mesh()
  padded = sharding.padded_size(n, mesh)
  noise = sharding.shard_batch(_pad_rows(jnp.asarray(batch.noise, jnp.float32), n, padded, 1), mesh)
  cond = unet.UNetCond(*[sharding.shard_batch(_pad_rows(r, n, padded, 2 if do_cfg else 1), mesh) for r in rows])
  params = sharding.replicate(models.unet_params, mesh)
  latents = denoise(params, noise, cond, state, jnp.float32(options.guidance), unet_config=models.unet_config,
                    scheduler=sched, do_cfg=do_cfg, dtype=dtype)
  vae_dtype = jax.tree_util.tree_leaves(models.vae_params)[0].dtype
  images = decode(sharding.replicate(models.vae_params, mesh), latents, config=models.vae_config, dtype=vae_dtype)
  return np.asarray(latents)[:n], np.asarray(images)[:n]


def _pad_rows(rows, n: int, padded: int, per_image: int):
  """Pads a batch of n images (per_image rows each) to `padded` images by repeating the last."""
  if padded == n:
    return rows
  last = rows[-per_image:]
  return jnp.concatenate([rows] + [last] * (padded - n))


@dataclasses.dataclass(frozen=True)
class ImageJob:
  """One image to make: its prompt, negative prompt, seed and index within the seed."""

  prompt: str
  negative_prompt: str | None
  seed: int
  index: int

  def filename(self) -> str:
    return f"seed{self.seed}_{self.index:04d}.png"


def generate(models: SDXLModels, jobs: Sequence[ImageJob], options: GenerationOptions, out_dir=None, *,
             init_latents: np.ndarray | None = None, batch_size: int | None = None, mesh=None,
             progress: bool = True, extra_metadata: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Generates every job (batched, data-parallel), writing PNGs to `out_dir` if given.

  `init_latents` [N, h, w, C] replaces the seeded noise (NHWC). Returns (latents, uint8 images).
  """
  h, w = options.size(models)
  f = models.vae_scale_factor
  shape = (h // f, w // f, models.unet_config.in_channels)
  if init_latents is not None and init_latents.shape != (len(jobs),) + shape:
    raise ValueError(f"init latents have shape {tuple(init_latents.shape)} (NHWC), expected "
                     f"{(len(jobs),) + shape} for {len(jobs)} images of {h}x{w}")
  mesh = mesh or sharding.data_mesh()
  bs = batch_size or max(mesh.size, min(len(jobs), 8))
  all_latents, all_images = [], []
  bar = tqdm(total=len(jobs), unit="img", disable=not progress, desc="generate")
  for start in range(0, len(jobs), bs):
    chunk = list(jobs[start:start + bs])
    noise = (init_latents[start:start + bs] if init_latents is not None
             else np.concatenate([np.asarray(initial_noise(j.seed, [j.index], shape)) for j in chunk]))
    latents, images = run_batch(models, Batch([j.prompt for j in chunk], [j.negative_prompt for j in chunk],
                                              np.asarray(noise)), options, mesh)
    images = image_io.to_uint8(images)
    if out_dir is not None:
      for j, img in zip(chunk, images):
        meta = {"prompt": j.prompt, "negative_prompt": j.negative_prompt or "", "seed": str(j.seed),
                "index": str(j.index), "kadiff": {"model": str(models.source), **dataclasses.asdict(options),
                                                  "height": h, "width": w, **(extra_metadata or {})}}
        image_io.write_png(f"{out_dir}/{j.filename()}", img, meta)
    all_latents.append(latents)
    all_images.append(images)
    bar.update(len(chunk))
  bar.close()
  return np.concatenate(all_latents), np.concatenate(all_images)
