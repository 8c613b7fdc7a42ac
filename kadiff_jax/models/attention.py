"""Attention with composable hooks: the seam every injection method uses.

Each attention layer of a model has a static `AttentionSite` (its module path,
self/cross kind, the KA-Diff flat numbering and diffusers' processor index).
At call time the layer builds q, k, v of shape [B, L, heads, dim_head] and
runs them through the hooks that select its site, outermost first; the
innermost `attend` is plain scaled dot-product attention with an fp32
softmax. A hook is a frozen (hashable, hence jit-static) object:

    hook.name                       key of its traced inputs in `hook_args`
    hook.needs_args                 whether a call without its inputs is an error
    hook.selects(site) -> bool      static layer selection
    hook(call, attend, args) -> (out [B, Lq, heads, dim_head], aux dict)

`attend(q, k, v)` runs the rest of the chain, so hooks compose: one may
rewrite k/v and call `attend`, another may add a second attention branch to
whatever `attend` returned (IP-Adapter). Anything a hook returns in `aux` is
reported by the model under "{site.path}/{hook.name}.{key}". No hook keeps
Python state: step indices and injection data arrive through `hook_args`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kadiff_jax.models import layers
from kadiff_jax.programs import serializable


@dataclasses.dataclass(frozen=True)
class AttentionSite:
  """Static identity of one attention layer, with the facts hooks need about it."""

  path: str             # diffusers module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.1.attn1"
  kind: str             # "self" (attn1) or "cross" (attn2)
  index: int            # KA-Diff flat 1-based numbering per kind: down blocks, mid block, up blocks
  processor_index: int  # 0-based position in diffusers' `unet.attn_processors` (down, up, mid)
  region: str           # "down" | "mid" | "up"
  channels: int = 0     # query width = heads * dim_head
  heads: int = 1
  level: int = 0        # times the latent grid was halved before this layer (0: full latent resolution)

  @property
  def dim_head(self) -> int:
    return self.channels // self.heads

  def grid(self, height: int, width: int | None = None) -> tuple[int, int]:
    """(h, w) of this layer's query grid for a latent of height x width (stride-2 convs round up)."""
    h, w = height, height if width is None else width
    for _ in range(self.level):
      h, w = -(-h // 2), -(-w // 2)
    return h, w


class AttentionCall(NamedTuple):
  """What a hook sees: the layer's site, its projected q/k/v and context."""

  site: AttentionSite
  q: jax.Array                     # [B, Lq, heads, dim_head]
  k: jax.Array                     # [B, Lk, heads, dim_head]
  v: jax.Array                     # [B, Lk, heads, dim_head]
  spatial: tuple[int, int]         # (h, w) of the query grid; Lq == h * w
  hidden: jax.Array                # [B, Lq, C] normalised input the queries came from
  context: jax.Array | None        # [B, Lk, C'] encoder states for cross-attention


Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@serializable
class HookInputs(NamedTuple):
  """A hook's traced inputs, split by how they follow the batch.

  `params` are the same for every UNet row (weights: replicated over devices);
  `rows` are per UNet row, every leaf with a leading axis of rows (placed with
  the batch, so each device shard holds its own rows).
  """

  params: Any = None
  rows: Any = None


class AttentionHook(Protocol):
  name: str
  needs_args: bool

  def selects(self, site: AttentionSite) -> bool: ...

  def __call__(self, call: AttentionCall, attend: Attend, args: Any) -> tuple[jax.Array, dict]: ...


def dot_product_attention(q, k, v, *, implementation: str | None = None, upcast: bool = False):
  """softmax(q k^T / sqrt(d)) v over [B, L, heads, d]; logits and softmax in fp32.

  `implementation` "cudnn" asks for the fused kernel; inputs it does not take (not 16-bit, upcast, head dim
  over 128 or not a multiple of 8) go to XLA's.
  """
  dtype = q.dtype
  d = q.shape[-1]
  if implementation == "cudnn" and (upcast or dtype not in (jnp.bfloat16, jnp.float16) or d > 128 or d % 8):
    implementation = "xla"
  if upcast:
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation).astype(dtype)


def run_hooks(call: AttentionCall, hooks: Sequence[AttentionHook], hook_args: dict | None,
              base: Attend) -> tuple[jax.Array, dict]:
  """Runs `call` through the hooks that select its site, outermost first."""
  active = [h for h in hooks if h.selects(call.site)]
  aux: dict = {}

  def chain(i: int) -> Attend:
    if i == len(active):
      return base
    hook = active[i]
    inner = chain(i + 1)

    args = (hook_args or {}).get(hook.name)
    if args is None and getattr(hook, "needs_args", True):
      raise ValueError(f"attention hook {hook.name!r} at {call.site.path} has no inputs: pass them as "
                       f"hook_args[{hook.name!r}] (hook_args has {sorted(hook_args or {})})")

    def attend(q, k, v):
      sub = call._replace(q=q, k=k, v=v)
      out, hook_aux = hook(sub, inner, args)
      for key, val in hook_aux.items():
        aux[f"{call.site.path}/{hook.name}.{key}"] = val
      return out

    return attend

  return chain(0)(call.q, call.k, call.v), aux


class Attention(nn.Module):
  """diffusers `Attention` (to_q/to_k/to_v/to_out.0) with hooks."""

  heads: int
  dim_head: int
  site: AttentionSite | None = None
  qkv_bias: bool = False
  upcast: bool = False
  implementation: str | None = None
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = layers.checkpoint_init  # a random one where the layer is trained from scratch

  @nn.compact
  def __call__(self, x, context=None, spatial=(0, 0), hooks=(), hook_args=None):
    inner = self.heads * self.dim_head
    if self.site is not None and self.site.channels and self.site.channels != inner:
      raise ValueError(f"{self.site.path}: site says {self.site.channels} channels, the layer has {inner}")
    b, lq, c = x.shape
    ctx = x if context is None else context
    q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=self.kernel_init, name="to_q")(x)
    k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=self.kernel_init, name="to_k")(ctx)
    v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=self.kernel_init, name="to_v")(ctx)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)  # [B, L, heads, d]
    base = lambda q_, k_, v_: dot_product_attention(
        q_, k_, v_, implementation=self.implementation, upcast=self.upcast)
    if self.site is not None and hooks:
      call = AttentionCall(self.site, split(q), split(k), split(v), tuple(spatial), x, context)
      out, aux = run_hooks(call, hooks, hook_args, base)
      for key, val in aux.items():
        self.sow("intermediates", key, val)
    else:
      out = base(split(q), split(k), split(v))
    out = out.reshape(b, lq, inner)
    return nn.Dense(c, dtype=self.dtype, kernel_init=self.kernel_init, name="to_out_0")(out)


@dataclasses.dataclass(frozen=True)
class LayerSelector:
  """Selects attention sites by kind, flat index and/or module-path glob.

  `parse_layers("44-70")`, `parse_layers("up_blocks.1.*")` or a mix
  "35,44-70,mid_block.*" build one. A site matches when its kind matches and
  its index is listed or its path matches a pattern.
  """

  kind: str = "self"
  indices: frozenset[int] = frozenset()
  patterns: tuple[str, ...] = ()

  def selects(self, site: AttentionSite) -> bool:
    if site.kind != self.kind:
      return False
    return site.index in self.indices or any(fnmatch.fnmatchcase(site.path, p) for p in self.patterns)

  def select(self, sites: Sequence[AttentionSite], what: str = "layer selection") -> tuple[AttentionSite, ...]:
    """The sites this selector picks; selecting nothing is an error that lists what exists."""
    chosen = tuple(s for s in sites if self.selects(s))
    if not chosen:
      kind = [s for s in sites if s.kind == self.kind]
      numbers = f"{kind[0].index}-{kind[-1].index}" if kind else "none"
      blocks = sorted({s.path.split(".transformer_blocks")[0] + ".*" for s in kind})
      raise ValueError(f"{what} {self.describe()!r} matches no {self.kind}-attention layer of this UNet; it has "
                       f"layers {numbers} ({len(kind)} in all), by path: {', '.join(blocks)}")
    return chosen

  def describe(self) -> str:
    """The selector written back as a layer spec ("44-70,up_blocks.1.*")."""
    return ",".join(_ranges(sorted(self.indices)) + list(self.patterns))


def _ranges(nums: list[int]) -> list[str]:
  out: list[tuple[int, int]] = []
  for n in nums:
    if out and out[-1][1] == n - 1:
      out[-1] = (out[-1][0], n)
    else:
      out.append((n, n))
  return [f"{a}" if a == b else f"{a}-{b}" for a, b in out]


def parse_layers(spec: str, kind: str = "self") -> LayerSelector:
  """Parses "44-70", "1,3,5", "up_blocks.1.*" (comma-separated) into a LayerSelector."""
  indices: set[int] = set()
  patterns: list[str] = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    if part[0].isdigit():
      lo, _, hi = part.partition("-")
      try:
        lo_i, hi_i = int(lo), int(hi or lo)
      except ValueError:
        raise ValueError(f"layer spec {part!r}: expected N, N-M or a module-path glob") from None
      if hi_i < lo_i:
        raise ValueError(f"layer spec {part!r}: range end {hi_i} is below its start {lo_i}")
      indices.update(range(lo_i, hi_i + 1))
    else:
      patterns.append(part)
  return LayerSelector(kind, frozenset(indices), tuple(patterns))
