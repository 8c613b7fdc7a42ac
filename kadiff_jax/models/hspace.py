"""H-space hooks: the seam between the UNet's encoder and decoder halves.

The H-space of a diffusion UNet (Kwon et al.) is the map the mid block
hands to the up blocks, [B, h, w, C_mid] (8 x 8 x 1280 for SD2.1 at 512 px).
An H-space hook rewrites it, h -> h', before the decoder reads it, on the
same terms as an attention hook (`models.attention`): a frozen, jit-static
object whose traced inputs arrive in `hook_args[hook.name]`; it keeps no
state.

    hook.name                        key of its traced inputs in `hook_args`
    hook.needs_args                  whether a call without its inputs is an error
    hook.selects(site) -> False      it never selects an attention layer
    hook.edit_hspace(h, args) -> (h', aux dict)

Hooks of both seams travel together in one `hooks` tuple; each seam runs the
hooks that belong to it, in order. Anything a hook returns in `aux` is
reported by the model under "hspace/{hook.name}.{key}".
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import jax


class HSpaceHook(abc.ABC):
  """Base of the H-space hooks (subclasses are frozen dataclasses with a `name`)."""

  name: str = "hspace"
  needs_args: bool = True

  def selects(self, site) -> bool:  # an attention site: never ours
    return False

  @abc.abstractmethod
  def edit_hspace(self, h: jax.Array, args: Any) -> tuple[jax.Array, dict]:
    """h [B, h, w, C] and this hook's inputs -> (h', aux)."""


def run_hooks(h: jax.Array, hooks: Sequence, hook_args: dict | None) -> tuple[jax.Array, dict]:
  """h through every H-space hook in `hooks`, in order; returns (h', aux)."""
  aux: dict = {}
  for hook in hooks:
    if not isinstance(hook, HSpaceHook):
      continue
    args = (hook_args or {}).get(hook.name)
    if args is None and hook.needs_args:
      raise ValueError(f"H-space hook {hook.name!r} has no inputs: pass them as hook_args[{hook.name!r}] "
                       f"(hook_args has {sorted(hook_args or {})})")
    h, hook_aux = hook.edit_hspace(h, args)
    for key, val in hook_aux.items():
      aux[f"hspace/{hook.name}.{key}"] = val
  return h, aux
