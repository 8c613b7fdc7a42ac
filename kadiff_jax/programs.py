"""Traced programs kept between processes: `jax.export` of the big jitted functions, stored in the cache.

JAX's persistent compilation cache spares a second process XLA's compile,
but not tracing: every process still runs the Python of the UNet, its hooks
and the scans to build the program before the cache is even asked. A
function wrapped with `persistent_jit` is, on its first call with given
shapes and static arguments, traced once, exported (`jax.export`) and
serialised under `$KADIFF_CACHE/programs/`; later processes deserialise it
and call it without tracing (its compile then hits the compilation cache).

The key covers the function's name, a hash of every kadiff_jax source
file, the JAX version, the platform and device kind, the static arguments'
repr, the argument tree and every leaf's shape, dtype and weak type. Anything that cannot be keyed or
exported safely runs as the plain jitted function: static arguments whose
repr holds an object address, arrays spread over more than one device,
multi-process runs, or an export or serialisation error.
`KADIFF_PROGRAM_CACHE=off` turns it off; `=DIR` moves it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger("kadiff_jax")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


@functools.lru_cache(maxsize=1)
def source_version() -> str:
  """A hash of every kadiff_jax source file: a program traced from other code is another program."""
  root = Path(__file__).parent
  digest = hashlib.sha256(jax.__version__.encode())
  for path in sorted(root.rglob("*.py")):
    digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
  return digest.hexdigest()[:16]


def cache_dir() -> Path | None:
  where = os.environ.get("KADIFF_PROGRAM_CACHE")
  if where and where.lower() == "off":
    return None
  if where:
    return Path(where)
  from kadiff_jax.weights.load import default_cache_dir
  return default_cache_dir() / "programs"


def _leaf_key(leaf) -> str | None:
  """shape/dtype/weak-type of a leaf; None when the leaf lives on several devices or is being traced."""
  if isinstance(leaf, jax.core.Tracer):
    return None
  if isinstance(leaf, jax.Array):
    if len(leaf.sharding.device_set) > 1:
      return None
    return f"{leaf.shape}{leaf.dtype}{leaf.weak_type}"
  if isinstance(leaf, (bool, int, float)):
    return f"py{type(leaf).__name__}"
  a = np.asarray(leaf)
  return f"{a.shape}{a.dtype}"


class PersistentJit:
  """A `jax.jit` whose traced program is exported to and read from the program cache (module docstring)."""

  def __init__(self, fn, static_argnames: tuple[str, ...]):
    self.jitted = jax.jit(fn, static_argnames=static_argnames)
    self.static_argnames = tuple(static_argnames)
    self.name = f"{fn.__module__}.{fn.__qualname__}"
    self._programs: dict[str, object] = {}
    functools.update_wrapper(self, fn)

  def __getattr__(self, name):  # lower, trace, eval_shape...: the plain jitted function's
    return getattr(self.jitted, name)

  def _key(self, args, dynamic, static) -> str | None:
    leaves, tree = jax.tree_util.tree_flatten((args, dynamic))
    keys = [_leaf_key(leaf) for leaf in leaves]
    static_repr = repr(sorted(static.items()))
    if None in keys or _ADDRESS.search(static_repr) or jax.process_count() > 1:
      return None
    device = jax.devices()[0]  # a program exported for one platform does not run on another
    text = "|".join([self.name, source_version(), device.platform, device.device_kind, static_repr, str(tree), *keys])
    return hashlib.sha256(text.encode()).hexdigest()[:32]

  def _program(self, key: str, folder: Path, args, dynamic, static):
    path = folder / f"{self.name}-{key}.jaxexport"
    if path.is_file():
      try:
        return jax.jit(jax.export.deserialize(bytearray(path.read_bytes())).call)
      except Exception as e:  # damaged or from an incompatible jaxlib: export again
        log.debug("program cache %s unreadable (%s); exporting again", path, e)
    exported = jax.export.export(self.jitted)(*args, **dynamic, **static)
    blob = exported.serialize()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return jax.jit(exported.call)

  def __call__(self, *args, **kwargs):
    static = {k: v for k, v in kwargs.items() if k in self.static_argnames}
    dynamic = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
    folder = cache_dir()
    key = self._key(args, dynamic, static) if folder is not None else None
    if key is None:
      return self.jitted(*args, **kwargs)
    program = self._programs.get(key)
    if program is None:
      try:
        program = self._program(key, folder, args, dynamic, static)
      except Exception as e:  # not exportable or not serialisable: the plain jit is always right
        log.debug("%s: not kept in the program cache (%s: %s)", self.name, type(e).__name__, e)
        program = False
      self._programs[key] = program
    if program is False:
      return self.jitted(*args, **kwargs)
    return program(*args, **dynamic)


def serializable(cls):
  """Class decorator for a NamedTuple that is an argument or result of a `persistent_jit` function: registers it
  for `jax.export` serialisation under its module path, so a later process can read the program back."""
  jax.export.register_namedtuple_serialization(cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}")
  return cls


def persistent_jit(*, static_argnames: tuple[str, ...] = ()):
  """Decorator: `jax.jit(fn, static_argnames=...)` with its traced program kept in the program cache."""
  return lambda fn: PersistentJit(fn, static_argnames)
