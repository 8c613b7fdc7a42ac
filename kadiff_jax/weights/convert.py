"""One strict converter between PyTorch state dicts and our param pytrees.

Names: a torch key such as `up_blocks.1.attentions.0.to_out.0.weight` becomes
the path ("up_blocks_1", "attentions_0", "to_out_0", "kernel"): list indices
join their container's name, and `weight` becomes `kernel` (Linear, Conv),
`scale` (norms) or `embedding` (Embedding) as the target module expects.
Layouts: Linear [out, in] -> [in, out]; Conv2d [out, in, kh, kw] ->
[kh, kw, in, out]; a 1x1 conv weight feeding a Linear is squeezed.

`torch_to_params` checks every key against the expected shapes (from
`jax.eval_shape`) and reports missing, unexpected and mis-shaped keys by name.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

# Module names that are nn.ModuleList / nn.Sequential in diffusers and transformers.
_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
               "upsamplers", "to_out", "net", "layers", "layer")
_TO_FLAX = re.compile(r"(?<![^.])(" + "|".join(_CONTAINERS) + r")\.(\d+)(?=\.|$)")
_TO_TORCH = re.compile(r"^(" + "|".join(_CONTAINERS) + r")_(\d+)$")


class WeightsError(ValueError):
  """A checkpoint does not fit the model: names the keys that are wrong."""


def torch_name_to_path(key: str) -> tuple[str, ...]:
  """`a.resnets.0.conv1.weight` -> ("a", "resnets_0", "conv1", "weight")."""
  return tuple(_TO_FLAX.sub(r"\1_\2", key).split("."))


def path_to_torch_module(path: Iterable[str]) -> str:
  """("a", "resnets_0", "conv1") -> "a.resnets.0.conv1"."""
  return ".".join(_TO_TORCH.sub(r"\1.\2", p) for p in path)


def _flatten(tree: Mapping[str, Any], prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def _to_flax_layout(leaf: str, array: np.ndarray, want_ndim: int) -> np.ndarray:
  if leaf != "kernel":
    return array
  if array.ndim == 4 and want_ndim == 2:  # 1x1 conv weight used as a Linear
    if array.shape[2:] != (1, 1):
      raise ValueError(f"cannot use a {array.shape[2]}x{array.shape[3]} conv weight as a Linear")
    array = array[:, :, 0, 0]
  if array.ndim == 2:
    return array.T
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def torch_to_params(state: Mapping[str, np.ndarray], expected: Mapping[str, Any], *, component: str,
                    renames: Iterable[tuple[str, str]] = (), ignore: Iterable[str] = (),
                    dtype=None) -> dict:
  """Converts a torch state dict (numpy arrays) into the param tree `expected`.

  `expected` is a pytree of arrays or ShapeDtypeStructs (e.g. from
  `jax.eval_shape`). `renames` are (regex, replacement) pairs applied to torch
  keys first (legacy names, prefixes); keys matching an `ignore` regex
  (buffers) are dropped. Raises WeightsError naming every missing,
  unexpected and mis-shaped key.
  """
  want = _flatten(expected)
  by_module: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {}
  for path in want:
    by_module.setdefault(path[:-1], {})[path[-1]] = path
  renames = [(re.compile(a), b) for a, b in renames]
  ignore = [re.compile(p) for p in ignore]
  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mis_shaped = [], []
  seen: set[tuple[str, ...]] = set()  # targets a key was found for, even if its shape was wrong
  for key, array in state.items():
    name = key
    for pat, rep in renames:
      name = pat.sub(rep, name)
    if any(p.search(name) for p in ignore):
      continue
    path = torch_name_to_path(name)
    module, leaf = path[:-1], path[-1]
    slots = by_module.get(module, {})
    if leaf == "weight":
      target = next((slots[s] for s in ("kernel", "scale", "embedding") if s in slots), None)
    else:
      target = slots.get(leaf)
    if target is None:
      unexpected.append(key)
      continue
    shape = tuple(want[target].shape)
    seen.add(target)
    try:
      value = _to_flax_layout(target[-1], np.asarray(array), len(shape))
    except ValueError as e:
      mis_shaped.append(f"{key}: {e}")
      continue
    if tuple(value.shape) != shape:
      mis_shaped.append(f"{key}: checkpoint {tuple(np.shape(array))}, model expects "
                        f"{_torch_shape(target[-1], shape)} (ours {shape})")
      continue
    if target in out:
      unexpected.append(f"{key} (duplicate of another key for {'.'.join(target)})")
      continue
    out[target] = value if dtype is None else value.astype(dtype)
  missing = [_torch_key(p) for p in want if p not in seen]
  if missing or unexpected or mis_shaped:
    raise WeightsError(_report(component, missing, unexpected, mis_shaped))
  return _unflatten(out)


def _torch_leaf(leaf: str) -> str:
  return "weight" if leaf in ("kernel", "scale", "embedding") else leaf


def _torch_key(path: tuple[str, ...]) -> str:
  return ".".join(p for p in (path_to_torch_module(path[:-1]), _torch_leaf(path[-1])) if p)


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 2:
    return shape[::-1]
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def _report(component, missing, unexpected, mis_shaped, limit=20) -> str:
  lines = [f"{component}: checkpoint does not match the model"]
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
    if items:
      lines.append(f"  {len(items)} {title}:")
      lines += [f"    {k}" for k in items[:limit]]
      if len(items) > limit:
        lines.append(f"    ... and {len(items) - limit} more")
  return "\n".join(lines)


def params_to_torch(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
  """Our param tree -> a torch-named, torch-layout state dict of numpy arrays."""
  out = {}
  for path, value in _flatten(params).items():
    a = np.asarray(value)
    leaf = path[-1]
    if leaf == "kernel":
      a = a.T if a.ndim == 2 else a.transpose(3, 2, 0, 1) if a.ndim == 4 else a
    out[prefix + _torch_key(path)] = np.ascontiguousarray(a)
  return out


def expected_torch_shapes(expected: Mapping[str, Any], *, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """Torch names and shapes that a checkpoint for `expected` must hold."""
  return {prefix + _torch_key(p): _torch_shape(p[-1], tuple(v.shape))
          for p, v in _flatten(expected).items()}
