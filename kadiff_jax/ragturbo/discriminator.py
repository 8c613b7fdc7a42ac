"""The discriminator of ImageRAGTurbo's training (HSPACE_SPEC §6, choice Q8): the frozen teacher UNet's encoder
with trainable projection heads.

Latents z_s (real: the data's z0 noised to step s; fake: the student's ẑ0
noised with the same ε) go through the teacher's encoder conditioned on τ(p)
and s; after each chosen stage (default: every down block and the mid block)
a head reads the stage's feature map:

    f = SiLU(GroupNorm(SN-conv3x3(x)));  D_k = mean_hw(SN-conv1x1(f)) + <mean_hw(f), W_text · text_key>

The second term is a projection discriminator's condition on the pooled text.
SN is spectral normalisation (Miyato et al.): each conv kernel, seen as an
[out, in·k·k] matrix, is divided by its largest singular value, estimated by
one power iteration per discriminator update; the iteration's vector `u`
is state beside the params, not a param. Heads are pure functions of
(params, sn_state), so the train step stays one jitted function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kadiff_jax.models import unet

DEFAULT_STAGES = ("down_blocks.*", "mid_block")


def stage_names(config: unet.UNetConfig, stages=DEFAULT_STAGES) -> tuple[str, ...]:
  every = [f"down_blocks.{i}" for i in range(config.num_blocks)] + ["mid_block"]
  import fnmatch
  chosen = tuple(n for n in every if any(fnmatch.fnmatchcase(n, s) for s in stages))
  if not chosen:
    raise ValueError(f"disc_stages {list(stages)} select no encoder stage; expected names among {every}")
  return chosen


def stage_channels(config: unet.UNetConfig, name: str) -> int:
  return config.block_out_channels[-1] if name == "mid_block" else config.block_out_channels[int(name.split(".")[1])]


def init(config: unet.UNetConfig, text_dim: int, key: jax.Array, stages=DEFAULT_STAGES) -> tuple[dict, dict]:
  """(params, sn_state) of one head per stage of the teacher encoder `config`."""
  params, state = {}, {}
  for i, name in enumerate(stage_names(config, stages)):
    c = stage_channels(config, name)
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.fold_in(key, i), 5)
    params[name] = {
        "conv1": {"kernel": jax.random.normal(k1, (3, 3, c, c)) * (2.0 / (9 * c)) ** 0.5, "bias": jnp.zeros((c,))},
        "norm": {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))},
        "conv2": {"kernel": jax.random.normal(k2, (1, 1, c, 1)) * (1.0 / c) ** 0.5, "bias": jnp.zeros((1,))},
        "text": {"kernel": jax.random.normal(k3, (text_dim, c)) * (1.0 / text_dim) ** 0.5},
    }
    state[name] = {"conv1": _unit(jax.random.normal(k4, (c,))), "conv2": _unit(jax.random.normal(k5, (1,)))}
  return params, state


def _unit(v):
  return v / jnp.maximum(jnp.linalg.norm(v), 1e-12)


def spectral_normalize(kernel: jax.Array, u: jax.Array, update: bool) -> tuple[jax.Array, jax.Array]:
  """(kernel / σ, u'): σ from one power iteration started at u (u' = u when not `update`); gradients flow through
  the kernel in σ, not through u and v (as torch's spectral_norm)."""
  w = kernel.reshape(-1, kernel.shape[-1]).T  # [out, in * k * k]
  u = jax.lax.stop_gradient(u)
  v = _unit(w.T @ u)
  if update:
    u = _unit(w @ v)
  u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
  sigma = u @ (w @ v)
  return kernel / sigma, u


def _conv(x, kernel, bias):
  k = kernel.shape[0] // 2
  y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), ((k, k), (k, k)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias.astype(x.dtype)


def _group_norm(x, scale, bias, groups: int, eps: float = 1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
  return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def head(params, state, x, text, groups: int, update: bool):
  """One head: D_k [B] of a stage's features x [B, h, w, c] and text keys [B, D]; returns (logits, state')."""
  k1, u1 = spectral_normalize(params["conv1"]["kernel"], state["conv1"], update)
  k2, u2 = spectral_normalize(params["conv2"]["kernel"], state["conv2"], update)
  f = jax.nn.silu(_group_norm(_conv(x.astype(jnp.float32), k1, params["conv1"]["bias"]), params["norm"]["scale"],
                              params["norm"]["bias"], groups))
  logits = jnp.mean(_conv(f, k2, params["conv2"]["bias"]), axis=(1, 2, 3))
  projection = jnp.sum(jnp.mean(f, axis=(1, 2)) * (text @ params["text"]["kernel"]), axis=-1)
  return logits + projection, {"conv1": u1, "conv2": u2}


def apply(params, state, teacher_params, z_s, s, cond: unet.UNetCond, text, *, config: unet.UNetConfig,
          update: bool = False, dtype=jnp.float32) -> tuple[dict[str, jax.Array], dict]:
  """D_k(z_s) [B] per stage, and the spectral-norm state after this pass (advanced when `update`)."""
  feats = unet.encoder_features(teacher_params, z_s, s, cond, tuple(params), config=config, dtype=dtype)
  out, new_state = {}, {}
  for name in params:
    out[name], new_state[name] = head(params[name], state[name], feats[name], text.astype(jnp.float32),
                                      config.norm_num_groups, update)
  return out, new_state
