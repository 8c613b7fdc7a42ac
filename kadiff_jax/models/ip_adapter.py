"""IP-Adapter (Ye et al. 2023): image tokens and decoupled cross-attention as a hook.

Every cross-attention layer gets a second attention over image tokens with its
own key/value projections (`to_k_ip`, `to_v_ip`), added with a scale (eq. 5):

    out = Attn(q, K_text, V_text) + scale * Attn(q, K_ip, V_ip)

`IPAdapterAttention` is an ordinary attention hook: it composes with any other
hook (injection, interpolation) and never replaces them. Its traced inputs,
a `HookInputs` of the per-layer projections (params) and `IPAdapterRows`, the
tokens and scale of every UNet row, so one batch can mix references and scales.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.models import clip_vision, image_proj
from kadiff_jax.models.attention import AttentionCall, AttentionSite, HookInputs, dot_product_attention
from kadiff_jax.programs import persistent_jit, serializable


@serializable
class IPAdapterRows(NamedTuple):
  tokens: jax.Array  # [rows, num_tokens, C_ctx] image tokens of each UNet row
  scale: jax.Array   # [rows]


def hook_inputs(adapter: "IPAdapter", tokens, scale) -> HookInputs:
  """The hook's inputs: the adapter's per-layer K/V projections and the rows' tokens and scales."""
  return HookInputs(adapter.layers, IPAdapterRows(tokens, scale))


@dataclasses.dataclass(frozen=True)
class IPAdapterAttention:
  """The decoupled cross-attention hook (selects every attn2)."""

  name: str = "ip_adapter"
  upcast: bool = False
  needs_args = True

  def selects(self, site: AttentionSite) -> bool:
    return site.kind == "cross"

  def __call__(self, call: AttentionCall, attend, args: HookInputs):
    out = attend(call.q, call.k, call.v)
    k, v = image_keys_values(call, args.params, args.rows.tokens)
    ip = dot_product_attention(call.q, k, v, upcast=self.upcast)
    return out + args.rows.scale.astype(out.dtype)[:, None, None, None] * ip, {}


def image_keys_values(call: AttentionCall, layers, tokens) -> tuple[jax.Array, jax.Array]:
  """The image tokens' keys and values [B, N, heads, d] at this layer (its to_k_ip / to_v_ip)."""
  layer = layers[call.site.path]  # {"to_k_ip": [C_ctx, inner], "to_v_ip": [C_ctx, inner]}
  tokens = tokens.astype(call.q.dtype)
  b, n, _ = tokens.shape
  heads, d = call.q.shape[2], call.q.shape[3]
  k = (tokens @ layer["to_k_ip"].astype(tokens.dtype)).reshape(b, n, heads, d)
  v = (tokens @ layer["to_v_ip"].astype(tokens.dtype)).reshape(b, n, heads, d)
  return k, v


@dataclasses.dataclass(frozen=True)
class IPAdapter:
  """A loaded IP-Adapter: image encoder, projection and per-layer K/V weights."""

  encoder_config: clip_vision.CLIPVisionConfig
  encoder_params: Any
  proj_config: image_proj.ResamplerConfig | image_proj.ImageProjConfig
  proj_params: Any
  layers: dict[str, dict[str, Any]]
  source: str = ""

  @property
  def plus(self) -> bool:
    """Plus reads the encoder's penultimate hidden states; base its projected embedding."""
    return isinstance(self.proj_config, image_proj.ResamplerConfig)

  @property
  def default_scale(self) -> float:
    return 0.5 if self.plus else 0.6  # KA-Diff's reference values

  @property
  def num_tokens(self) -> int:
    return self.proj_config.num_queries if self.plus else self.proj_config.num_tokens


def image_tokens(adapter: IPAdapter, pixels) -> tuple[jax.Array, jax.Array]:
  """(cond, uncond) image tokens [B, num_tokens, C] for preprocessed pixels [B, S, S, 3].

  The unconditional tokens come from an all-zero pixel tensor (Plus) or an
  all-zero image embedding (base), as the IP-Adapter release does.
  """
  return _image_tokens(adapter.encoder_params, adapter.proj_params, pixels, encoder_config=adapter.encoder_config,
                       proj_config=adapter.proj_config)


@persistent_jit(static_argnames=("encoder_config", "proj_config"))
def _image_tokens(encoder_params, proj_params, pixels, *, encoder_config, proj_config):
  feats, uncond = _features(encoder_params, pixels, encoder_config, proj_config)
  proj = lambda f: image_proj.project(proj_params, f, config=proj_config)
  return proj(feats), proj(uncond)


def _features(encoder_params, pixels, encoder_config, proj_config):
  plus = isinstance(proj_config, image_proj.ResamplerConfig)

  def features(px):
    out = clip_vision.encode(encoder_params, px, config=encoder_config)
    return out.hidden_states[-2] if plus else out.image_embeds

  feats = features(pixels)
  return feats, (features(jnp.zeros_like(pixels)) if plus else jnp.zeros_like(feats))


@persistent_jit(static_argnames=("encoder_config", "proj_config"))
def _image_features(encoder_params, pixels, *, encoder_config, proj_config):
  return _features(encoder_params, pixels, encoder_config, proj_config)


def image_features(adapter: IPAdapter, pixels) -> tuple[jax.Array, jax.Array]:
  """(cond, uncond) image features before the projection (Plus: the encoder's penultimate states [B, T, D]; base:
  its image embeddings [B, D]): what image morphing interpolates."""
  return _image_features(adapter.encoder_params, pixels, encoder_config=adapter.encoder_config,
                         proj_config=adapter.proj_config)


@persistent_jit(static_argnames=("proj_config",))
def _project(proj_params, features, *, proj_config):
  return image_proj.project(proj_params, features, config=proj_config)


def project_features(adapter: IPAdapter, features) -> jax.Array:
  """Image tokens [B, num_tokens, C] of image features (`image_features`)."""
  return _project(adapter.proj_params, features, proj_config=adapter.proj_config)


def _flatten(a: IPAdapter):
  return (a.encoder_params, a.proj_params, a.layers), (a.encoder_config, a.proj_config, a.source)


def _unflatten(aux, children):
  return IPAdapter(aux[0], children[0], aux[1], children[1], children[2], aux[2])


jax.tree_util.register_pytree_node(IPAdapter, _flatten, _unflatten)


def preprocess_references(images, adapter: IPAdapter) -> np.ndarray:
  """RGB PIL images -> CLIP pixels [B, S, S, 3] at the encoder's image size."""
  return np.stack([clip_vision.preprocess(im, adapter.encoder_config.image_size) for im in images])
