"""UNet2DConditionModel (SDXL and SD1.x/2.x families), NHWC, with attention hooks.

`apply(params, x, t, cond, config=..., hooks=..., hook_args=..., capture=...)`
is a pure function returning `(eps, aux)`. `aux` holds the block outputs named
in `capture` ("down_blocks.N", "mid_block", "up_blocks.N"; "up_blocks.0" is
the DIFT feature map) and whatever the hooks report.

The same network also runs in halves: `encode` (conv_in, down blocks, mid
block) returns the H-space map h (the mid-block output) and the skip
connections, and `decode(h, skips, ...)` runs the up blocks and the output
head. Hooks act on two seams: attention hooks (`models.attention`) inside
every attention layer, and H-space hooks (`models.hspace`) on h between the
halves; `apply` runs both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kadiff_jax.models import hspace, layers
from kadiff_jax.models.attention import Attention, AttentionSite
from kadiff_jax.models.config_util import ConfigError, read_fields
from kadiff_jax.programs import serializable

_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of diffusers' UNet2DConditionModel config that SD/SDXL use."""

  in_channels: int = 4
  out_channels: int = 4
  sample_size: int = 128
  down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
  reverse_transformer_layers_per_block: tuple[int, ...] | None = None
  attention_heads: tuple[int, ...] = (5, 10, 20)
  cross_attention_dim: tuple[int, ...] = (2048, 2048, 2048)
  use_linear_projection: bool = True
  upcast_attention: bool = False
  addition_embed_type: str | None = "text_time"
  addition_time_embed_dim: int | None = 256
  projection_class_embeddings_input_dim: int | None = 2816
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1

  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  @property
  def up_transformer_layers(self) -> tuple[int, ...]:
    return self.reverse_transformer_layers_per_block or tuple(reversed(self.transformer_layers_per_block))

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4

  @classmethod
  def from_diffusers(cls, cfg: dict[str, Any]) -> "UNetConfig":
    """Builds a config from a diffusers `config.json` dict; rejects what we don't implement."""
    f = read_fields("unet", cfg, supported={
        "in_channels", "out_channels", "sample_size", "down_block_types", "mid_block_type",
        "up_block_types", "block_out_channels", "layers_per_block", "transformer_layers_per_block",
        "reverse_transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
        "cross_attention_dim", "use_linear_projection", "upcast_attention", "addition_embed_type",
        "addition_time_embed_dim", "projection_class_embeddings_input_dim", "norm_num_groups",
        "norm_eps", "flip_sin_to_cos", "freq_shift", "downsample_padding"},
        fixed={"center_input_sample": False, "only_cross_attention": False, "mid_block_scale_factor": 1,
               "act_fn": "silu", "encoder_hid_dim": None, "encoder_hid_dim_type": None,
               "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
               "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
               "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
               "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
               "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
               "attention_type": "default", "class_embeddings_concat": False,
               "mid_block_only_cross_attention": None, "cross_attention_norm": None},
        ignored={"dropout", "addition_embed_type_num_heads"})
    n = len(f.get("block_out_channels", cls.block_out_channels))

    def per_block(name, default):
      v = f.get(name, default)
      if isinstance(v, int):
        return (v,) * n
      v = tuple(v)
      if len(v) != n:
        raise ConfigError(f"unet config field {name!r} has {len(v)} entries, expected one per block ({n})")
      return v

    if f.get("num_attention_heads") is not None:
      raise ConfigError("unet config field 'num_attention_heads' is not supported by diffusers' "
                        "UNet2DConditionModel either; heads come from 'attention_head_dim'")
    for name, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
      for t in f.get(name, ()):
        if t not in allowed:
          raise ConfigError(f"unet config field {name!r}: block type {t!r} is not supported "
                            f"(expected one of {allowed})")
    if f.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in _MID_TYPES:
      raise ConfigError(f"unet config field 'mid_block_type': {f['mid_block_type']!r} is not supported "
                        f"(expected one of {_MID_TYPES})")
    if f.get("addition_embed_type") not in (None, "text_time"):
      raise ConfigError(f"unet config field 'addition_embed_type': {f['addition_embed_type']!r} is not "
                        "supported (expected null or 'text_time')")
    rev = f.get("reverse_transformer_layers_per_block")
    out = cls(
        in_channels=f.get("in_channels", 4), out_channels=f.get("out_channels", 4),
        sample_size=f.get("sample_size") or 64,
        down_block_types=tuple(f["down_block_types"]), mid_block_type=f.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
        up_block_types=tuple(f["up_block_types"]), block_out_channels=tuple(f["block_out_channels"]),
        layers_per_block=per_block("layers_per_block", 2),
        transformer_layers_per_block=per_block("transformer_layers_per_block", 1),
        reverse_transformer_layers_per_block=tuple(rev) if rev is not None else None,
        attention_heads=per_block("attention_head_dim", 8),
        cross_attention_dim=per_block("cross_attention_dim", 1280),
        use_linear_projection=bool(f.get("use_linear_projection", False)),
        upcast_attention=bool(f.get("upcast_attention", False)),
        addition_embed_type=f.get("addition_embed_type"), addition_time_embed_dim=f.get("addition_time_embed_dim"),
        projection_class_embeddings_input_dim=f.get("projection_class_embeddings_input_dim"),
        norm_num_groups=f.get("norm_num_groups", 32), norm_eps=f.get("norm_eps", 1e-5),
        flip_sin_to_cos=f.get("flip_sin_to_cos", True), freq_shift=f.get("freq_shift", 0),
        downsample_padding=f.get("downsample_padding", 1))
    if len(out.down_block_types) != n or len(out.up_block_types) != n:
      raise ConfigError(f"unet config: {len(out.down_block_types)} down and {len(out.up_block_types)} up "
                        f"block types for {n} block_out_channels")
    return out

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers config.json fields describing this UNet."""
    return {
        "_class_name": "UNet2DConditionModel", "in_channels": self.in_channels,
        "out_channels": self.out_channels, "sample_size": self.sample_size,
        "down_block_types": list(self.down_block_types), "mid_block_type": self.mid_block_type,
        "up_block_types": list(self.up_block_types), "block_out_channels": list(self.block_out_channels),
        "layers_per_block": _scalar_if_uniform(self.layers_per_block),
        "transformer_layers_per_block": list(self.transformer_layers_per_block),
        "reverse_transformer_layers_per_block": (list(self.reverse_transformer_layers_per_block)
                                                 if self.reverse_transformer_layers_per_block else None),
        "attention_head_dim": list(self.attention_heads),
        "cross_attention_dim": _scalar_if_uniform(self.cross_attention_dim),
        "use_linear_projection": self.use_linear_projection, "upcast_attention": self.upcast_attention,
        "addition_embed_type": self.addition_embed_type, "addition_time_embed_dim": self.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
        "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
        "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
        "downsample_padding": self.downsample_padding,
    }


def _scalar_if_uniform(values: tuple[int, ...]):
  """Real configs store a per-block value once when all blocks share it (diffusers' IP-Adapter loader needs that)."""
  return values[0] if len(set(values)) == 1 else list(values)


def sdxl_base() -> UNetConfig:
  """stabilityai/stable-diffusion-xl-base-1.0 (and fine-tunes such as RealVisXL)."""
  return UNetConfig()


def sd15() -> UNetConfig:
  """runwayml/stable-diffusion-v1-5."""
  return UNetConfig(
      sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
      layers_per_block=(2,) * 4, transformer_layers_per_block=(1,) * 4, attention_heads=(8,) * 4,
      cross_attention_dim=(768,) * 4, use_linear_projection=False, addition_embed_type=None,
      addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)


def sd21_base() -> UNetConfig:
  """stabilityai/stable-diffusion-2-1-base and stabilityai/sd-turbo: SD1.5's blocks with OpenCLIP-H's 1024-wide text,
  linear projections and 5/10/20/20 heads (diffusers' attention_head_dim)."""
  return dataclasses.replace(sd15(), attention_heads=(5, 10, 20, 20), cross_attention_dim=(1024,) * 4,
                             use_linear_projection=True)


def tiny_sdxl() -> UNetConfig:
  """A tiny SDXL-shaped UNet (same block types and conditioning) for tests."""
  return UNetConfig(
      sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=(1, 1, 1),
      transformer_layers_per_block=(1, 1, 2), attention_heads=(2, 4, 4), cross_attention_dim=(64,) * 3,
      addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8)


def tiny_sd(sd2: bool = False) -> UNetConfig:
  """A tiny UNet with SD1.5's block structure (4 levels, 2 layers per block, so the same 16 self-attention layers
  in the same numbering); `sd2`: linear projections and upcast attention, as SD2.1's."""
  return UNetConfig(
      sample_size=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(32, 32, 64, 64),
      layers_per_block=(2,) * 4, transformer_layers_per_block=(1,) * 4, attention_heads=(2, 2, 4, 4),
      cross_attention_dim=(32,) * 4, use_linear_projection=sd2, upcast_attention=sd2, addition_embed_type=None,
      addition_time_embed_dim=None, projection_class_embeddings_input_dim=None, norm_num_groups=8)


@serializable
class UNetCond(NamedTuple):
  """UNet conditioning: text tokens, and SDXL's pooled text + time ids."""

  encoder_hidden_states: jax.Array        # [B, L, cross_attention_dim]
  text_embeds: jax.Array | None = None     # [B, pooled_dim] (SDXL)
  time_ids: jax.Array | None = None        # [B, 6] (SDXL)


@functools.lru_cache(maxsize=32)
def attention_sites(config: UNetConfig) -> dict[str, AttentionSite]:
  """Every attention layer of the UNet by module path, with both numberings, width, heads and level.

  KA-Diff numbers layers per kind in down, mid, up order (spec 6.2);
  diffusers' processor order is down, up, mid with attn1/attn2 alternating.
  """
  n = config.num_blocks
  rev_channels, rev_heads = tuple(reversed(config.block_out_channels)), tuple(reversed(config.attention_heads))
  blocks: dict[str, list[tuple[str, int, int, int]]] = {"down": [], "mid": [], "up": []}  # (path, ch, heads, level)
  for b, kind in enumerate(config.down_block_types):
    if kind.startswith("CrossAttn"):
      for a in range(config.layers_per_block[b]):
        for t in range(config.transformer_layers_per_block[b]):
          blocks["down"].append((f"down_blocks.{b}.attentions.{a}.transformer_blocks.{t}",
                                 config.block_out_channels[b], config.attention_heads[b], b))
  if config.mid_block_type == "UNetMidBlock2DCrossAttn":
    for t in range(config.transformer_layers_per_block[-1]):
      blocks["mid"].append((f"mid_block.attentions.0.transformer_blocks.{t}", config.block_out_channels[-1],
                            config.attention_heads[-1], n - 1))
  rev_layers = tuple(reversed(config.layers_per_block))
  for b, kind in enumerate(config.up_block_types):
    if kind.startswith("CrossAttn"):
      for a in range(rev_layers[b] + 1):
        for t in range(config.up_transformer_layers[b]):
          blocks["up"].append((f"up_blocks.{b}.attentions.{a}.transformer_blocks.{t}", rev_channels[b],
                               rev_heads[b], n - 1 - b))
  processor_order = blocks["down"] + blocks["up"] + blocks["mid"]
  proc = {p[0]: i for i, p in enumerate(processor_order)}
  sites = {}
  flat = 0
  for region in ("down", "mid", "up"):
    for block, channels, heads, level in blocks[region]:
      flat += 1
      for j, (name, kind) in enumerate((("attn1", "self"), ("attn2", "cross"))):
        path = f"{block}.{name}"
        sites[path] = AttentionSite(path, kind, flat, 2 * proc[block] + j, region, channels, heads, level)
  return sites


class TransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock`: self-attn, cross-attn, GEGLU feed-forward."""

  heads: int
  prefix: str
  config: UNetConfig
  implementation: str | None
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, context, spatial, hooks, hook_args):
    dim = x.shape[-1]
    sites = attention_sites(self.config)
    ln = lambda name: layers.LayerNorm(1e-5, self.dtype, name=name)
    attn = lambda name: Attention(self.heads, dim // self.heads, sites[f"{self.prefix}.{name}"],
                                  upcast=self.config.upcast_attention, implementation=self.implementation,
                                  dtype=self.dtype, name=name)
    x = x + attn("attn1")(ln("norm1")(x), None, spatial, hooks, hook_args)
    x = x + attn("attn2")(ln("norm2")(x), context, spatial, hooks, hook_args)
    return x + FeedForward(dim, self.dtype, name="ff")(ln("norm3")(x))


class GEGLU(nn.Module):
  inner: int
  dtype: jnp.dtype
  kernel_init: Callable = layers.checkpoint_init

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(nn.Dense(self.inner * 2, dtype=self.dtype, kernel_init=self.kernel_init, name="proj")(x), 2,
                        axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dim: int
  dtype: jnp.dtype
  kernel_init: Callable = layers.checkpoint_init  # a random one where the layer is trained from scratch

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.dim * 4, self.dtype, self.kernel_init, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, kernel_init=self.kernel_init, name="net_2")(h)


class Transformer2D(nn.Module):
  """diffusers `Transformer2DModel` for continuous NHWC input."""

  heads: int
  depth: int
  prefix: str
  config: UNetConfig
  implementation: str | None
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, context, hooks, hook_args):
    b, h, w, c = x.shape
    cfg = self.config
    res = x
    x = layers.GroupNorm(cfg.norm_num_groups, 1e-6, self.dtype, name="norm")(x)
    if cfg.use_linear_projection:
      x = layers.Dense(c, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
    else:
      x = layers.conv(c, 1, dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, c)  # [B, HW, C]
    for i in range(self.depth):
      x = TransformerBlock(self.heads, f"{self.prefix}.transformer_blocks.{i}", cfg, self.implementation,
                           self.dtype, name=f"transformer_blocks_{i}")(x, context, (h, w), hooks, hook_args)
    if cfg.use_linear_projection:
      x = layers.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
    else:
      x = layers.conv(c, 1, dtype=self.dtype, name="proj_out")(x.reshape(b, h, w, c))
    return x + res


class DownBlock(nn.Module):
  """`DownBlock2D` / `CrossAttnDownBlock2D`; returns (h, skips)."""

  index: int
  config: UNetConfig
  implementation: str | None
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h, emb, context, hooks, hook_args):
    cfg, i = self.config, self.index
    ch = cfg.block_out_channels[i]
    skips = []
    for j in range(cfg.layers_per_block[i]):
      h = layers.ResnetBlock(ch, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name=f"resnets_{j}")(h, emb)
      if cfg.down_block_types[i].startswith("CrossAttn"):
        h = Transformer2D(cfg.attention_heads[i], cfg.transformer_layers_per_block[i],
                          f"down_blocks.{i}.attentions.{j}", cfg, self.implementation, self.dtype,
                          name=f"attentions_{j}")(h, context, hooks, hook_args)
      skips.append(h)
    if i < cfg.num_blocks - 1:
      h = layers.Downsample(ch, cfg.downsample_padding, self.dtype, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """`UNetMidBlock2DCrossAttn` (or `UNetMidBlock2D` without attention)."""

  config: UNetConfig
  implementation: str | None
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h, emb, context, hooks, hook_args):
    cfg = self.config
    ch = cfg.block_out_channels[-1]
    h = layers.ResnetBlock(ch, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="resnets_0")(h, emb)
    if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
      h = Transformer2D(cfg.attention_heads[-1], cfg.transformer_layers_per_block[-1], "mid_block.attentions.0",
                        cfg, self.implementation, self.dtype, name="attentions_0")(h, context, hooks, hook_args)
    return layers.ResnetBlock(ch, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="resnets_1")(h, emb)


class UpBlock(nn.Module):
  """`UpBlock2D` / `CrossAttnUpBlock2D`; consumes skips from the end of the list."""

  index: int
  config: UNetConfig
  implementation: str | None
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h, skips, emb, context, hooks, hook_args):
    cfg, i = self.config, self.index
    ch = tuple(reversed(cfg.block_out_channels))[i]
    heads = tuple(reversed(cfg.attention_heads))[i]
    for j in range(tuple(reversed(cfg.layers_per_block))[i] + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = layers.ResnetBlock(ch, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name=f"resnets_{j}")(h, emb)
      if cfg.up_block_types[i].startswith("CrossAttn"):
        h = Transformer2D(heads, cfg.up_transformer_layers[i], f"up_blocks.{i}.attentions.{j}", cfg,
                          self.implementation, self.dtype, name=f"attentions_{j}")(h, context, hooks, hook_args)
    if i < cfg.num_blocks - 1:  # odd latent sizes: upsample to the next skip's size, as diffusers does
      h = layers.Upsample(ch, self.dtype, name="upsamplers_0")(h, tuple(skips[-1].shape[1:3]))
    return h


class UNet(nn.Module):
  """The UNet itself; use `apply` below rather than calling this directly."""

  config: UNetConfig
  dtype: jnp.dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x, t, cond: UNetCond, hooks=(), hook_args=None, capture=(), part="all", skips=()):
    """`part` "all": x is the latent, returns eps. "encoder": returns (h, skips), the H-space map before any
    H-space hook. "decoder": x is the H-space map and `skips` the encoder's skip connections; returns eps."""
    cfg, dt = self.config, self.dtype

    def keep(name, value):  # sown as "block:NAME" ("mid_block" alone would clash with the submodule's scope)
      if name in capture:
        self.sow("intermediates", _BLOCK + name, value)

    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
    t_emb = layers.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = layers.TimestepEmbedding(cfg.time_embed_dim, dt, name="time_embedding")(t_emb.astype(dt))
    if cfg.addition_embed_type == "text_time":
      if cond.text_embeds is None or cond.time_ids is None:
        raise ValueError("this UNet uses addition_embed_type='text_time': cond.text_embeds and "
                         "cond.time_ids are required")
      tid = layers.timestep_embedding(cond.time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                      cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)
      add = jnp.concatenate([cond.text_embeds.astype(jnp.float32), tid], axis=-1)
      if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"text_time embedding has {add.shape[-1]} features, expected "
                         f"projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}")
      emb = emb + layers.TimestepEmbedding(cfg.time_embed_dim, dt, name="add_embedding")(add.astype(dt))
    context = cond.encoder_hidden_states.astype(dt)

    if part == "decoder":
      h, skips = x.astype(dt), [s.astype(dt) for s in skips]
    else:
      h = layers.conv(cfg.block_out_channels[0], 3, dtype=dt, name="conv_in")(x.astype(dt))
      skips = [h]
      for i in range(cfg.num_blocks):
        h, block_skips = DownBlock(i, cfg, self.implementation, dt, name=f"down_blocks_{i}")(
            h, emb, context, hooks, hook_args)
        skips.extend(block_skips)
        keep(f"down_blocks.{i}", h)
      if cfg.mid_block_type is not None:
        h = MidBlock(cfg, self.implementation, dt, name="mid_block")(h, emb, context, hooks, hook_args)
        keep("mid_block", h)
      if part == "encoder":
        return h, tuple(skips)
      h, aux = hspace.run_hooks(h, hooks, hook_args)
      for key, val in aux.items():
        self.sow("intermediates", key, val)
    for i in range(cfg.num_blocks):
      h = UpBlock(i, cfg, self.implementation, dt, name=f"up_blocks_{i}")(h, skips, emb, context, hooks, hook_args)
      keep(f"up_blocks.{i}", h)
    h = nn.silu(layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dt, name="conv_norm_out")(h))
    return layers.conv(cfg.out_channels, 3, dtype=dt, name="conv_out")(h)


_BLOCK = "block:"


def _flatten_intermediates(tree) -> dict[str, jax.Array]:
  out = {}

  def walk(node):
    for key, val in node.items():
      if isinstance(val, dict):
        walk(val)
      else:  # sow stores a tuple of values
        out[key.removeprefix(_BLOCK)] = val[-1]

  walk(tree)
  return out


def apply(params, x, t, cond: UNetCond, *, config: UNetConfig, hooks: Sequence = (), hook_args=None,
          capture: Sequence[str] = (), dtype=jnp.float32, implementation: str | None = None):
  """eps = UNet(x, t, cond); returns (eps [B, H, W, C_out], aux dict).

  x: [B, H, W, C_in] latents (NHWC); t: scalar or [B] timesteps; hooks:
  attention hooks (static); hook_args: their traced inputs keyed by hook
  name; capture: block names whose outputs to return in aux.
  """
  model = UNet(config, dtype, implementation)
  eps, state = model.apply({"params": params}, x, t, cond, tuple(hooks), hook_args, tuple(capture),
                           mutable=["intermediates"])
  return eps, _flatten_intermediates(state.get("intermediates", {}))


def encode(params, x, t, cond: UNetCond, *, config: UNetConfig, hooks: Sequence = (), hook_args=None,
           dtype=jnp.float32, implementation: str | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The UNet's encoder half (conv_in, down blocks, mid block): returns (h [B, h, w, C_mid], skips).

  h is the H-space map (Kwon et al.): the mid-block output, before any H-space hook. Attention hooks run in the
  down and mid blocks as in `apply`. The decoder never runs."""
  model = UNet(config, dtype, implementation)
  return model.apply({"params": params}, x, t, cond, tuple(hooks), hook_args, (), "encoder")


def encoder_features(params, x, t, cond: UNetCond, names: Sequence[str], *, config: UNetConfig,
                     dtype=jnp.float32, implementation: str | None = None) -> dict[str, jax.Array]:
  """The outputs of encoder blocks ("down_blocks.N", "mid_block") by name; the decoder never runs."""
  model = UNet(config, dtype, implementation)
  _, state = model.apply({"params": params}, x, t, cond, (), None, tuple(names), "encoder", mutable=["intermediates"])
  found = _flatten_intermediates(state.get("intermediates", {}))
  missing = [n for n in names if n not in found]
  if missing:
    raise ValueError(f"encoder features {missing}: expected names among "
                     f"{[f'down_blocks.{i}' for i in range(config.num_blocks)] + ['mid_block']}")
  return {n: found[n] for n in names}


def decode(params, h, skips, t, cond: UNetCond, *, config: UNetConfig, hooks: Sequence = (), hook_args=None,
           dtype=jnp.float32, implementation: str | None = None) -> jax.Array:
  """The decoder half: up blocks and output head from the H-space map `h` and the encoder's `skips`; returns eps.

  `decode(encode(x)...)` equals `apply(x)` without H-space hooks."""
  model = UNet(config, dtype, implementation)
  return model.apply({"params": params}, h, t, cond, tuple(hooks), hook_args, (), "decoder", tuple(skips))


def init_shapes(config: UNetConfig, dtype=jnp.float32, batch: int = 1):
  """Parameter shapes (no FLOPs) of a UNet with this config."""
  s = config.sample_size
  x = jax.ShapeDtypeStruct((batch, s, s, config.in_channels), jnp.float32)
  cond = UNetCond(
      jax.ShapeDtypeStruct((batch, 77, config.cross_attention_dim[0]), jnp.float32),
      *((jax.ShapeDtypeStruct((batch, config.projection_class_embeddings_input_dim
                               - 6 * config.addition_time_embed_dim), jnp.float32),
         jax.ShapeDtypeStruct((batch, 6), jnp.float32)) if config.addition_embed_type else (None, None)))
  model = UNet(config, dtype)
  return jax.eval_shape(lambda x_, c_: model.init(jax.random.PRNGKey(0), x_, jnp.zeros((batch,)), c_), x, cond)["params"]
