"""LoRA on the student UNet's decoder (HSPACE_SPEC §6, choice Q7): rank-r updates of chosen dense kernels.

A LoRA tree maps a kernel's param path ("up_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel") to
{"a": [in, r], "b": [r, out]}; the kernel in use is W + (alpha / r) · a @ b. `a` starts random (Kaiming-uniform
as PEFT's), `b` at zero, so an untrained LoRA changes nothing. Targets are globs over those paths; the default is
the up blocks' attention q/k/v/out and feed-forward layers.
"""

from __future__ import annotations

import fnmatch

import jax
import jax.numpy as jnp

DEFAULT_TARGETS = ("up_blocks_*/attn?/to_[qkv]/kernel", "up_blocks_*/attn?/to_out_0/kernel",
                   "up_blocks_*/ff/net_0/proj/kernel", "up_blocks_*/ff/net_2/kernel")


def _paths(tree) -> dict[str, jax.Array]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def target_paths(unet_params, targets=DEFAULT_TARGETS) -> list[str]:
  """The 2-D kernels of `unet_params` that the globs `targets` select (an error when none)."""
  found = [p for p, v in _paths(unet_params).items() if v.ndim == 2 and any(fnmatch.fnmatchcase(p, t) for t in targets)]
  if not found:
    raise ValueError(f"LoRA targets {list(targets)} select no dense kernel of this UNet")
  return sorted(found)


def init(unet_params, key: jax.Array, rank: int, targets=DEFAULT_TARGETS) -> dict:
  if rank < 1:
    raise ValueError(f"lora_rank={rank}: expected at least 1")
  kernels = _paths(unet_params)
  out = {}
  for i, path in enumerate(target_paths(unet_params, targets)):
    fan_in, fan_out = kernels[path].shape
    bound = (1.0 / fan_in) ** 0.5  # kaiming_uniform(a=sqrt(5)) on a [r, in] torch weight
    out[path] = {"a": jax.random.uniform(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32, -bound, bound),
                 "b": jnp.zeros((rank, fan_out), jnp.float32)}
  return out


def merge(unet_params, lora: dict, alpha: float | None = None):
  """`unet_params` with every LoRA kernel folded in: W + (alpha / r) a @ b (alpha defaults to r: scale 1)."""
  if not lora:
    return unet_params

  def visit(path, leaf):
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    if key not in lora:
      return leaf
    a, b = lora[key]["a"], lora[key]["b"]
    scale = 1.0 if alpha is None else alpha / a.shape[1]
    return (leaf.astype(jnp.float32) + scale * (a @ b)).astype(leaf.dtype)

  missing = set(lora) - set(_paths(unet_params))
  if missing:
    raise ValueError(f"LoRA for kernels this UNet does not have: {sorted(missing)[:5]}")
  return jax.tree_util.tree_map_with_path(visit, unet_params)
