"""Times `kadiff app` from click to images: starts the page in this process, drives it through gradio_client,
prints each request's seconds and how many times the models were loaded.

  python scripts/app_timing.py --model tiny --index db_index      # db_index: kadiff retrieve build ... --index

Needs the `app` extra. Use a fresh $KADIFF_CACHE to include the first compilations.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="tiny")
  p.add_argument("--index", required=True)
  p.add_argument("--steps", type=int, default=50)
  args = p.parse_args()
  from gradio_client import Client
  from kadiff_jax.app import cli as app_cli
  from kadiff_jax.cli import build_parser
  from kadiff_jax.weights.options import ModelOptions
  loads = []
  load = ModelOptions.load
  ModelOptions.load = lambda self: loads.append(1) or load(self)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  t = time.perf_counter()
  page, _, url = app_cli.serve(build_parser().parse_args(
      ["app", "--model", args.model, "--index", args.index, "--out", tempfile.mkdtemp(), "--port", str(port)]),
      block=False)
  print(f"start (models, index, page): {time.perf_counter() - t:.1f}s")
  c = Client(url, verbose=False)
  n = args.steps
  requests = [
      ("retrieve", ("a chow chow in the snow", "", 5), "/retrieve"),
      (f"KA-Diff, {n} steps, auto mask, baseline", (None, "a chow chow in the snow", "auto", None, None, 0, n),
       "/generate_retrieved"),
      ("the same reference, another prompt and seed", (None, "a chow chow on the beach", "auto", None, None, 1, n),
       "/generate_retrieved"),
      ("retrieve another", ("a rubber duck on a lake", "", 5), "/retrieve"),
      ("KA-Diff, a new reference", (None, "a rubber duck on a lake", "auto", None, None, 0, n), "/generate_retrieved"),
      (f"interpolation, 5 frames, {n} steps", ("a photo of a cat", "a photo of a dog", "", 5, 0, n, "fused_outer",
                                              "text", None, None), "/interpolate"),
      ("interpolation, another seed", ("a photo of a cat", "a photo of a dog", "", 5, 1, n, "fused_outer", "text",
                                       None, None), "/interpolate")]
  try:
    for name, inputs, endpoint in requests:
      t = time.perf_counter()
      c.predict(*inputs, api_name=endpoint)
      print(f"{name}: {time.perf_counter() - t:.1f}s")
  finally:
    page.close()
  print(f"models loaded {len(loads)} time(s)")


if __name__ == "__main__":
  main()
