"""Feedback on long work: a log line when a step starts and its time when it ends, and compiles as they happen.

Commands log at INFO to stderr by default (`kadiff -v` adds our DEBUG lines
and tracebacks, `-v -v` the libraries' INFO lines), so a user sees what a
long step is doing: loading, converting, inverting, compiling, scoring.
"""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("kadiff_jax")


@contextlib.contextmanager
def step(what: str, *args):
  """Logs `what % args` on entry and again with its duration on exit when it took a second or more."""
  text = what % args if args else what
  log.info("%s ...", text)
  t0 = time.perf_counter()
  yield
  seconds = time.perf_counter() - t0
  if seconds >= 1:
    log.info("%s: %.1fs", text, seconds)


def compile_listener(name: str, seconds: float, **_) -> None:
  """A jax.monitoring duration listener: says when XLA compiles a program for a while (new shapes)."""
  if name == "/jax/core/compile/backend_compile_duration" and seconds >= 1:
    log.info("compiled an XLA program in %.1fs (first run of these shapes here; the compilation cache keeps it)",
             seconds)
