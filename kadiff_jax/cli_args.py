"""What every `kadiff` sub-command shares: config files and overrides, required arguments, common inputs.

`parse(parser, argv)` runs the precedence of `kadiff_jax.config` over argparse:
a leaf command's `--config FILE` and `key=value` tokens become its defaults
(checked against its arguments, unknown keys named with the nearest valid one),
then the flags given on the command line win. Arguments marked required are
checked after that, so a config file may supply them too.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import numpy as np

from kadiff_jax import config


class UsageError(ValueError):
  """Bad command-line input."""


def add_config_arg(p: argparse.ArgumentParser) -> None:
  p._kadiff_config_file = True
  p.add_argument("--config", default=None, help="YAML file of option values (flat: 'steps: 50'); key=value "
                 "arguments override it and flags override both")


def required(p: argparse.ArgumentParser, *dests: str) -> None:
  """Marks arguments required after config files are applied (argparse's own check runs before)."""
  p._kadiff_required = tuple(getattr(p, "_kadiff_required", ())) + dests


def _leaves(parser: argparse.ArgumentParser, path=()):
  """(command path, parser) of every leaf command."""
  subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  if not subs:
    yield path, parser
    return
  for name, p in subs[0].choices.items():
    yield from _leaves(p, path + (name,))


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
  out = set()
  for _, leaf in _leaves(parser):
    for a in leaf._actions:
      if a.option_strings and a.nargs != 0:
        out.update(a.option_strings)
  for a in parser._actions:
    if a.option_strings and a.nargs != 0:
      out.update(a.option_strings)
  return out


def _command_dests(leaf: argparse.ArgumentParser) -> list[str]:
  return [a.dest for a in leaf._actions if a.dest not in ("help", "config") and a.dest != argparse.SUPPRESS]


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses `argv` with config files and key=value overrides applied (see the module docstring)."""
  import sys
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides, config_path = config.split_overrides(argv, _value_options(parser))
  for _, leaf in _leaves(parser):
    for a in leaf._actions:  # required arguments are checked after the config is applied
      if a.required and a.option_strings:
        a.required = False
        leaf._kadiff_required = tuple(getattr(leaf, "_kadiff_required", ())) + (a.dest,)
  first = parser.parse_args(rest)
  leaf = getattr(first, "_leaf", None)
  if leaf is None:
    return first
  values: dict[str, Any] = {}
  where = " ".join(getattr(first, "_command", ()))
  valid = _command_dests(leaf)
  takes_config = getattr(leaf, "_kadiff_config_file", False)
  if config_path and takes_config:
    values.update(config.load_file(config_path))
    config.check_keys(values, valid, f"config ({config_path}) for 'kadiff {where}'")
  if overrides and not takes_config:
    raise UsageError(f"'kadiff {where}' takes no key=value overrides (got {', '.join(overrides)})")
  config.check_keys(overrides, valid, f"override for 'kadiff {where}'")
  values.update(overrides)
  if values:
    leaf.set_defaults(**values)
    args = parser.parse_args(rest)
  else:
    args = first
  missing = [d for d in getattr(leaf, "_kadiff_required", ()) if getattr(args, d, None) in (None, "")]
  if missing:
    flags = {a.dest: a.option_strings[-1] for a in leaf._actions if a.option_strings}
    raise UsageError(f"'kadiff {where}' needs " + ", ".join(f"{flags.get(d, d)} (or config key {d!r})"
                                                            for d in missing))
  return args


def leaf(p: argparse.ArgumentParser, command: tuple[str, ...], func) -> None:
  """Registers `p` as a leaf command that runs `func(args)`."""
  p.set_defaults(func=func, _leaf=p, _command=command)


def check_image(path: str | None) -> None:
  """Fails on an unreadable image (other than the 'auto' mask) before any model loads."""
  from kadiff_jax import image_io
  from kadiff_jax.kadiff.jobs import AUTO_MASK
  if path and path != AUTO_MASK:
    image_io.load_rgb(path)


def read_init_latents(path: str | None, n: int) -> np.ndarray | None:
  """diffusers-layout latents [n, C, H/8, W/8] from .npy as NHWC, or None."""
  if not path:
    return None
  init = np.load(path)
  if init.ndim != 4 or init.shape[0] != n:
    raise UsageError(f"--init-latents {path}: shape {init.shape}, expected "
                     f"[num_images={n}, C, H/8, W/8] (NCHW, float32)")
  return init.astype(np.float32).transpose(0, 2, 3, 1)


def write_config(out_dir: str | os.PathLike, args: argparse.Namespace, **sections):
  """Writes `out_dir`/config.yaml: the resolved options plus this command's other arguments (loadable
  again with --config by the same command)."""
  import dataclasses
  from kadiff_jax import sharding
  resolved = {f.name for s in sections.values() for f in dataclasses.fields(s)}
  plain = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
           if k in _command_dests(args._leaf) and k not in resolved
           and isinstance(v, (str, int, float, bool, type(None), list, tuple))}
  from kadiff_jax.outputs import OutputDir
  out = OutputDir(out_dir)
  if sharding.is_writer():
    out.write_text("config.yaml", config.resolved_yaml({"args": plain, **sections}))
  return out
