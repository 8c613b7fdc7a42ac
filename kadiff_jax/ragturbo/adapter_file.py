"""A trained H-space adapter as one safetensors file: diffusers `Transformer2DModel` names, config in the metadata.

The metadata holds the format tag, the adapter config and the identity of the
model it was trained with (`database.model_identity`). `kadiff train
hspace-adapter` writes one next to its checkpoints; `--hspace adapter:FILE`
reads it. `adapter:init` is the untrained adapter (zero proj_out), which
leaves every image as plain one-step generation makes it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import numpy as np

from kadiff_jax.models import hspace_adapter
from kadiff_jax.weights import convert

log = logging.getLogger("kadiff_jax")
FORMAT = "kadiff-hspace-adapter"
LORA_PREFIX, LORA_SEP = "lora::", "::"  # LoRA tensors: lora::{kernel param path}::a|b


class AdapterFileError(ValueError):
  """An adapter file is missing, damaged, or made for another UNet."""


def save(path: str | os.PathLike, params, config: hspace_adapter.HSpaceAdapterConfig, model: dict,
         lora: dict | None = None) -> Path:
  """Writes the adapter (and the student decoder's LoRA, if any) atomically: a sibling temporary file renamed into
  place."""
  from safetensors.numpy import save_file
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  state = {k: np.asarray(v, np.float32) for k, v in convert.params_to_torch(jax.device_get(params)).items()}
  for kernel, ab in (lora or {}).items():
    for part in ("a", "b"):
      state[f"{LORA_PREFIX}{kernel}{LORA_SEP}{part}"] = np.asarray(ab[part], np.float32)
  meta = {"format": FORMAT, "config": json.dumps(config.to_json()), "model": json.dumps(model)}
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  save_file(state, str(tmp), metadata=meta)
  os.replace(tmp, path)
  return path


def load(path: str | os.PathLike, unet_config, model: dict | None = None):
  """(params, config, lora) of an adapter file, checked against the UNet it will run in (`model`: the identity of
  the loaded model; another one is allowed with a warning, as a fine-tune of the same student may be). `lora` maps
  kernel paths to {"a", "b"} ({} when the file has none)."""
  from safetensors import SafetensorError, safe_open
  path = Path(path)
  if not path.is_file():
    raise AdapterFileError(f"H-space adapter {path}: no such file (train one with `kadiff train hspace-adapter`, "
                           "or use adapter:init for the untrained one)")
  try:
    with safe_open(str(path), "np") as f:
      meta = f.metadata() or {}
      state = {k: f.get_tensor(k) for k in f.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    raise AdapterFileError(f"H-space adapter {path} is not a readable safetensors file ({e})") from None
  if meta.get("format") != FORMAT:
    raise AdapterFileError(f"{path}: metadata format {meta.get('format')!r}; expected {FORMAT!r} (a file written by "
                           "`kadiff train hspace-adapter`)")
  try:
    config = hspace_adapter.HSpaceAdapterConfig(**json.loads(meta["config"]))
    trained_with = json.loads(meta.get("model", "{}"))
  except (KeyError, TypeError, json.JSONDecodeError) as e:
    raise AdapterFileError(f"{path}: unreadable adapter config in its metadata ({e})") from None
  want = hspace_adapter.HSpaceAdapterConfig.for_unet(unet_config)
  if config.channels != want.channels:
    raise AdapterFileError(f"{path}: an adapter for {config.channels}-channel H-space maps; this UNet's mid block "
                           f"has {want.channels}")
  lora = {}
  for key in [k for k in state if k.startswith(LORA_PREFIX)]:
    kernel, _, part = key[len(LORA_PREFIX):].rpartition(LORA_SEP)
    lora.setdefault(kernel, {})[part] = state.pop(key)
  if any(set(ab) != {"a", "b"} for ab in lora.values()):
    raise AdapterFileError(f"{path}: a LoRA kernel without both its a and b tensors")
  shapes = jax.eval_shape(lambda k: hspace_adapter.init_params(config, k), jax.random.PRNGKey(0))
  try:
    params = convert.torch_to_params(state, shapes, component=f"H-space adapter ({path})")
  except (KeyError, ValueError) as e:
    raise AdapterFileError(f"{path}: {e}") from None
  if model is not None and trained_with.get("fingerprint") not in (None, model.get("fingerprint")):
    log.warning("H-space adapter %s was trained with %s (fingerprint %s); the loaded model %s has fingerprint %s",
                path, trained_with.get("source"), trained_with.get("fingerprint"), model.get("source"),
                model.get("fingerprint"))
  return params, config, lora
