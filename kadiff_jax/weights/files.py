"""Finding and reading checkpoint files in diffusers / transformers folder layouts.

Reads `*.safetensors` (single or sharded with `*.safetensors.index.json`,
optionally the `fp16`-style variant) into numpy without torch, and `.bin`
only through `torch.load(weights_only=True)`. Hub ids are resolved with
`huggingface_hub` when a network exists.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

log = logging.getLogger("kadiff_jax")

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_STEMS = ("diffusion_pytorch_model", "model")


class CheckpointNotFound(FileNotFoundError):
  """A model folder, subfolder or weight file is missing."""


class CheckpointError(ValueError):
  """A weight file that exists but cannot be read as what it claims to be."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (BF16 via ml_dtypes); a damaged file is named."""
  bad = lambda why: CheckpointError(f"{path} is not a valid .safetensors file: {why}")
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size < 8:
      raise bad("shorter than its 8-byte header length")
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  (n,) = struct.unpack("<Q", buf[:8])
  if 8 + n > len(buf):
    raise bad(f"the header claims {n} bytes, the file has {len(buf) - 8} after the length (truncated?)")
  try:
    header = json.loads(buf[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"its header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise bad(f"its header is a JSON {type(header).__name__}, expected an object")
  out = {}
  data_len = len(buf) - 8 - n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, (start, end), shape = info["dtype"], info["data_offsets"], tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError):
      raise bad(f"tensor {name!r} has a malformed entry {str(info)[:100]}") from None
    if dtype not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which kadiff-jax cannot read")
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    if not 0 <= start <= end <= data_len or (end - start) != int(np.prod(shape)) * itemsize:
      raise bad(f"tensor {name!r} spans bytes {start}-{end} for shape {shape}, but the data has {data_len} "
                "bytes (truncated?)")
    out[name] = np.frombuffer(buf, dtype=_DTYPES[dtype], count=(end - start) // itemsize,
                              offset=8 + n + start).reshape(shape)
  return out


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A PyTorch pickle checkpoint, loaded safely (weights_only=True)."""
  try:
    import torch
  except ImportError:
    raise CheckpointNotFound(f"{path} is a PyTorch .bin checkpoint; reading it needs torch "
                             "(pip install 'kadiff-jax[test]' or torch), or convert it to .safetensors") from None
  import pickle
  import zipfile
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(f"{path}: refused to unpickle it (only tensors and plain containers are loaded; "
                          f"{str(e).splitlines()[0]})") from None
  except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
    raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if not isinstance(state, dict):
    raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict")
  return torch_state_to_numpy(state)


def torch_state_to_numpy(state) -> dict:
  """The one torch -> numpy bridge for (nested) state dicts."""
  import torch

  def conv(v):
    if isinstance(v, dict):
      return {k: conv(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      if v.dtype == torch.bfloat16:
        return v.float().numpy().astype(ml_dtypes.bfloat16)
      return v.numpy()
    return v

  return conv(state)


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
  """The weight files of one component folder, safetensors preferred."""
  var = f".{variant}" if variant else ""
  for ext in ("safetensors", "bin"):
    for stem in _STEMS:
      single = folder / f"{stem}{var}.{ext}"
      if single.is_file():
        return [single]
      index = folder / f"{stem}.{ext}.index{var}.json"
      if not index.is_file():
        index = folder / f"{stem}{var}.{ext}.index.json"
      if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
          raise CheckpointNotFound(f"{index} lists shards that are missing: {missing}")
        return [folder / s for s in shards]
  found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  raise CheckpointNotFound(
      f"no weights in {folder} for variant {variant!r}: expected diffusion_pytorch_model{var}.safetensors, "
      f"model{var}.safetensors, a sharded *.index.json or a .bin; the folder holds {found}")


def read_state_dict(folder: Path, variant: str | None = None) -> tuple[dict[str, np.ndarray], list[Path]]:
  """Reads every tensor of a component folder; returns (state, files read)."""
  files = weight_files(folder, variant)
  state: dict[str, np.ndarray] = {}
  for f in files:
    part = read_safetensors(f) if f.suffix == ".safetensors" else read_torch_bin(f)
    dup = set(part) & set(state)
    if dup:
      raise ValueError(f"{f}: keys also present in another shard: {sorted(dup)[:5]}")
    state.update(part)
  return state, files


def resolve_model(path_or_id: str, allow_patterns: Iterable[str] | None = None, revision: str | None = None) -> Path:
  """A local model folder, or a Hub id downloaded (or found in the HF cache)."""
  p = Path(path_or_id).expanduser()
  if p.exists():
    if not p.is_dir():
      raise CheckpointNotFound(f"model path {p} is a file; expected a diffusers folder with model_index.json")
    return p
  if path_or_id.count("/") != 1 or path_or_id.startswith((".", "/", "~")):
    raise CheckpointNotFound(f"model {path_or_id!r} is neither an existing folder nor a Hub id like 'owner/name'")
  from huggingface_hub import HfApi, constants, snapshot_download
  patterns = list(allow_patterns or []) or None
  if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE:
    try:
      return Path(snapshot_download(path_or_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
      raise CheckpointNotFound(f"HF_HUB_OFFLINE is set and {path_or_id!r} is not in the local Hugging Face cache; "
                               "pass a local folder, or unset HF_HUB_OFFLINE to download it") from None
  timeout = hub_timeout()
  log.info("resolving %s through huggingface_hub (%ss timeout)", path_or_id, timeout)
  try:
    # snapshot_download's own metadata request has no timeout: ask once with one, so a silent endpoint fails
    HfApi().repo_info(path_or_id, revision=revision, timeout=timeout)
    return Path(snapshot_download(path_or_id, revision=revision, allow_patterns=patterns, etag_timeout=timeout))
  except Exception as e:  # offline, unknown repo, gated, an endpoint that never answers...
    name = type(e).__name__
    if "Timeout" in name or "timed out" in str(e):
      raise CheckpointNotFound(f"the Hugging Face Hub ({constants.ENDPOINT}) did not answer within {timeout}s for "
                               f"{path_or_id!r}; set KADIFF_HUB_TIMEOUT, HF_HUB_OFFLINE=1, or pass a local "
                               "folder") from None
    raise CheckpointNotFound(f"could not fetch {path_or_id!r} from the Hugging Face Hub "
                             f"({name}: {str(e).splitlines()[0] if str(e) else ''}); pass a local folder "
                             "instead") from None


def hub_timeout() -> float:
  """Seconds to wait for the Hub to connect and answer (KADIFF_HUB_TIMEOUT, default 30)."""
  value = os.environ.get("KADIFF_HUB_TIMEOUT", "30")
  try:
    t = float(value)
  except ValueError:
    t = -1.0
  if not t > 0:
    raise ValueError(f"KADIFF_HUB_TIMEOUT={value!r}: expected a positive number of seconds")
  return t


def component_dir(root: Path, name: str) -> Path:
  sub = root / name
  if not sub.is_dir():
    raise CheckpointNotFound(f"{root} has no subfolder {name!r} (a diffusers pipeline folder needs it)")
  return sub


def read_json(path: Path) -> dict:
  if not path.is_file():
    raise CheckpointNotFound(f"missing {path}")
  try:
    data = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object")
  return data
