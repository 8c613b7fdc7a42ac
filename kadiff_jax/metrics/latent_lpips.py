"""E-LatentLPIPS (Kang et al. 2024) in JAX: LPIPS computed on VAE latents, the training loss of HSPACE_SPEC §6.

The trunk is torchvision's VGG16-BN `features` with its first convolution
taking the latent's channels and its first three max-pools removed; the five
taps are the outputs of its five slices (features 0-6, 7-13, 14-23, 24-33,
34-43: relu1_2, relu2_2, relu3_3, then relu4_3 and relu5_3 each after their
max-pool). Batch norms run in inference form. As LPIPS:

  d(z0, z1) = mean|z0 - z1| + Σ_l mean_hw(w_l · (n0_l - n1_l)²),  n = f / sqrt(Σ_c f² + 1e-8)

with the calibrated 1x1 heads w_l. Inputs are latents as the UNet sees them
(scaled by the VAE factor), NHWC. The weights are the elatentlpips release's
`{sd15,sd21,sdxl}_latest_vgg16_tuned.pth` (one state dict with `net.sliceN.*`
and `linK.model.*.weight`, also under `lins.K`), not bundled and not downloadable here.

"Ensembled" (the E): both inputs go through the same random augmentation
before the trunk. The release uses ADA's filtered geometric pipeline; ours
(`augment`) is simpler and says so: a random x-flip, a random quarter-turn, a
random integer translation of up to 1/8 of the side (wrapping), and a cutout
of a half-side square, drawn per sample and shared by the pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.weights import convert, files

# torchvision vgg16_bn `features`: (index of the conv, out channels); BN at index + 1, ReLU at + 2
CONVS = ((0, 64), (3, 64), (7, 128), (10, 128), (14, 256), (17, 256), (20, 256), (24, 512), (27, 512), (30, 512),
         (34, 512), (37, 512), (40, 512))
SLICES = ((0, 6), (7, 13), (14, 23), (24, 33), (34, 43))   # inclusive feature indices of each slice
POOLS = (33, 43)                                           # the max-pools the latent trunk keeps
CHANNELS = (64, 128, 256, 512, 512)
BN_EPS = 1e-5


def _slice_of(index: int) -> tuple[int, int]:
  """(slice number 1-5, index within the slice) of a features index (the release's state-dict names)."""
  for n, (lo, hi) in enumerate(SLICES, 1):
    if lo <= index <= hi:
      return n, index
  raise ValueError(index)


def features(params, x) -> list[jax.Array]:
  """The five taps of the latent VGG16-BN trunk for latents x [B, h, w, C]."""
  outs = []
  for i, _ in CONVS:
    p = params[f"conv{i}"]
    x = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    bn = params[f"bn{i + 1}"]
    x = jax.nn.relu((x - bn["mean"]) * jax.lax.rsqrt(bn["var"] + BN_EPS) * bn["scale"] + bn["bias"])
    end = {5: 6, 12: 13, 22: 23, 32: 33, 42: 43}.get(i + 2)
    if end is not None:
      if end in POOLS:
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
      outs.append(x)
  return outs


def distance(params, z0, z1) -> jax.Array:
  """E-LatentLPIPS [B] between latent batches [B, h, w, C] (no augmentation; see `augment`)."""
  z0, z1 = z0.astype(jnp.float32), z1.astype(jnp.float32)
  total = jnp.mean(jnp.abs(z0 - z1), axis=(1, 2, 3))
  unit = lambda f: f / jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-8)
  for k, (a, b) in enumerate(zip(features(params, z0), features(params, z1))):
    total = total + jnp.mean(jnp.sum(params[f"lin{k}"] * (unit(a) - unit(b)) ** 2, axis=-1), axis=(1, 2))
  return total


def augment(key: jax.Array, z0: jax.Array, z1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The same random flip, quarter-turn, wrapped translation and cutout for both [B, h, w, C] batches (square)."""
  b, h, w, _ = z0.shape
  if h != w:
    raise ValueError(f"latent LPIPS augmentation needs square latents, got {h}x{w}")
  kf, kr, kt, kc = jax.random.split(key, 4)
  flip = jax.random.bernoulli(kf, 0.5, (b,))
  turns = jax.random.randint(kr, (b,), 0, 4)
  shift = jax.random.randint(kt, (b, 2), -(h // 8), h // 8 + 1)
  centre = jax.random.randint(kc, (b, 2), 0, h)
  yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")

  def one(x, f, r, s, c):
    x = jnp.where(f, x[:, ::-1], x)
    x = jax.lax.switch(r, [lambda a, k=k: jnp.rot90(a, k, axes=(0, 1)) for k in range(4)], x)
    x = jnp.roll(x, (s[0], s[1]), axis=(0, 1))
    keep = (jnp.abs(yy - c[0]) >= h // 4) | (jnp.abs(xx - c[1]) >= w // 4)
    return x * keep[..., None]

  pair = jax.vmap(one)
  return pair(z0, flip, turns, shift, centre), pair(z1, flip, turns, shift, centre)


def load(path: str | Path, latent_channels: int = 4) -> dict[str, Any]:
  """Params from the elatentlpips release's tuned state dict (trunk + heads), checked strictly."""
  path = Path(path)
  if not path.is_file():
    raise files.CheckpointNotFound(f"latent LPIPS weights {path} do not exist")
  state = files.read_safetensors(path) if path.suffix == ".safetensors" else files.read_torch_bin(path)
  if not isinstance(state, dict):
    raise convert.WeightsError(f"{path}: expected a state dict of tensors")
  state = {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in state.items()}
  params: dict[str, Any] = {}

  def take(key, shape):
    v = state.pop(key, None)
    if v is None or v.shape != shape:
      raise convert.WeightsError(f"{path}: {key} should have shape {shape} (E-LatentLPIPS VGG16-BN, "
                                 f"{latent_channels} latent channels), got {None if v is None else v.shape}")
    return jnp.asarray(v)

  cin = latent_channels
  for i, cout in CONVS:
    n, _ = _slice_of(i)
    w = take(f"net.slice{n}.{i}.weight", (cout, cin, 3, 3))
    params[f"conv{i}"] = {"kernel": w.transpose(2, 3, 1, 0), "bias": take(f"net.slice{n}.{i}.bias", (cout,))}
    bn = f"net.slice{n}.{i + 1}"
    params[f"bn{i + 1}"] = {"scale": take(f"{bn}.weight", (cout,)), "bias": take(f"{bn}.bias", (cout,)),
                            "mean": take(f"{bn}.running_mean", (cout,)), "var": take(f"{bn}.running_var", (cout,))}
    state.pop(f"{bn}.num_batches_tracked", None)
    cin = cout
  for k, c in enumerate(CHANNELS):
    key = f"lin{k}.model.0.weight" if f"lin{k}.model.0.weight" in state else f"lin{k}.model.1.weight"  # no dropout
    params[f"lin{k}"] = take(key, (1, c, 1, 1)).reshape(c)
    alias = state.pop(key.replace(f"lin{k}.", f"lins.{k}."), None)  # the package's ModuleList of the same heads
    if alias is not None and not np.array_equal(alias.reshape(c), np.asarray(params[f"lin{k}"])):
      raise convert.WeightsError(f"{path}: lins.{k} and lin{k} differ (they are one module in E-LatentLPIPS)")
  if state:
    raise convert.WeightsError(f"{path}: unexpected keys {sorted(state)[:4]} (not an E-LatentLPIPS state dict)")
  return params
