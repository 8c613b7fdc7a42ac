"""Loading one model component: read, convert strictly, cache with orbax.

The first load of a component converts the torch checkpoint and saves the
params with orbax-checkpoint under `cache_dir`, keyed by the source files
(name, size, mtime), the target dtype and the converter version; later loads
restore from there. A log line says which path was taken.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
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
  return Path(os.environ.get("KADIFF_CACHE", Path.home() / ".cache" / "kadiff_jax"))


def _fingerprint(sources: list[Path], spec: ComponentSpec, dtype, expected) -> str:
  h = hashlib.sha256()
  for f in sources:
    st = f.stat()
    h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
  h.update(json.dumps([spec.name, spec.renames, spec.ignore, jnp.dtype(dtype).name, CONVERTER_VERSION,
                       jax.tree_util.tree_leaves_with_path(shapes).__repr__()]).encode())
  return h.hexdigest()[:20]


def load_component(folder: Path, spec: ComponentSpec, expected: Any, *, dtype=jnp.float32,
                   variant: str | None = None, cache_dir: Path | None = None, use_cache: bool = True):
  """Params for `expected` (a ShapeDtypeStruct tree) from the checkpoint in `folder`."""
  if use_cache and jax.process_count() > 1:
    # orbax synchronises processes around saves and restores; independent per-process caching deadlocks
    log.info("%s: multi-process run, converting without the params cache", spec.name)
    use_cache = False
  sources = files.weight_files(folder, variant)
  key = _fingerprint(sources, spec, dtype, expected)
  cache = (cache_dir or default_cache_dir()) / "params" / f"{spec.name}-{key}"
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), jnp.dtype(dtype)), expected)
  t0 = time.perf_counter()
  if use_cache and (cache / "commit_success.txt").exists():
    try:
      params = _checkpointer().restore(cache, abstract)
      log.info("%s: restored converted params from orbax cache %s (%.2fs)", spec.name, cache, time.perf_counter() - t0)
      return params
    except Exception as e:  # a corrupt or foreign cache entry: convert again
      log.warning("%s: orbax cache %s unreadable (%s); converting again", spec.name, cache, e)
      shutil.rmtree(cache, ignore_errors=True)
  state, read = files.read_state_dict(folder, variant)
  params = convert.torch_to_params(state, expected, component=f"{spec.name} ({folder})", renames=spec.renames,
                                   ignore=spec.ignore, dtype=np.dtype(jnp.dtype(dtype)))
  log.info("%s: converted %d tensors from %s (%.2fs)", spec.name, len(state), ", ".join(f.name for f in read),
           time.perf_counter() - t0)
  if use_cache:
    try:
      cache.parent.mkdir(parents=True, exist_ok=True)
      tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
      shutil.rmtree(tmp, ignore_errors=True)
      ckpt = _checkpointer()
      ckpt.save(tmp, params)
      ckpt.wait_until_finished()
      os.replace(tmp, cache) if not cache.exists() else shutil.rmtree(tmp, ignore_errors=True)
      log.info("%s: cached converted params at %s", spec.name, cache)
    except OSError as e:
      log.warning("%s: could not write the params cache %s: %s", spec.name, cache, e)
  return params


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def save_component(folder: Path, state: dict[str, np.ndarray], config: dict, *,
                   weights_name: str = "diffusion_pytorch_model.safetensors") -> None:
  """Writes a torch-named state dict as fp32 safetensors plus `config.json` (each file atomically)."""
  from safetensors.numpy import save_file
  folder.mkdir(parents=True, exist_ok=True)
  state = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
  _atomic(folder / weights_name, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
  _atomic(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  write(tmp)
  os.replace(tmp, path)
