"""XLA's CPU compiler settings for kadiff processes: one place, applied before JAX starts its backend.

jaxlib 0.10's CPU compiler hands dots and convolutions to YNNPACK fusions.
Each such fusion runs on one thread, and a UNet step is a chain of them, so
a whole KA-Diff pass keeps one core busy however many there are (a profile of
the tiny 256 px, 50-step job on 2 cores: the two threads overlap 2 % of the
time). XLA's own dot and convolution kernels split each op over every core:
with them the same job, run in-process with warm programs, takes 2.7 s
instead of 3.9 s on 2 cores, with the same results within fp32 rounding.

`configure()` adds `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK
fusions) to XLA_FLAGS, for the jaxlib versions it was measured on (other
versions may not know the flag, and XLA aborts on an unknown one), unless
XLA_FLAGS already chooses a value or KADIFF_XLA_CPU=default asks for XLA's
own defaults. XLA reads XLA_FLAGS once, when JAX first creates a backend:
the `kadiff` command calls it before anything touches a device; library
users call it first thing (`kadiff_jax.xla_cpu.configure()`), or set the flag
themselves.
"""

from __future__ import annotations

import os

YNN_FUSIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type="
MEASURED_JAXLIB = ("0.10.",)  # versions whose CPU compiler has the flag (and was measured)


def xla_flags(current: str, jaxlib_version: str, choice: str = "") -> str:
  """XLA_FLAGS with our CPU settings added to `current` (unchanged where they do not apply)."""
  name = YNN_FUSIONS_OFF.rstrip("=")
  if choice == "default" or not jaxlib_version.startswith(MEASURED_JAXLIB) or name in current:
    return current
  return f"{current} {YNN_FUSIONS_OFF}".strip()


def configure() -> None:
  """Sets XLA_FLAGS for this process (module docstring); call before the first JAX computation."""
  try:
    from jaxlib import version
  except ImportError:
    return
  choice = os.environ.get("KADIFF_XLA_CPU", "").strip().lower()
  flags = xla_flags(os.environ.get("XLA_FLAGS", ""), version.__version__, choice)
  if flags:
    os.environ["XLA_FLAGS"] = flags
