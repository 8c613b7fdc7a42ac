"""Loading IP-Adapter checkpoints in the public layouts (h94/IP-Adapter).

`.bin`: `{"image_proj": {...}, "ip_adapter": {...}}` (torch, weights_only);
`.safetensors`: the same keys prefixed `image_proj.` / `ip_adapter.`.
`ip_adapter` keys are `{n}.to_k_ip.weight` / `{n}.to_v_ip.weight` with n the
position of the layer's processor in diffusers' `unet.attn_processors` (down,
up, mid; attn1/attn2 alternating), mapped here to our layer paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from kadiff_jax.models import clip_vision, image_proj, unet
from kadiff_jax.models.ip_adapter import IPAdapter
from kadiff_jax.weights import convert, files, load

CLIP_VISION = load.ComponentSpec("image_encoder", renames=((r"^vision_model\.", ""),), ignore=(r"position_ids$",))
_RESAMPLER_RENAMES = ((r"^layers\.(\d+)\.0\.", r"layers.\1.attn."), (r"^layers\.(\d+)\.1\.0\.", r"layers.\1.ff_norm."),
                      (r"^layers\.(\d+)\.1\.1\.", r"layers.\1.ff_in."), (r"^layers\.(\d+)\.1\.3\.", r"layers.\1.ff_out."))
_RESAMPLER_BACK = ((r"^layers\.(\d+)\.attn\.", r"layers.\1.0."), (r"^layers\.(\d+)\.ff_norm\.", r"layers.\1.1.0."),
                   (r"^layers\.(\d+)\.ff_in\.", r"layers.\1.1.1."), (r"^layers\.(\d+)\.ff_out\.", r"layers.\1.1.3."))
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(image_proj, ip_adapter) state dicts of an IP-Adapter file."""
  if not path.is_file():
    raise files.CheckpointNotFound(f"IP-Adapter checkpoint {path} does not exist")
  if path.suffix == ".safetensors":
    flat = files.read_safetensors(path)
    parts: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
      head, _, rest = k.partition(".")
      if head not in parts:
        raise convert.WeightsError(f"{path}: key {k!r} is neither image_proj.* nor ip_adapter.*")
      parts[head][rest] = v
  else:
    parts = files.read_torch_bin(path)
  if not isinstance(parts, dict) or set(parts) != {"image_proj", "ip_adapter"}:
    got = sorted(parts) if isinstance(parts, dict) else type(parts).__name__
    raise convert.WeightsError(f"{path}: expected the IP-Adapter layout with 'image_proj' and 'ip_adapter', got {got}")
  return parts["image_proj"], parts["ip_adapter"]


def projection_config(state: dict[str, np.ndarray], path: Path):
  """The projection a checkpoint holds, from its key names and shapes."""
  if "latents" in state:
    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    dim = state["latents"].shape[2]
    return image_proj.ResamplerConfig(
        dim=dim, depth=depth, dim_head=64, heads=state["layers.0.0.to_q.weight"].shape[0] // 64,
        num_queries=state["latents"].shape[1], embedding_dim=state["proj_in.weight"].shape[1],
        output_dim=state["proj_out.weight"].shape[0], ff_mult=state["layers.0.1.1.weight"].shape[0] // dim)
  if "proj.weight" in state and "norm.weight" in state:
    cross = state["norm.weight"].shape[0]
    return image_proj.ImageProjConfig(clip_embeddings_dim=state["proj.weight"].shape[1], cross_attention_dim=cross,
                                      num_tokens=state["proj.weight"].shape[0] // cross)
  raise convert.WeightsError(f"{path}: image_proj holds {sorted(state)[:6]}...; only IP-Adapter-Plus (Resampler) "
                             "and base (ImageProjModel) checkpoints are supported")


def layer_params(state: dict[str, np.ndarray], unet_config: unet.UNetConfig, path: Path, dtype=np.float32):
  """ip_adapter keys -> {site path: {"to_k_ip": kernel, "to_v_ip": kernel}}, strictly."""
  sites = {s.processor_index: s for s in unet.attention_sites(unet_config).values() if s.kind == "cross"}
  found: dict[int, dict[str, np.ndarray]] = {}
  for k, v in state.items():
    m = _IP_KEY.match(k)
    if not m:
      raise convert.WeightsError(f"{path}: unexpected ip_adapter key {k!r} (expected '{{n}}.to_k_ip.weight')")
    found.setdefault(int(m.group(1)), {})[m.group(2)] = v
  if set(found) != set(sites):
    raise convert.WeightsError(
        f"{path}: the checkpoint has {len(found)} cross-attention layers (keys {_span(found)}), this UNet has "
        f"{len(sites)} (keys {_span(sites)}); the adapter was made for another UNet")
  out = {}
  for n, site in sites.items():
    kv = found[n]
    if set(kv) != {"to_k_ip", "to_v_ip"}:
      raise convert.WeightsError(f"{path}: layer {n} has {sorted(kv)}, expected to_k_ip and to_v_ip")
    want = (site.channels, unet_config.cross_attention_dim[0])
    for name, w in kv.items():
      if tuple(w.shape) != want:
        raise convert.WeightsError(f"{path}: {n}.{name}.weight has shape {tuple(w.shape)}, the UNet layer "
                                   f"{site.path} needs {want}")
    out[site.path] = {name: np.ascontiguousarray(np.asarray(w, np.float32).T).astype(dtype) for name, w in kv.items()}
  return out


def _span(keys) -> str:
  keys = sorted(keys)
  return f"{keys[0]}..{keys[-1]}" if keys else "none"


def load_ip_adapter(checkpoint: str | Path, image_encoder: str | Path, unet_config: unet.UNetConfig, *,
                    dtype=np.float32, cache_dir=None) -> IPAdapter:
  """Loads an IP-Adapter file and its CLIP image encoder folder, checked against the UNet."""
  checkpoint, image_encoder = Path(checkpoint), Path(image_encoder)
  if not image_encoder.is_dir():
    raise files.CheckpointNotFound(f"image encoder folder {image_encoder} does not exist (IP-Adapter needs the "
                                   "CLIPVisionModelWithProjection it was trained with, e.g. models/image_encoder)")
  proj_state, ip_state = read_checkpoint(checkpoint)
  pcfg = projection_config(proj_state, checkpoint)
  ecfg = clip_vision.CLIPVisionConfig.from_transformers(files.read_json(image_encoder / "config.json"))
  want = pcfg.embedding_dim if isinstance(pcfg, image_proj.ResamplerConfig) else pcfg.clip_embeddings_dim
  have = ecfg.hidden_size if isinstance(pcfg, image_proj.ResamplerConfig) else ecfg.projection_dim
  if want != have:
    raise convert.WeightsError(f"{checkpoint} expects image features of width {want}; the image encoder at "
                               f"{image_encoder} gives {have}")
  out_dim = pcfg.output_dim if isinstance(pcfg, image_proj.ResamplerConfig) else pcfg.cross_attention_dim
  if out_dim != unet_config.cross_attention_dim[0]:
    raise convert.WeightsError(f"{checkpoint} makes {out_dim}-wide tokens; the UNet's cross_attention_dim is "
                               f"{unet_config.cross_attention_dim[0]}: the adapter was made for another model family "
                               "(e.g. an SDXL adapter on SD1.5; use the adapter made for this model)")
  spec = load.ComponentSpec("image_proj", renames=_RESAMPLER_RENAMES if isinstance(pcfg, image_proj.ResamplerConfig)
                            else ())
  proj = load.cached_params(  # converting needs the projection's init traced (about 0.4 s): cached like the rest
      [checkpoint], spec, pcfg, lambda: (convert.torch_to_params(
          proj_state, image_proj.init_shapes(pcfg), component=f"image_proj ({checkpoint})", renames=spec.renames,
          dtype=dtype), f"{len(proj_state)} tensors from {checkpoint.name}"), dtype=dtype, cache_dir=cache_dir)
  enc = load.load_component(image_encoder, CLIP_VISION, lambda: clip_vision.init_shapes(ecfg), ecfg, dtype=dtype,
                            cache_dir=cache_dir)
  return IPAdapter(ecfg, enc, pcfg, proj, layer_params(ip_state, unet_config, checkpoint, dtype), str(checkpoint))


def adapter_state(adapter: IPAdapter, unet_config: unet.UNetConfig) -> dict[str, np.ndarray]:
  """The public safetensors layout (prefixed keys) of an adapter; the inverse of loading."""
  proj = convert.params_to_torch(adapter.proj_params)
  if adapter.plus:
    for pat, rep in _RESAMPLER_BACK:
      proj = {re.sub(pat, rep, k): v for k, v in proj.items()}
  sites = unet.attention_sites(unet_config)
  out = {f"image_proj.{k}": v for k, v in proj.items()}
  for path, kv in adapter.layers.items():
    for name, w in kv.items():
      out[f"ip_adapter.{sites[path].processor_index}.{name}.weight"] = np.ascontiguousarray(np.asarray(w).T)
  return out
