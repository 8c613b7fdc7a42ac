"""Programs kept between processes: the big jitted functions' XLA executables (or traces), in the cache.

JAX's persistent compilation cache spares a second process XLA's compile,
but not tracing or lowering: every process still runs the Python of the
UNet, its hooks and the scans to build the program, lowers it to StableHLO
and hashes it before the cache is even asked. A function wrapped with
`persistent_jit` is, on its first call with given shapes and static
arguments, traced, lowered and compiled once, and the compiled executable
is serialised under `$KADIFF_CACHE/programs/` (`.xla`); later processes
load it and call it: no tracing, no lowering, no compiling. When XLA's
compilation cache supplied the executable instead, it cannot be serialised
again (on CPU such an executable serialises incompletely and fails when run
after loading), so the traced program is kept instead (`jax.export`,
`.jaxexport`); the next process reads it, skips tracing, compiles it and,
when that compile is fresh (the exported module is not the module XLA's
cache holds, unless an earlier trace put it there), keeps the executable
in its place.

The key covers the function's name, a hash of every kadiff_jax source
file, the JAX and jaxlib versions, XLA_FLAGS, the platform, device kind,
device count and the device the arguments are on, the static arguments'
repr, the argument tree and every leaf's shape, dtype and weak type.
Anything that cannot be keyed or kept safely runs as the plain jitted
function: static arguments whose repr holds an object address, arrays
spread over more than one device, multi-process runs, calls under another
trace, or an error while compiling, serialising or loading. Executables are
pickles, as trusted as the rest of the cache (loading one runs code).
`KADIFF_PROGRAM_CACHE=off` turns it off; `=DIR` moves it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
from pathlib import Path

import jax
import numpy as np
from jax.experimental import serialize_executable
from jaxlib import version as jaxlib_version

log = logging.getLogger("kadiff_jax")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
LOADED_EVENT = "/kadiff/program_cache/loaded"  # counted by compile_cache.CompileLog


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


def _leaf_key(leaf, devices: set) -> str | None:
  """shape/dtype/weak-type of a leaf (adding its device to `devices`); None when the leaf lives on several devices
  or is being traced."""
  if isinstance(leaf, jax.core.Tracer):
    return None
  if isinstance(leaf, jax.Array):
    if len(leaf.sharding.device_set) > 1:
      return None
    devices |= leaf.sharding.device_set
    return f"{leaf.shape}{leaf.dtype}{leaf.weak_type}"
  if isinstance(leaf, (bool, int, float)):
    return f"py{type(leaf).__name__}"
  a = np.asarray(leaf)
  return f"{a.shape}{a.dtype}"


class PersistentJit:
  """A `jax.jit` whose traced program is exported to and read from the program cache (module docstring)."""

  def __init__(self, fn, static_argnames: tuple[str, ...], cpu_options: dict | None = None):
    self.jitted = jax.jit(fn, static_argnames=static_argnames)
    self.static_argnames = tuple(static_argnames)
    self.cpu_options = cpu_options
    self.name = f"{fn.__module__}.{fn.__qualname__}"
    self._programs: dict[str, object] = {}
    functools.update_wrapper(self, fn)

  def __getattr__(self, name):  # lower, trace, eval_shape...: the plain jitted function's
    return getattr(self.jitted, name)

  def _key(self, args, dynamic, static) -> tuple[str, object] | None:
    """(key, the device the program runs on), or None when the call cannot be kept (module docstring)."""
    leaves, tree = jax.tree_util.tree_flatten((args, dynamic))
    devices: set = set()
    keys = [_leaf_key(leaf, devices) for leaf in leaves]
    static_repr = repr(sorted(static.items()))
    if None in keys or len(devices) > 1 or _ADDRESS.search(static_repr) or jax.process_count() > 1:
      return None
    device = devices.pop() if devices else jax.devices()[0]
    text = "|".join([self.name, source_version(), jaxlib_version.__version__, os.environ.get("XLA_FLAGS", ""),
                     device.platform, device.device_kind, str(jax.device_count()), str(device.id), static_repr,
                     str(tree), *keys])
    return hashlib.sha256(text.encode()).hexdigest()[:32], device

  def _program(self, key: str, device, folder: Path, args, dynamic, static):
    executable = folder / f"{self.name}-{key}.xla"
    traced = folder / f"{self.name}-{key}.jaxexport"
    if executable.is_file():
      try:
        blob, in_tree, out_tree = pickle.loads(executable.read_bytes())
        program = serialize_executable.deserialize_and_load(blob, in_tree, out_tree, backend=device.client,
                                                            execution_devices=[device])
        jax.monitoring.record_event(LOADED_EVENT)
        return program
      except Exception as e:  # damaged, or from another jaxlib: compile again
        log.debug("program cache %s unreadable (%s); compiling again", executable, e)
        executable.unlink(missing_ok=True)
    lower = lambda: self.jitted.lower(*args, **dynamic, **static)
    if traced.is_file():  # a kept trace: no tracing here; compiled below, kept as an executable when fresh
      try:
        call = jax.jit(jax.export.deserialize(bytearray(traced.read_bytes())).call)
        lower = lambda: call.lower(*args, **dynamic)
        jax.monitoring.record_event(LOADED_EVENT)
      except Exception as e:
        log.debug("program cache %s unreadable (%s); compiling again", traced, e)
    hits = []
    count_hits = lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None
    jax.monitoring.register_event_listener(count_hits)
    try:
      with jax.default_device(device):
        compiled = lower().compile(self.cpu_options if device.platform == "cpu" else None)
    finally:
      jax.monitoring.unregister_event_listener(count_hits)
    try:
      if not hits:
        _write(executable, pickle.dumps(serialize_executable.serialize(compiled)))
        traced.unlink(missing_ok=True)
      elif not traced.is_file():  # from XLA's cache, so not serialisable again (module docstring): keep the trace
        _write(traced, jax.export.export(self.jitted)(*args, **dynamic, **static).serialize())
    except Exception as e:  # e.g. constants closed over: the compiled program still runs, it is just not kept
      log.debug("%s: not kept in the program cache (%s: %s)", self.name, type(e).__name__, e)
    return compiled

  def __call__(self, *args, **kwargs):
    static = {k: v for k, v in kwargs.items() if k in self.static_argnames}
    dynamic = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
    folder = cache_dir()
    keyed = self._key(args, dynamic, static) if folder is not None else None
    if keyed is None:
      return self.jitted(*args, **kwargs)
    key, device = keyed
    program = self._programs.get(key)
    if program is None:
      try:
        program = self._program(key, device, folder, args, dynamic, static)
      except Exception as e:  # not compilable ahead of the call this way: the plain jit is always right
        log.debug("%s: not kept in the program cache (%s: %s)", self.name, type(e).__name__, e)
        program = False
      self._programs[key] = program
    if program is False:
      return self.jitted(*args, **kwargs)
    return program(*args, **dynamic)


def _write(path: Path, blob: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_bytes(blob)
  os.replace(tmp, path)


def serializable(cls):
  """Class decorator for a NamedTuple that is an argument or result of a `persistent_jit` function: registers it
  for `jax.export` serialisation under its module path, so a later process can read a kept trace back."""
  jax.export.register_namedtuple_serialization(cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}")
  return cls


def persistent_jit(*, static_argnames: tuple[str, ...] = (), cpu_options: dict | None = None):
  """Decorator: `jax.jit(fn, static_argnames=...)` with its compiled program kept in the program cache;
  `cpu_options` are XLA compiler options for its CPU compiles (the plain jitted fallback compiles without)."""
  return lambda fn: PersistentJit(fn, static_argnames, cpu_options)
