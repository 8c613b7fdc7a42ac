"""LPIPS (Zhang et al. 2018, v0.1) with an AlexNet backbone, in JAX, loading the public weights.

d(x0, x1) = sum over the five ReLU outputs l of mean_{h,w} sum_c w_l[c] (n0 - n1)^2, where n = f / (|f|_c + 1e-10)
is the channel-normalised feature of the input after LPIPS's scaling layer ((x - shift) / scale, x in [-1, 1]).
The backbone is torchvision's AlexNet `features` (state dict keys `features.{0,3,6,8,10}.weight/bias`, e.g.
`alexnet-owt-7be5be79.pth`); the linear heads are the lpips package's `weights/v0.1/alex.pth`
(`lin{k}.model.1.weight` [1, C, 1, 1]). Images are NHWC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.weights import convert, files

SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# torchvision AlexNet `features`: (index, out channels, kernel, stride, padding, max-pool before it)
ALEXNET = ((0, 64, 11, 4, 2, False), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, True), (8, 256, 3, 1, 1, False),
           (10, 256, 3, 1, 1, False))


def _max_pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def alexnet_features(params, x) -> list[jax.Array]:
  """The five ReLU outputs (relu1..relu5) of AlexNet's features for x [B, H, W, 3]."""
  outs = []
  for i, _, k, stride, pad, pool in ALEXNET:
    if pool:
      x = _max_pool(x)
    p = params[f"conv{i}"]
    x = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + p["bias"])
    outs.append(x)
  return outs


@jax.jit
def distance(params, x0, x1) -> jax.Array:
  """LPIPS [B] between image batches x0, x1 [B, H, W, 3] in [-1, 1]."""
  scale = lambda x: (x.astype(jnp.float32) - SHIFT) / SCALE
  f0, f1 = alexnet_features(params, scale(x0)), alexnet_features(params, scale(x1))
  unit = lambda f: f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
  total = 0.0
  for k, (a, b) in enumerate(zip(f0, f1)):
    total = total + jnp.mean(jnp.sum(params[f"lin{k}"] * (unit(a) - unit(b)) ** 2, axis=-1), axis=(1, 2))
  return total


def _read(path: Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise files.CheckpointNotFound(f"LPIPS weights {path} do not exist")
  state = files.read_safetensors(path) if path.suffix == ".safetensors" else files.read_torch_bin(path)
  if not isinstance(state, dict):
    raise convert.WeightsError(f"{path}: expected a state dict of tensors")
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def load(backbone: str | Path, lin: str | Path) -> dict[str, Any]:
  """LPIPS params from torchvision AlexNet weights and the lpips v0.1 linear heads, checked strictly."""
  net, heads = _read(Path(backbone)), _read(Path(lin))
  params: dict[str, Any] = {}
  cin = 3
  for i, cout, k, *_ in ALEXNET:
    w, b = net.pop(f"features.{i}.weight", None), net.pop(f"features.{i}.bias", None)
    if w is None or b is None or w.shape != (cout, cin, k, k) or b.shape != (cout,):
      got = None if w is None else w.shape
      raise convert.WeightsError(f"{backbone}: features.{i} should be a {cout}x{cin}x{k}x{k} convolution with bias "
                                 f"(torchvision AlexNet), got weight {got}")
    params[f"conv{i}"] = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)), "bias": jnp.asarray(b)}
    cin = cout
  extra = [key for key in net if key.startswith("features.")]
  if extra:
    raise convert.WeightsError(f"{backbone}: unexpected backbone keys {extra[:4]} (not AlexNet's features)")
  for k, (_, cout, *_) in enumerate(ALEXNET):
    w = heads.pop(f"lin{k}.model.1.weight", None)
    if w is None or w.shape != (1, cout, 1, 1):
      raise convert.WeightsError(f"{lin}: lin{k}.model.1.weight should be [1, {cout}, 1, 1] (lpips v0.1 alex), got "
                                 f"{None if w is None else w.shape}")
    params[f"lin{k}"] = jnp.asarray(w.reshape(cout))
  if heads:
    raise convert.WeightsError(f"{lin}: unexpected keys {sorted(heads)[:4]} (lpips v0.1 alex heads only)")
  return params


def load_named(backbone: str | None, lin: str | None = None) -> dict[str, Any] | None:
  """LPIPS params from `backbone` and `lin` files, or "tiny" (random weights in the same layouts, made in the
  cache on first use, for offline runs); None when neither is given."""
  if backbone is None and lin is None:
    return None
  if backbone == "tiny":
    from kadiff_jax.tiny_model import tiny_part
    folder = tiny_part("lpips")
    return load(folder / "alexnet.safetensors", folder / "alex.safetensors")
  if backbone is None or lin is None:
    raise ValueError("LPIPS needs both weight files: the AlexNet backbone (torchvision's alexnet-owt-7be5be79.pth) "
                     "and the lpips package's weights/v0.1/alex.pth")
  return load(backbone, lin)
