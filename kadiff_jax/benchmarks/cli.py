"""`kadiff benchmark unet|correspondence|pipeline|index|interpolation|rag-turbo`: timings against the reference, JSON
on the last line."""

from __future__ import annotations

import importlib
from pathlib import Path

from kadiff_jax import cli_args


def _benchmark(args) -> None:
  importlib.import_module(f"kadiff_jax.benchmarks.{args.what.replace('-', '_')}").main(args)


def add_parsers(sub) -> None:
  b = sub.add_parser("benchmark", help="timings vs the PyTorch reference; JSON on the last line")
  bsub = b.add_subparsers(dest="what", required=True)
  bu = bsub.add_parser("unet", help="one UNet step, ours vs diffusers")
  bu.add_argument("--config", default="tiny", choices=["tiny", "mid", "sdxl"])
  bu.add_argument("--batch", type=int, default=2)
  bu.add_argument("--iters", type=int, default=5)
  bu.add_argument("--size", type=int, default=None, help="latent size (default: the config's sample_size)")
  bu.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
  bu.add_argument("--torch-dtype", default=None, choices=["fp32", "bf16", "fp16"])
  bc = bsub.add_parser("correspondence", help="spec 6.3 correspondence, ours vs the reference's per-source loop")
  bc.add_argument("--iters", type=int, default=5)
  bp = bsub.add_parser("pipeline", help="KA-Diff per-phase timings, diffusers' IP-Adapter pass as reference; with "
                       "--config, the row layouts' FLOPs, memory and images/s on random weights")
  bp.add_argument("--model", default="tiny")
  bp.add_argument("--config", default=None, choices=["tiny", "mid", "sdxl"],
                  help="account the injection pass (grouped vs the release's 4 rows per job) and the inversion on "
                  "this UNet config with random weights, instead of timing a model folder's phases")
  bp.add_argument("--group-sizes", default="1,4,8", help="with --config: jobs per reference to compare")
  bp.add_argument("--size", type=int, default=None, help="with --config: image side (default: the config's)")
  bp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="with --config")
  bp.add_argument("--abstract", action="store_true", help="with --config: compile from shapes only (no weights, no "
                  "run): FLOPs and memory of full SDXL on any machine")
  bp.add_argument("--steps", type=int, default=10)
  bp.add_argument("--inject-layers", default=None, help="default: the model's (44-70 for SDXL, up_blocks.* otherwise)")
  bp.add_argument("--ip-adapter", default=None, type=Path)
  bp.add_argument("--image-encoder", default=None, type=Path)
  bp.add_argument("--no-torch", action="store_true", help="skip the diffusers reference")
  bi = bsub.add_parser("index", help="ScaNN vs exact search on random unit vectors: build, QPS, recall@10")
  bi.add_argument("--sizes", default="1e5,1e6", help="comma-separated corpus sizes")
  bi.add_argument("--dim", type=int, default=384)
  bi.add_argument("--queries", type=int, default=1000)
  bi.add_argument("--data", choices=["uniform", "clustered"], default="uniform",
                  help="random unit vectors (no structure: hardest for ANN) or clustered ones")
  bn = bsub.add_parser("interpolation", help="one attention interpolation pass on random weights: batched frames vs "
                       "the release's one call per middle frame")
  bn.add_argument("--config", default="tiny", choices=["tiny", "mid", "sdxl"])
  bn.add_argument("--frames", type=int, default=5, help="frames, endpoints included")
  bn.add_argument("--steps", type=int, default=10)
  bn.add_argument("--size", type=int, default=None, help="image side (default: the config's)")
  bn.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
  br = bsub.add_parser("rag-turbo", help="one-step latency per image by phase (retrieval, encoder, adapter, decoder, "
                       "VAE decode) with and without retrieval, on an SD-Turbo-shaped config with random weights")
  br.add_argument("--config", default="tiny", choices=["tiny", "mid", "sd21"])
  br.add_argument("--batch", type=int, default=1)
  br.add_argument("-k", type=int, default=1, help="retrieved neighbours")
  br.add_argument("--db-size", type=int, default=10_000, help="entries in the random exact index")
  br.add_argument("--hspace", choices=["adapter", "slerp"], default="adapter")
  br.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
  br.add_argument("--iters", type=int, default=10)
  for name, p in bsub.choices.items():
    cli_args.leaf(p, ("benchmark", name), _benchmark)
