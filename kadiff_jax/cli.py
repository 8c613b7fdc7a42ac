"""The `kadiff` command. Each feature registers its own sub-commands (`add_parsers`); this file only
assembles them, joins a multi-process run, and turns errors into one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from kadiff_jax import cli_args, compile_cache
from kadiff_jax.cli_args import UsageError  # noqa: F401  (re-exported for callers of the old module)


def build_parser() -> argparse.ArgumentParser:
  from kadiff_jax.benchmarks import cli as benchmarks_cli
  from kadiff_jax.evaluation import cli as evaluation_cli
  from kadiff_jax.kadiff import cli as kadiff_cli
  from kadiff_jax.pipelines import cli as pipelines_cli
  from retrieval import cli as retrieval_cli
  p = argparse.ArgumentParser(prog="kadiff", description="KA-Diff in JAX: knowledge-augmented text-to-image.")
  p.add_argument("-v", "--verbose", action="store_true", help="log which weights path was taken, timings")
  sub = p.add_subparsers(dest="command", required=True)
  pipelines_cli.add_parsers(sub)
  kadiff_cli.add_parsers(sub)
  retrieval_cli.add_parser(sub)
  evaluation_cli.add_parsers(sub)
  benchmarks_cli.add_parsers(sub)
  return p


def _pixel_limit() -> None:
  """KADIFF_MAX_IMAGE_PIXELS: the largest image (in pixels) any command opens (PIL refuses twice its own limit)."""
  value = os.environ.get("KADIFF_MAX_IMAGE_PIXELS")
  if value:
    from PIL import Image
    if not value.isdigit() or int(value) < 2:
      raise UsageError(f"KADIFF_MAX_IMAGE_PIXELS={value!r}: expected a positive number of pixels")
    Image.MAX_IMAGE_PIXELS = int(value) // 2


def _one_line(e: BaseException) -> str:
  """The error as one line: expected errors say what they say; anything else is named by its type."""
  text = " ".join(str(e).split()) or type(e).__name__
  expected = (ValueError, OSError, LookupError, RuntimeError)
  return text if isinstance(e, expected) and not isinstance(e, (KeyError, IndexError)) else \
      f"{type(e).__name__}: {text} (run with -v for the traceback)"


def main(argv=None) -> int:
  parser = build_parser()
  verbose = "-v" in (argv if argv is not None else sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
  try:
    args = cli_args.parse(parser, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
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
