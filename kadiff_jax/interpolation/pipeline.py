"""Text interpolation (AID, and PAID with a guide prompt; spec 1-3, 7) over the one sampler.

One interpolation is one group of frame rows [A, M_1 ... M_k, B] per role (`frames_layout`): the
release's one call of three rows per middle (quirk Q3), batched, with identical frames. Per step,
the conditional rows attend through `InterpolatedAttention` while i < W (the warm-up, W =
int(steps * warmup_ratio) in Python floats: quirk Q5); the unconditional rows always attend plainly
(quirk Q4); eps = u + g (c - u); one scheduler step. A middle row's prompt, negative and pooled
embeddings are lerp (or slerp) of the endpoints' (or, for PAID, the guide prompt's), its initial
latents the slerp of the endpoints' along the release's axis (quirk Q2).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax import image_io, schedulers, sharding
from kadiff_jax.config import option
from kadiff_jax.interpolation.attention import (VARIANTS, InterpolatedAttention, InterpolatedIPAdapter,
                                               InterpolationArgs, MorphRows)
from kadiff_jax.interpolation.blend import blend, slerp
from kadiff_jax.models import ip_adapter, unet
from kadiff_jax.models.attention import HookInputs
from kadiff_jax.pipelines import conditioning
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.programs import persistent_jit
from kadiff_jax.sampling import RowLayout, sample


@dataclasses.dataclass(frozen=True)
class InterpolationOptions:
  """Defaults: the release's `interpolate_single` (spec 7)."""

  variant: str = option("fused_outer", "interpolated attention: fused outer (the release's), fused inner, outer "
                        "or inner", choices=VARIANTS)
  warmup_ratio: float = option(0.5, "fraction of the steps with interpolated attention: W = int(steps * ratio)")
  warmup_steps: int | None = option(None, "Q5: W itself, instead of int(steps * warmup_ratio)")
  init: str = option("linear", "how the middle frames' prompt embeddings are interpolated",
                     choices=("linear", "slerp"))
  slerp_axes: str = option("last", "Q2: slerp along the last axis (the release's: per latent row, per token) or "
                           "over the whole tensor", choices=("last", "all"))
  interp_uncond: bool = option(False, "Q4: interpolate in the unconditional rows too (the release: conditional only)")
  ip_scale: float = option(1.0, "Q6: image-branch scale of morphing (the release fixes every adapter scale at 1.0; "
                           "scale control uses the coefficients instead)")
  steps: int = option(50, "denoising steps")
  guidance: float = option(5.0, "classifier-free guidance (<= 1: conditional rows only)")
  scheduler: str | None = option(None, "default: the model folder's scheduler where implemented, else ddim",
                                 choices=tuple(schedulers.SCHEDULERS))
  height: int | None = option(None, "image height; default: the UNet's sample_size x VAE factor")
  width: int | None = option(None, "image width; default as height")

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r}: expected one of {VARIANTS}")
    if self.init not in ("linear", "slerp"):
      raise ValueError(f"init={self.init!r}: expected 'linear' or 'slerp'")
    if self.slerp_axes not in ("last", "all"):
      raise ValueError(f"slerp_axes={self.slerp_axes!r}: expected 'last' or 'all'")
    if not 0 <= self.warmup_ratio <= 1:
      raise ValueError(f"warmup_ratio={self.warmup_ratio}: expected a fraction in [0, 1]")
    if self.steps < 1:
      raise ValueError(f"steps={self.steps}: expected at least 1")
    if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
      raise ValueError(f"warmup_steps={self.warmup_steps}: expected 0..steps ({self.steps})")

  def warmup(self) -> int:
    """W: the first W denoising steps interpolate (int(N * r) in Python floats, as the release)."""
    return self.warmup_steps if self.warmup_steps is not None else int(self.steps * self.warmup_ratio)

  def generation(self, models) -> t2i.GenerationOptions:
    """Steps, guidance, scheduler and size resolved for the model."""
    return t2i.GenerationOptions(self.steps, self.guidance, self.scheduler, self.height, self.width).for_model(models)


def frames_layout(frames: int, guidance: float) -> RowLayout:
  """One interpolation's rows: every role holds the frames in order (A first, B last)."""
  if guidance > 1.0:
    return RowLayout(("uncond", "cond"), "cond", "uncond", group=frames)
  return RowLayout(("cond",), "cond", group=frames)


class Interpolation(NamedTuple):
  coefficients: list[float]  # per frame, 0 (A) ... 1 (B)
  images: np.ndarray         # [frames, H, W, 3] uint8
  latents: np.ndarray | None  # [frames, h, w, C] final latents (None: frames gathered from several calls)


MODES = ("text", "morph", "scale-control")


@persistent_jit(static_argnames=("unet_config", "scheduler", "layout", "dtype", "variant", "interp_uncond", "mode"))
def interpolation_denoise(unet_params, noise, cond, sched_state, guidance, coefs, warmup, image=None, *, unet_config,
                          scheduler, layout: RowLayout, dtype, variant: str, interp_uncond: bool, mode: str = "text"):
  """Every step from noise [G * frames, h, w, C] (G interpolations); coefs [G * frames]; warmup: the traced W;
  `image` (morph and scale control): HookInputs(IP-Adapter layers, IPAdapterRows of tokens and scales per row).
  Returns final latents."""
  coef_rows = layout.broadcast(coefs)
  groups = noise.shape[0] // layout.group
  role_on = layout.interleave({r: jnp.full((groups * layout.count(r),), r == layout.cond or interp_uncond)
                               for r in layout.roles})
  hooks = [InterpolatedAttention(layout, variant)]
  if mode == "scale-control":  # every row adds c_r Attn(q, Kip_B, Vip_B): the plain hook with scale c_r
    hooks.append(ip_adapter.IPAdapterAttention(upcast=unet_config.upcast_attention))
  elif mode == "morph":
    hooks.append(InterpolatedIPAdapter(layout, variant, upcast=unet_config.upcast_attention))

  def denoiser(x, t, i, state):
    on = role_on & (i < warmup)
    args = {"interpolation": InterpolationArgs(coef_rows, on)}
    if mode == "scale-control":
      args["ip_adapter"] = image
    elif mode == "morph":
      args["ip_morph"] = HookInputs(image.params, MorphRows(image.rows.tokens, image.rows.scale, coef_rows, on))
    eps, _ = unet.apply(unet_params, layout.broadcast(x), t, cond, config=unet_config, dtype=dtype,
                        hooks=tuple(hooks), hook_args=args, implementation=sharding.attention_implementation(dtype))
    return layout.guide(eps, guidance), state, {}

  latents, _ = sample(denoiser, scheduler, sched_state, noise)
  return latents


def endpoint_noise(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
  """z_A, z_B [2, h, w, C]: images 0 and 1 of the seed (`text_to_image.image_key`), drawn A then B."""
  return np.asarray(t2i.initial_noise(seed, [0, 1], shape))


def image_rows(adapter, mode: str, layout: RowLayout, ts: Sequence[float], image_a, image_b,
               options: InterpolationOptions) -> HookInputs:
  """The image branch's inputs per UNet row (spec 4). Morph: each frame's tokens from the endpoints' image features
  interpolated before the projection (A's are the unconditional ones without `image_a`), scale `ip_scale`.
  Scale control: every row reads B's image, scaled by its coefficient. Unconditional rows: unconditional tokens."""
  if image_b is None:
    raise ValueError(f"mode {mode!r} needs image_b (the end frame's image)")
  if mode == "scale-control" and image_a is not None:
    raise ValueError("scale control reads B's image only; image_a is for morphing")
  given = [im for im in (image_a, image_b) if im is not None]
  feats, uncond = ip_adapter.image_features(adapter, jnp.asarray(ip_adapter.preprocess_references(given, adapter)))
  f_b = feats[-1]
  f_a = feats[0] if image_a is not None else uncond[0]
  u = ip_adapter.project_features(adapter, uncond[:1])[0]
  if mode == "morph":
    axis = -1 if options.slerp_axes == "last" else None
    per_frame = jnp.stack([f_a, *[blend(options.init, f_a, f_b, t, axis) for t in ts[1:-1]], f_b])
    cond_tokens = ip_adapter.project_features(adapter, per_frame)
    scale = jnp.full((layout.rows,), options.ip_scale, jnp.float32)
  else:
    cond_tokens = jnp.broadcast_to(ip_adapter.project_features(adapter, f_b[None])[0], (len(ts),) + u.shape)
    scale = layout.broadcast(jnp.asarray(ts, jnp.float32))
  tokens = {r: cond_tokens if r == "cond" else jnp.broadcast_to(u, cond_tokens.shape) for r in layout.roles}
  return ip_adapter.hook_inputs(adapter, layout.interleave(tokens), scale)


class Request(NamedTuple):
  """One interpolation of a batch (`interpolate_many`)."""

  prompt_a: str
  prompt_b: str
  guide_prompt: str | None = None
  negative_prompt: str | None = None
  seed: int = 0
  init_latents: np.ndarray | None = None  # [2, h, w, C] NHWC, before init_noise_sigma
  image_a: object = None                  # PIL images for morph / scale control
  image_b: object = None


def _group_inputs(models, req: Request, ts: list[float], options: InterpolationOptions, gen, layout: RowLayout,
                  shape, mode: str, adapter):
  """One interpolation's rows: (noise [n, h, w, C], embeds [rows, L, D], pooled [rows, P], image HookInputs or
  None, step keys [n, 2])."""
  z = endpoint_noise(req.seed, shape) if req.init_latents is None else np.asarray(req.init_latents, np.float32)
  if z.shape != (2,) + shape:
    raise ValueError(f"init latents have shape {tuple(z.shape)} (NHWC), expected {(2,) + shape} (start and end) "
                     f"for {gen.height}x{gen.width}")
  axis_latent = -2 if options.slerp_axes == "last" else None  # NCHW's last axis (W) is NHWC's -2
  axis_embed = -1 if options.slerp_axes == "last" else None
  noise = np.stack([z[0], *[np.asarray(slerp(z[0], z[1], t, axis_latent)) for t in ts[1:-1]], z[1]])
  ends = conditioning.encode_prompts(models, [req.prompt_a, req.prompt_b])
  neg = conditioning.encode_negative(models, [req.negative_prompt] * 2, ends)
  guide = conditioning.encode_prompts(models, [req.guide_prompt]) if req.guide_prompt is not None else None

  def frames_of(pair, middle=None):
    """[n, ...] from the endpoints' pair [2, ...]: middles blended, or the guide's value."""
    a, b = np.asarray(pair[0]), np.asarray(pair[1])
    mids = [np.asarray(middle) if middle is not None else np.asarray(blend(options.init, a, b, t, axis_embed))
            for t in ts[1:-1]]
    return np.stack([a, *mids, b])

  per_role = {"cond": (frames_of(ends.embeds, None if guide is None else guide.embeds[0]),
                       frames_of(ends.pooled, None if guide is None else guide.pooled[0]))}
  if layout.uncond:
    # PAID: the guide's negatives equal the endpoints' (one negative prompt), i.e. A's
    per_role["uncond"] = (frames_of(neg.embeds, None if guide is None else neg.embeds[0]),
                          frames_of(neg.pooled, None if guide is None else neg.pooled[0]))
  embeds = layout.interleave({r: v[0] for r, v in per_role.items()})
  pooled = layout.interleave({r: v[1] for r, v in per_role.items()})
  image = None if mode == "text" else image_rows(adapter, mode, layout, ts, req.image_a, req.image_b, options)
  return noise, embeds, pooled, image, t2i.step_keys([(req.seed, i) for i in range(len(ts))])


def interpolate_many(models, requests: Sequence[Request], coefs: Sequence[float], options: InterpolationOptions, *,
                     mode: str = "text", adapter=None, mesh=None) -> list[Interpolation]:
  """Several interpolations with the same coefficients in one pass: each is a group of frame rows, and the groups
  are split over the devices (whole groups per device; a device's middles read only its own endpoints)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}")
  if mode != "text" and adapter is None:
    raise ValueError(f"mode {mode!r} needs an IP-Adapter (--ip-adapter and --image-encoder)")
  if not requests:
    return []
  gen = options.generation(models)
  f = models.vae_scale_factor
  shape = (gen.height // f, gen.width // f, models.unet_config.in_channels)
  ts = [0.0, *[float(c) for c in coefs], 1.0]
  n, g = len(ts), len(requests)
  layout = frames_layout(n, gen.guidance)
  parts = [_group_inputs(models, r, ts, options, gen, layout, shape, mode, adapter) for r in requests]
  cat = lambda k: np.concatenate([np.asarray(p[k]) for p in parts])
  devices = jax.devices()
  mesh = mesh or sharding.data_mesh(devices[:min(g, len(devices))])  # one interpolation: one device, no padding
  per_frame = lambda a: sharding.shard_jobs(a, mesh, g, layout.group)
  per_row = lambda a: sharding.shard_jobs(a, mesh, g, layout.rows)
  cond = per_row(conditioning.unet_cond(models, cat(1), cat(2), gen.height, gen.width))
  image = None
  if mode != "text":
    image = HookInputs(sharding.replicate(parts[0][3].params, mesh),
                       per_row(jax.tree_util.tree_map(lambda *a: np.concatenate([np.asarray(x) for x in a]),
                                                      *[p[3].rows for p in parts])))
  sched = schedulers.from_name(gen.scheduler, models.scheduler_config)
  state = sched.set_timesteps(gen.steps)
  if schedulers.stochastic(sched):
    state = sched.with_keys(state, per_frame(cat(4)))
  dtype = jax.tree_util.tree_leaves(models.unet_params)[0].dtype
  latents = interpolation_denoise(
      sharding.replicate(models.unet_params, mesh), per_frame(cat(0)), cond, state, jnp.float32(gen.guidance),
      per_frame(np.tile(np.asarray(ts, np.float32), g)), jnp.int32(options.warmup()), image,
      unet_config=models.unet_config, scheduler=sched, layout=layout, dtype=dtype, variant=options.variant,
      interp_uncond=options.interp_uncond, mode=mode)
  vae_dtype = jax.tree_util.tree_leaves(models.vae_params)[0].dtype
  images = t2i.decode(sharding.replicate(models.vae_params, mesh), latents, config=models.vae_config, dtype=vae_dtype)
  latents, images = sharding.to_host(latents)[:g * n], image_io.to_uint8(sharding.to_host(images)[:g * n])
  return [Interpolation(ts, images[k * n:(k + 1) * n], latents[k * n:(k + 1) * n]) for k in range(g)]


def interpolate(models, prompt_a: str, prompt_b: str, coefs: Sequence[float], options: InterpolationOptions, *,
                negative_prompt: str | None = None, guide_prompt: str | None = None, seed: int = 0,
                init_latents: np.ndarray | None = None, mode: str = "text", adapter=None, image_a=None,
                image_b=None) -> Interpolation:
  """The frames from A (coefficient 0) through the middles `coefs` to B (1).

  `init_latents` [2, h, w, C] (NHWC) replaces the seeded endpoint noise; both are before the scheduler's
  init_noise_sigma. With `guide_prompt` (PAID) the middle frames take its embeddings instead. `mode` "morph"
  (between image_a and image_b) and "scale-control" (toward image_b) add the IP-Adapter `adapter` (spec 4).
  """
  request = Request(prompt_a, prompt_b, guide_prompt, negative_prompt, seed, init_latents, image_a, image_b)
  return interpolate_many(models, [request], coefs, options, mode=mode, adapter=adapter)[0]
