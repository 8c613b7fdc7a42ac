"""Loading one model component: read, convert strictly, cache the converted params.

The first load of a component converts the torch checkpoint and saves the
params as one safetensors file under `cache_dir`/params, keyed by the source
files (name, size, mtime), the target dtype and the converter version, its
keys the params' tree paths; later loads read it back (no conversion, no
checkpointing framework: one file, read at disk speed, by any process). A
log line says which path was taken.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax.weights import convert, files

log = logging.getLogger("kadiff_jax")

CONVERTER_VERSION = 1  # bump when the conversion of any component changes


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
  """How to map one component's torch keys onto our params."""

  name: str
  renames: tuple[tuple[str, str], ...] = ()
  ignore: tuple[str, ...] = ()


UNET = ComponentSpec("unet")
VAE = ComponentSpec("vae", renames=(  # pre-0.14 diffusers attention names, still in some checkpoints
    (r"\.attentions\.0\.query\.", ".attentions.0.to_q."), (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
    (r"\.attentions\.0\.value\.", ".attentions.0.to_v."), (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.0.")))
CLIP_TEXT = ComponentSpec("text_encoder", renames=((r"^text_model\.", ""),), ignore=(r"position_ids$",))


def default_cache_dir() -> Path:
  """The one cache root (converted params, XLA programs, references, tiny models, web pages): $KADIFF_CACHE,
  else $XDG_CACHE_HOME/kadiff_jax, else ~/.cache/kadiff_jax."""
  if os.environ.get("KADIFF_CACHE"):
    return Path(os.environ["KADIFF_CACHE"]).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kadiff_jax"


@functools.lru_cache(maxsize=1)
def _model_code_version() -> str:
  """A hash of the model definitions' source: a param tree only changes when these files do."""
  h = hashlib.sha256()
  for f in sorted((Path(__file__).parents[1] / "models").glob("*.py")):
    h.update(f.read_bytes())
  return h.hexdigest()[:16]


def _fingerprint(sources: list[Path], spec: ComponentSpec, dtype, config) -> str:
  h = hashlib.sha256()
  for f in sources:
    st = f.stat()
    h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  h.update(json.dumps([spec.name, spec.renames, spec.ignore, jnp.dtype(dtype).name, CONVERTER_VERSION,
                       _model_code_version(), repr(config)]).encode())
  return h.hexdigest()[:20]


def load_component(folder: Path, spec: ComponentSpec, expected: Callable[[], Any], config, *, dtype=jnp.float32,
                   variant: str | None = None, cache_dir: Path | None = None, use_cache: bool = True):
  """Params from the checkpoint in `folder` for the model `config`, whose param shapes `expected()` gives (a
  ShapeDtypeStruct tree; only evaluated to convert, since tracing a model's init costs seconds)."""
  def convert_folder():
    state, read = files.read_state_dict(folder, variant)
    params = convert.torch_to_params(state, expected(), component=f"{spec.name} ({folder})", renames=spec.renames,
                                     ignore=spec.ignore, dtype=np.dtype(jnp.dtype(dtype)))
    return params, f"{len(state)} tensors from {', '.join(f.name for f in read)}"
  return cached_params(files.weight_files(folder, variant), spec, config, convert_folder, dtype=dtype,
                       cache_dir=cache_dir, use_cache=use_cache)


def cached_params(sources: list[Path], spec: ComponentSpec, config, convert_sources: Callable[[], tuple[Any, str]],
                  *, dtype=jnp.float32, cache_dir: Path | None = None, use_cache: bool = True):
  """Params converted from the checkpoint files `sources` by `convert_sources()` -> (params, what it read), kept
  in the params cache under a fingerprint of the files, the spec, the dtype, the config and the model code."""
  key = _fingerprint(sources, spec, dtype, config)
  cache = (cache_dir or default_cache_dir()) / "params" / f"{spec.name}-{key}.safetensors"
  t0 = time.perf_counter()
  if use_cache and cache.is_file():
    try:
      params = _read_params(cache, jnp.dtype(dtype))
      log.info("%s: read converted params from the cache %s (%.2fs)", spec.name, cache, time.perf_counter() - t0)
      return params
    except Exception as e:  # derived data, damaged or foreign (safetensors' own errors included): convert again
      log.warning("%s: params cache %s unreadable (%s); converting again", spec.name, cache, e)
  params, read = convert_sources()
  log.info("%s: converted %s (%.2fs)", spec.name, read, time.perf_counter() - t0)
  if use_cache:
    try:
      cache.parent.mkdir(parents=True, exist_ok=True)
      _atomic(cache, lambda p: _write_params(p, params))
      log.info("%s: cached converted params at %s", spec.name, cache)
    except OSError as e:
      log.warning("%s: could not write the params cache %s: %s", spec.name, cache, e)
  return params


def _write_params(path: Path, params) -> None:
  """A nested dict of arrays as safetensors keyed by '/'-joined paths; bf16 (not numpy's) stored as its bits."""
  from safetensors.numpy import save_file
  flat = {}
  for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.ascontiguousarray(leaf)
    flat["/".join(k.key for k in p)] = a.view(np.uint16) if a.dtype == jnp.bfloat16 else a
  dtype = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name
  save_file(flat, str(path), metadata={"dtype": dtype, "converter": str(CONVERTER_VERSION)})


def _read_params(path: Path, dtype):
  """The nested dict `_write_params` wrote; a file of another dtype is a ValueError."""
  from safetensors import safe_open
  params: dict = {}
  with safe_open(str(path), "np") as f:
    stored = (f.metadata() or {}).get("dtype")
    if stored != dtype.name:
      raise ValueError(f"cached as {stored}, expected {dtype.name}")
    for name in f.keys():
      a = f.get_tensor(name)
      *parents, leaf = name.split("/")
      node = params
      for k in parents:
        node = node.setdefault(k, {})
      node[leaf] = a.view(jnp.bfloat16) if dtype == jnp.bfloat16 else a
  if not params:
    raise ValueError("no tensors")
  return params


def save_component(folder: Path, state: dict[str, np.ndarray], config: dict, *,
                   weights_name: str = "diffusion_pytorch_model.safetensors") -> None:
  """Writes a torch-named state dict as fp32 safetensors plus `config.json` (each file atomically)."""
  from safetensors.numpy import save_file
  folder.mkdir(parents=True, exist_ok=True)
  state = {k: np.array(v, np.float32, order="C") for k, v in state.items()}  # 0-d stays 0-d
  _atomic(folder / weights_name, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
  _atomic(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  write(tmp)
  os.replace(tmp, path)
