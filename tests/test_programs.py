"""The program cache (`kadiff_jax.programs`): traced once, read back by a later process without tracing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kadiff_jax import programs

TRACES = []


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


def test_program_is_exported_once_and_read_back_without_tracing(tmp_path, monkeypatch):
  monkeypatch.setenv("KADIFF_PROGRAM_CACHE", str(tmp_path))
  x, params = np.ones((3, 4), np.float32), {"w": jnp.eye(4) * 0.5}
  TRACES.clear()
  first = _fresh()(x, params, 2.0, config=Config(2))
  assert len(TRACES) == 1 and len(list(tmp_path.glob("*.jaxexport"))) == 1
  again = _fresh()(x, params, 3.0, config=Config(2))  # another "process", another scale: no tracing at all
  assert len(TRACES) == 1
  want = x
  for _ in range(2):
    want = np.tanh(want @ np.asarray(params["w"])) * 3.0
  np.testing.assert_allclose(np.asarray(again["y"]), want, rtol=1e-6)
  assert float(first["mean"]) != float(again["mean"])
  _fresh()(x, params, 2.0, config=Config(3))  # another static argument: another program
  _fresh()(np.ones((5, 4), np.float32), params, 2.0, config=Config(2))  # another shape: another program
  assert len(TRACES) == 3 and len(list(tmp_path.glob("*.jaxexport"))) == 3


def test_damaged_program_is_exported_again(tmp_path, monkeypatch):
  monkeypatch.setenv("KADIFF_PROGRAM_CACHE", str(tmp_path))
  x, params = np.ones((3, 4), np.float32), {"w": jnp.eye(4)}
  _fresh()(x, params, 1.0, config=Config(1))
  (path,) = tmp_path.glob("*.jaxexport")
  path.write_bytes(b"not a program")
  TRACES.clear()
  out = _fresh()(x, params, 1.0, config=Config(1))
  assert len(TRACES) == 1 and path.read_bytes() != b"not a program"
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
  assert np.isfinite(np.asarray(out["y"])).all() and not list(tmp_path.glob("*.jaxexport"))
