"""The program cache (`kadiff_jax.programs`): compiled once, read back by a later process without tracing, lowering
or compiling; and the CPU compiler settings (`kadiff_jax.xla_cpu`)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kadiff_jax import programs, xla_cpu

TRACES = []
COMPILES = []


def _count_compiles(event, seconds, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    COMPILES.append(seconds)


@dataclasses.dataclass(frozen=True)
class Config:
  depth: int


def _body(x, params, scale, *, config):
  TRACES.append(config)  # runs only while JAX traces the function
  for _ in range(config.depth):
    x = jnp.tanh(x @ params["w"]) * scale
  return {"y": x, "mean": x.mean()}


def _fresh():
  """The same function wrapped anew, as a new process builds it (a new function object: JAX's in-process trace
  cache cannot serve it)."""
  def body(x, params, scale, *, config):
    return _body(x, params, scale, config=config)
  return programs.PersistentJit(body, ("config",))


def test_program_is_compiled_once_and_read_back_without_tracing_or_compiling(tmp_path, monkeypatch):
  monkeypatch.setenv("KADIFF_PROGRAM_CACHE", str(tmp_path))
  monkeypatch.setenv("KADIFF_COMPILE_CACHE", "off")
  x, params = np.ones((3, 4), np.float32), {"w": jnp.eye(4) * 0.5}
  TRACES.clear()
  first = _fresh()(x, params, 2.0, config=Config(2))
  assert len(TRACES) == 1 and len(list(tmp_path.glob("*.xla"))) == 1
  COMPILES.clear()
  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  try:
    again = _fresh()(x, params, 3.0, config=Config(2))  # another "process", another scale: no tracing at all
  finally:
    jax.monitoring.unregister_event_duration_listener(_count_compiles)
  assert len(TRACES) == 1 and not COMPILES
  want = x
  for _ in range(2):
    want = np.tanh(want @ np.asarray(params["w"])) * 3.0
  np.testing.assert_allclose(np.asarray(again["y"]), want, rtol=1e-6)
  assert float(first["mean"]) != float(again["mean"])
  _fresh()(x, params, 2.0, config=Config(3))  # another static argument: another program
  _fresh()(np.ones((5, 4), np.float32), params, 2.0, config=Config(2))  # another shape: another program
  assert len(TRACES) == 3 and len(list(tmp_path.glob("*.xla"))) == 3


def test_damaged_program_is_compiled_again(tmp_path, monkeypatch):
  monkeypatch.setenv("KADIFF_PROGRAM_CACHE", str(tmp_path))
  x, params = np.ones((3, 4), np.float32), {"w": jnp.eye(4)}
  _fresh()(x, params, 1.0, config=Config(1))
  (path,) = tmp_path.glob("*.xla")
  path.write_bytes(b"not a program")
  TRACES.clear()
  out = _fresh()(x, params, 1.0, config=Config(1))
  # traced once; twice where XLA's compilation cache (on in this process if an earlier test ran the CLI) supplied
  # the executable, whose trace is then exported to be kept instead
  kept = list(tmp_path.glob("*.jaxexport"))
  assert (len(TRACES), len(kept)) in ((1, 0), (2, 1))
  assert not path.exists() or path.read_bytes() != b"not a program"
  np.testing.assert_allclose(np.asarray(out["y"]), np.tanh(np.ones((3, 4))), rtol=1e-6)


@pytest.mark.parametrize("case", ["off", "address", "traced"])
def test_what_is_not_kept(tmp_path, monkeypatch, case):
  """The cache off, a static argument without a stable repr, or a call under another trace: plain jit."""
  monkeypatch.setenv("KADIFF_PROGRAM_CACHE", "off" if case == "off" else str(tmp_path))
  x, params = np.ones((2, 4), np.float32), {"w": jnp.eye(4)}
  f = programs.PersistentJit(_body, ("config",))
  if case == "address":
    out = programs.PersistentJit(lambda x, p, s, *, config: _body(x, p, s, config=Config(1)), ("config",))(
        x, params, 1.0, config=object())
  elif case == "traced":
    out = jax.jit(lambda x: f(x, params, 1.0, config=Config(1)))(x)
  else:
    out = f(x, params, 1.0, config=Config(1))
  assert np.isfinite(np.asarray(out["y"])).all() and not list(tmp_path.glob("*.xla"))


def test_xla_cpu_flags():
  """YNNPACK fusions off for the measured jaxlib; a user's own choice, other versions and KADIFF_XLA_CPU=default
  leave XLA_FLAGS alone."""
  off = xla_cpu.YNN_FUSIONS_OFF
  assert xla_cpu.xla_flags("", "0.10.2") == off
  assert xla_cpu.xla_flags("--xla_force_host_platform_device_count=4", "0.10.2") == \
      f"--xla_force_host_platform_device_count=4 {off}"
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert xla_cpu.xla_flags(mine, "0.10.2") == mine
  assert xla_cpu.xla_flags("", "0.11.0") == "" and xla_cpu.xla_flags("", "0.10.2", "default") == ""


def test_executable_from_the_compilation_cache_is_kept_as_its_trace(tmp_path):
  """On CPU an executable read from XLA's compilation cache serialises incompletely (running it after loading
  fails with "Function ... not found"): such a one runs, and its trace (jax.export) is kept instead; the next
  process compiles that trace without tracing and keeps the executable in its place. In fresh processes: the
  compilation cache is process-wide."""
  script = textwrap.dedent(f"""
      import os, sys, pathlib
      import jax, jax.numpy as jnp, numpy as np
      from kadiff_jax import compile_cache, programs
      os.environ["KADIFF_COMPILE_CACHE"] = "{tmp_path / 'xla'}"
      os.environ["KADIFF_PROGRAM_CACHE"] = "{tmp_path / 'programs'}"
      compile_cache.enable()
      def f(x, idx):
        return jnp.take(x, idx, axis=0) * 2 + jnp.arange(idx.shape[0])[:, None]
      x, idx = np.arange(40.0, dtype=np.float32).reshape(10, 4), np.array([3, 1, 7], np.int32)
      out = np.asarray(programs.PersistentJit(f, ())(x, idx)).sum()
      kept = pathlib.Path("{tmp_path / 'programs'}")
      print(sys.argv[1], out, len(list(kept.glob("*.xla"))), len(list(kept.glob("*.jaxexport"))))
  """)
  run = lambda tag: subprocess.run([sys.executable, "-c", script, tag], capture_output=True, text=True,
                                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
  first = run("fresh")
  assert first.stdout.split() == ["fresh", "400.0", "1", "0"], first.stderr[-2000:]
  for path in (tmp_path / "programs").glob("*.xla"):
    path.unlink()  # the program cache lost, the compilation cache kept
  again = run("hit")
  assert again.stdout.split() == ["hit", "400.0", "0", "1"], again.stderr[-2000:]
  last = run("after")
  assert last.stdout.split() == ["after", "400.0", "1", "0"], last.stderr[-2000:]  # compiled from the trace: kept
  final = run("final")
  assert final.stdout.split() == ["final", "400.0", "1", "0"], final.stderr[-2000:]


@pytest.mark.skipif(not jax.lib.__version__.startswith(xla_cpu.MEASURED_JAXLIB), reason="flag measured on 0.10")
def test_kadiff_command_compiles_without_ynnpack_fusions():
  """`kadiff` sets the flag before JAX creates its backend: a convolution compiled afterwards in that process has no
  YNNPACK fusion (without the flag jaxlib 0.10 makes one), and neither has one in this test process (conftest)."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from kadiff_jax import cli
      try:
        cli.main(["--version"])
      except SystemExit:
        pass
      x, w = jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
      conv = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      print("ynn" if "ynn_fusion" in jax.jit(conv).lower(x).compile().as_text() else "xla")
  """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = lambda extra: subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                     env={**env, "JAX_PLATFORMS": "cpu", **extra}).stdout.split()[-1]
  assert run({}) == "xla"
  assert run({"KADIFF_XLA_CPU": "default"}) == "ynn"  # XLA's own default makes one: the check can fail
  x, w = jnp.ones((2, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
  conv = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert "ynn_fusion" not in jax.jit(conv).lower(x).compile().as_text()


def test_cpu_options_reach_the_cpu_compile(tmp_path, monkeypatch):
  """`cpu_options` go to XLA with the program's CPU compile: a valid one is kept as an executable; one XLA does not
  know makes that compile fail, so the call falls back to the plain jitted function (still right, nothing kept)."""
  monkeypatch.setenv("KADIFF_COMPILE_CACHE", "off")
  x = np.arange(6, dtype=np.float32)
  for options, kept in (({"xla_backend_optimization_level": 1}, True), ({"xla_no_such_option": 1}, False)):
    monkeypatch.setenv("KADIFF_PROGRAM_CACHE", str(tmp_path / str(kept)))  # no program kept by the other case
    prog = programs.PersistentJit(lambda a: jnp.sin(a) * 2.0, (), options)
    np.testing.assert_allclose(np.asarray(prog(x)), np.sin(x) * 2.0, rtol=1e-6)
    (program,) = prog._programs.values()
    assert (program is not False) == kept
    assert len(list((tmp_path / str(kept)).glob("*.xla"))) == int(kept)
