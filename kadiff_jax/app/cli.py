"""`kadiff app`: load the models once, then serve the page on 127.0.0.1 (public only when asked)."""

from __future__ import annotations

import logging

from kadiff_jax import config
from kadiff_jax.cli_args import UsageError
from kadiff_jax.weights.options import ModelOptions

log = logging.getLogger("kadiff_jax")


def serve(args, *, block: bool = True):
  """Loads the models (once), builds the page and launches it; returns (page, service, url)."""
  from pathlib import Path
  try:
    from kadiff_jax.app import service as service_lib, ui
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] in ("gradio", "gradio_client"):
      raise UsageError("kadiff app needs Gradio: pip install 'kadiff-jax[app]'") from None
    raise
  if args.share and args.host == "127.0.0.1":
    log.warning("--share: the page gets a public gradio.live link; anyone with it can run jobs here")
  from kadiff_jax.weights.load import default_cache_dir
  out_root = Path(args.out) if args.out else default_cache_dir() / "app"
  service = service_lib.AppService.load(config.build(ModelOptions, args), out_root, index=args.index,
                                        rerank=args.rerank, embedder=args.embedder, scoring=args.scoring,
                                        min_score=args.min_score, database=args.database,
                                        hspace_adapter=args.hspace_adapter)
  page = ui.build(service)
  _, url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share or None,
                                  allowed_paths=[str(out_root)], prevent_thread_lock=True, quiet=True,
                                  show_error=True, footer_links=["api"], css=ui.CSS)
  print(f"kadiff app: {url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
  if block:
    try:
      page.block_thread()
    finally:
      page.close()
  return page, service, url


def _app(args) -> None:
  if not 1 <= args.port <= 65535:
    raise UsageError(f"--port {args.port}: expected 1 to 65535")
  serve(args)


def add_parsers(sub) -> None:
  from kadiff_jax.kadiff.run import MIN_SCORE
  p = sub.add_parser("app", help="a local web page over KA-Diff, knowledge-augmented generation, attention "
                     "interpolation and RAG-Turbo (Gradio)")
  config.add_options(p, ModelOptions, group="model")
  p.add_argument("--index", default=None, help="retrieval index (kadiff retrieve build): adds the "
                 "knowledge-augmented generation tab")
  p.add_argument("--rerank", default=None, help="MLLM id or folder to re-rank the candidates")
  p.add_argument("--scoring", choices=["logprob", "generate"], default="logprob")
  p.add_argument("--embedder", default=None, help="query embedder (default: the index's)")
  p.add_argument("--min-score", type=float, default=MIN_SCORE, help="best dense score below this is no match")
  p.add_argument("--database", default=None, help="H-space database (kadiff hspace build) of this model: adds the "
                 "RAG-Turbo tab")
  p.add_argument("--hspace-adapter", default=None, help="a trained H-space adapter (kadiff train hspace-adapter) "
                 "offered beside slerp in the RAG-Turbo tab")
  p.add_argument("--out", default=None, help="where each session's outputs go (default: $KADIFF_CACHE/app)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 makes the page reachable from "
                 "other machines")
  p.add_argument("--port", type=int, default=7860, help="port (taken: Gradio tries the next ones)")
  p.add_argument("--share", action="store_true", help="also a public gradio.live link (off unless asked)")
  from kadiff_jax import cli_args
  cli_args.leaf(p, ("app",), _app)
