"""JAX's persistent compilation cache for the `kadiff` commands, and a count of what it saved.

Every command stores its compiled XLA programs under `$KADIFF_CACHE/xla`
(`KADIFF_COMPILE_CACHE=DIR`, or `off`), so a second run of the same shapes,
in any process, loads them instead of compiling. `CompileLog` counts, through
`jax.monitoring`, how many programs a command compiled and how many it loaded.
"""

from __future__ import annotations

import logging
import os


def enable() -> None:
  """JAX's persistent compilation cache under $KADIFF_CACHE/xla (KADIFF_COMPILE_CACHE=DIR or 'off'), so a
  second run of the same shapes loads its programs instead of compiling them again."""
  import jax
  from kadiff_jax.weights.load import default_cache_dir
  where = os.environ.get("KADIFF_COMPILE_CACHE") or str(default_cache_dir() / "xla")
  if where.lower() == "off":
    return
  jax.config.update("jax_compilation_cache_dir", where)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class CompileLog:
  """Counts programs compiled vs loaded from the persistent cache during a command (logged with -v)."""

  def __init__(self):
    self.counts: dict[str, float] = {}

  def event(self, name, **_):
    self.counts[name] = self.counts.get(name, 0) + 1

  def duration(self, name, seconds, **_):
    self.counts[name] = self.counts.get(name, 0) + seconds
    self.counts[name + "#"] = self.counts.get(name + "#", 0) + 1

  def __enter__(self):
    import jax
    from kadiff_jax.progress import compile_listener
    jax.monitoring.register_event_listener(self.event)
    jax.monitoring.register_event_duration_secs_listener(self.duration)
    jax.monitoring.register_event_duration_secs_listener(compile_listener)
    return self

  def __exit__(self, *exc):
    import jax
    jax.monitoring.unregister_event_listener(self.event)
    jax.monitoring.unregister_event_duration_listener(self.duration)
    from kadiff_jax.progress import compile_listener
    jax.monitoring.unregister_event_duration_listener(compile_listener)
    c = self.counts
    hits = c.get("/jax/compilation_cache/cache_hits", 0)
    from kadiff_jax.programs import LOADED_EVENT
    logging.getLogger("kadiff_jax").info(
        "XLA programs: %d compiled, %d loaded from the compilation cache (%.1fs of compiling saved), %d from the "
        "program cache; %.1fs in the backend", c.get("/jax/core/compile/backend_compile_duration#", 0) - hits, hits,
        c.get("/jax/compilation_cache/compile_time_saved_sec", 0), c.get(LOADED_EVENT, 0),
        c.get("/jax/core/compile/backend_compile_duration", 0))
