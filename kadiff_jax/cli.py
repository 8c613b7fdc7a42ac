"""The `kadiff` command. Each feature registers its own sub-commands (`add_parsers`); this file only
assembles them, joins a multi-process run, and turns errors into one line."""

from __future__ import annotations

import argparse
import logging
import sys

from kadiff_jax import cli_args
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


def main(argv=None) -> int:
  from kadiff_jax.config import ConfigKeyError
  from kadiff_jax.models.config_util import ConfigError
  from kadiff_jax.weights.convert import WeightsError
  from kadiff_jax.weights.files import CheckpointNotFound
  parser = build_parser()
  try:
    args = cli_args.parse(parser, argv)
  except (UsageError, ConfigKeyError, FileNotFoundError, ValueError) as e:
    print(f"kadiff: error: {e}", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
  try:
    if getattr(args, "coordinator", None) or getattr(args, "num_processes", None):
      from kadiff_jax import sharding
      sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    args.func(args)
  except (UsageError, ConfigError, WeightsError, CheckpointNotFound, FileNotFoundError, ValueError) as e:
    print(f"kadiff: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
