"""Options as the single source of truth: frozen dataclasses -> command-line flags, YAML configs, overrides.

Every option lives once, as a field of a frozen dataclass with its default and
a help text (`option(...)`). From those fields this module derives

- the command-line flags (`add_options`): `--inject-layers` for `inject_layers`,
  `--use-init-latents/--no-use-init-latents` for booleans; the flags hold no
  defaults of their own (unset means "the dataclass default");
- YAML configs (`--config FILE`, a flat mapping of option names) and
  `key=value` overrides on the command line, parsed as YAML scalars.

Precedence: dataclass default < config file < key=value < flag. Unknown keys
are an error naming the nearest valid key. `build(cls, args)` makes the
dataclass from whatever was set; `resolved_yaml` gives the options a run
resolved beside its outputs (`config.yaml`), so it can be repeated with `--config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml


class ConfigKeyError(ValueError):
  """A config key or override that no option or argument of the command has."""


def option(default: Any, help: str, *, parse: Callable[[str], Any] | None = None, choices: Sequence | None = None,
           flag: str | None = None):
  """A dataclass field with its help text; `parse` turns a flag or YAML string into the field's value."""
  return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "choices": choices,
                                                      "flag": flag})


def csv_tuple(value: str) -> tuple[str, ...]:
  """'a, b,c' -> ('a', 'b', 'c')."""
  return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _base_type(annotation) -> type:
  """The plain type behind `int | None`, `tuple[str, ...]`, ...: int, float, str, bool or tuple."""
  args = typing.get_args(annotation)
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    non_none = [a for a in args if a is not type(None)]
    return _base_type(non_none[0]) if len(non_none) == 1 else str
  origin = typing.get_origin(annotation)
  if origin is not None:
    return origin
  return annotation if isinstance(annotation, type) else str


def _fields(cls) -> list[tuple[dataclasses.Field, type]]:
  hints = typing.get_type_hints(cls)
  return [(f, _base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def coerce(cls, name: str, value: Any) -> Any:
  """A flag, YAML or override value as the type of `cls.name` (strings parsed, lists made tuples)."""
  if value is None:
    return None
  field, kind = next((f, k) for f, k in _fields(cls) if f.name == name)
  parse = field.metadata.get("parse")
  try:
    if parse is not None:  # the field's own reading of a string; other values (from YAML) are taken as typed
      if isinstance(value, str):
        return parse(value)
      return tuple(value) if kind is tuple and isinstance(value, list) else value
    if kind is tuple:
      return tuple(value) if isinstance(value, (list, tuple)) else parse(value) if parse else (value,)
    if kind is bool:
      if isinstance(value, str):
        low = value.lower()
        if low not in ("true", "false", "yes", "no", "1", "0"):
          raise ValueError(f"expected true or false, got {value!r}")
        return low in ("true", "yes", "1")
      return bool(value)
    if kind in (int, float) and not isinstance(value, bool):
      out = kind(value)
      if kind is int and isinstance(value, float) and out != value:
        raise ValueError(f"expected an integer, got {value!r}")
      return out
    if kind is str:
      return str(value)
    return value
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name}={value!r}: {e}") from None


def add_options(parser: argparse.ArgumentParser, *classes, group: str | None = None,
                exclude: Sequence[str] = ()) -> None:
  """Adds a flag per field of `classes` (a field shared by several classes gets one flag)."""
  target = parser.add_argument_group(group) if group else parser
  seen = {a.dest for a in parser._actions}
  for cls in classes:
    for f, kind in _fields(cls):
      if f.name in seen or f.name in exclude:
        continue
      seen.add(f.name)
      flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
      default = f.default if f.default is not dataclasses.MISSING else None
      shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
      choices = f.metadata.get("choices")  # checked by the dataclass, so a bad value gets its one-line error
      help_text = (f.metadata.get("help", "") + (f"; one of {', '.join(map(str, choices))}" if choices else "")
                   + ("" if default is None else f" (default: {shown})"))
      if kind is bool:
        target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
      else:
        convert = (lambda cls_, name: lambda v: coerce(cls_, name, v))(cls, f.name)
        convert.__name__ = kind.__name__ if kind is not tuple else "list"
        target.add_argument(flag, dest=f.name, type=convert, default=None, help=help_text, metavar=f.name.upper())


def build(cls, args: argparse.Namespace | dict, **fixed):
  """`cls` from the values set in `args` (None: unset, so the dataclass default holds), plus `fixed`."""
  values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
  kw = {f.name: coerce(cls, f.name, values[f.name]) for f, _ in _fields(cls)
        if values.get(f.name) is not None}
  kw.update(fixed)
  return cls(**kw)


def asdict(obj) -> dict[str, Any]:
  """A dataclass as plain YAML-able values (tuples as lists)."""
  out = {}
  for f in dataclasses.fields(obj):
    v = getattr(obj, f.name)
    out[f.name] = list(v) if isinstance(v, tuple) else str(v) if isinstance(v, os.PathLike) else v
  return out


# --- config files and key=value overrides -------------------------------------------------------

_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)=(.*)$", re.S)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
  """A flat YAML mapping of option names to values."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  try:
    data = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise ValueError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
  if data is None:
    return {}
  if not isinstance(data, dict) or any(isinstance(v, dict) for v in data.values()):
    raise ValueError(f"config file {path}: expected a flat mapping of option names to values "
                     "(e.g. 'steps: 50'), not nested sections")
  return {str(k).replace("-", "_"): v for k, v in data.items()}


def split_overrides(argv: Sequence[str], value_options: set[str]) -> tuple[list[str], dict[str, Any], str | None]:
  """(argv without overrides, {key: value} from `key=value` tokens, the --config path if given).

  A token is an override when it looks like `name=value` and is not the value
  of a preceding option that takes one (`value_options`).
  """
  rest, overrides, config = [], {}, None
  expect_value = False
  for tok in argv:
    if expect_value:
      expect_value = False
      rest.append(tok)
      continue
    m = _OVERRIDE.match(tok)
    if m and not tok.startswith("-"):
      key = m.group(1).replace("-", "_")
      try:
        overrides[key] = yaml.safe_load(m.group(2)) if m.group(2).strip() else ""
      except yaml.YAMLError:
        overrides[key] = m.group(2)
      continue
    if tok.startswith("--config="):
      config = tok.split("=", 1)[1]
    rest.append(tok)
    if tok in value_options:
      expect_value = True
  if "--config" in rest:
    i = rest.index("--config")
    config = rest[i + 1] if i + 1 < len(rest) else None
  return rest, overrides, config


def check_keys(values: dict[str, Any], valid: Sequence[str], where: str) -> None:
  for key in values:
    if key not in valid:
      near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
      hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"
      raise ConfigKeyError(f"unknown {where} key {key!r}{hint}")


def resolved_yaml(sections: dict[str, Any]) -> str:
  """The resolved configuration as YAML: one flat mapping of every section's values, loadable with --config."""
  flat: dict[str, Any] = {}
  for value in sections.values():
    flat.update(asdict(value) if dataclasses.is_dataclass(value) else value)
  return yaml.safe_dump(flat, sort_keys=True)
