"""KA-Diff's bill in UNet rows: the grouped layout vs the release's 4 rows per job, from XLA's own accounting.

For a UNet config (tiny, mid, sdxl) with random weights, this compiles the
injection pass (`generate.kadiff_denoise`) for k jobs on one reference in
both layouts, and the inversion's denoising loop (CFG, 2 rows), and reads
`cost_analysis()` (FLOPs, bytes) and `memory_analysis()` (peak bytes) of the
compiled programs. XLA counts a scan's body once, so a program's FLOPs are
one step's; per image they are multiplied by the steps and divided by k.
With `abstract` nothing is allocated: every input is a `jax.ShapeDtypeStruct`,
so full SDXL at 1024 px is accounted on any machine. Otherwise each program
is also run and timed (images/s). The release spends 400 row-evaluations per
image at 50 steps (inversion 100, a first pass 100, the KA-Diff pass 200).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from kadiff_jax import sharding
from kadiff_jax.kadiff import generate as G
from kadiff_jax.kadiff.options import kadiff_scheduler
from kadiff_jax.models import ip_adapter, unet
from kadiff_jax.models.attention import HookInputs
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.sampling import CFG, KADIFF, KADIFF_GROUPED, RowLayout

IP_TOKENS = 16  # IP-Adapter Plus
TEXT_TOKENS = 77
VAE_FACTOR = 8


def _array(shape, dtype, rng, abstract):
  if abstract:
    return jax.ShapeDtypeStruct(shape, dtype)
  if dtype == jnp.bool_:
    return jnp.asarray(rng.random(shape) < 0.5)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.zeros(shape, dtype)
  return jnp.asarray(rng.standard_normal(shape), dtype)


def model_inputs(cfg: unet.UNetConfig, dtype, abstract: bool, seed: int = 0):
  """(UNet params, IP-Adapter per-layer K/V params): random, or shapes only."""
  from kadiff_jax.tiny_model import random_params
  shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), unet.init_shapes(cfg))
  params = shapes if abstract else jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype),
                                                          random_params(shapes, seed))
  rng = np.random.default_rng(seed + 1)
  ctx = cfg.cross_attention_dim[0]
  kernel = lambda c: (jax.ShapeDtypeStruct((ctx, c), dtype) if abstract
                      else jnp.asarray(rng.standard_normal((ctx, c)) / np.sqrt(ctx), dtype))
  layers = {path: {"to_k_ip": kernel(site.channels), "to_v_ip": kernel(site.channels)}
            for path, site in unet.attention_sites(cfg).items() if site.kind == "cross"}
  return params, layers


def _cond(cfg, rows, rng, abstract):
  pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
  return unet.UNetCond(_array((rows, TEXT_TOKENS, cfg.cross_attention_dim[0]), jnp.float32, rng, abstract),
                       _array((rows, pooled), jnp.float32, rng, abstract),
                       _array((rows, 6), jnp.float32, rng, abstract))


def _hook_inputs(cfg, layers, rows, rng, abstract):
  tokens = _array((rows, IP_TOKENS, cfg.cross_attention_dim[0]), jnp.float32, rng, abstract)
  scale = _array((rows,), jnp.float32, rng, abstract)
  return {"ip_adapter": HookInputs(layers, ip_adapter.IPAdapterRows(tokens, scale))}


def injection_program(cfg, params, layout: RowLayout, groups: int, latent: int, steps: int, dtype, abstract: bool,
                      seed: int = 0):
  """(lowered program, args) of the KA-Diff injection pass for `groups` groups of `layout.group` jobs: shapes only,
  or random inputs with the release's threshold (0.7) and injection from step 1."""
  shapes, static = G.abstract_inputs(cfg, layout, groups, latent, steps, IP_TOKENS, dtype)
  if not abstract:
    rng = np.random.default_rng(seed)
    shapes = jax.tree_util.tree_map(lambda a: _array(a.shape, a.dtype, rng, False), shapes)
    b = shapes[0].shape[0]
    shapes = shapes[:5] + (jnp.float32(5.0), shapes[6], jnp.full((b,), 0.7, jnp.float32),
                           jnp.tile(jnp.int32([1, steps - 1]), (b, 1)))
  return G.kadiff_denoise.lower(params, *shapes, **static), (params,) + tuple(shapes)


def inversion_program(cfg, params, layers, latent: int, steps: int, dtype, abstract: bool, seed: int = 0):
  """The inversion's denoising loop for one reference: CFG's 2 rows with IP-Adapter tokens (VAE encode apart)."""
  rng = np.random.default_rng(seed)
  sched = kadiff_scheduler()
  args = (params, _array((1, latent, latent, cfg.in_channels), jnp.float32, rng, abstract),
          _cond(cfg, CFG.rows, rng, abstract), sched.set_timesteps(steps), jnp.float32(7.5),
          _hook_inputs(cfg, layers, CFG.rows, rng, abstract))
  static = dict(unet_config=cfg, scheduler=sched, layout=CFG, dtype=dtype,
                hooks=(ip_adapter.IPAdapterAttention(upcast=cfg.upcast_attention),))
  return t2i.denoise.lower(*args, **static), args, static


def accounting(compiled) -> dict:
  """FLOPs and bytes accessed of one loop step (XLA counts a loop body once) and peak memory in bytes."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
          "peak": G.peak_bytes(compiled)}


def _median_s(fn, n: int) -> float:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return sorted(times)[n // 2]


def run(config: str = "mid", group_sizes=(1, 4, 8), steps: int = 10, size: int | None = None, dtype: str = "fp32",
        abstract: bool = False, iters: int = 3) -> dict:
  from kadiff_jax.benchmarks.unet import CONFIGS
  cfg = CONFIGS[config]()
  jdt = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}[dtype]
  latent = (size // VAE_FACTOR) if size else cfg.sample_size
  params, layers = model_inputs(cfg, jdt, abstract)
  out = {"config": config, "size": latent * VAE_FACTOR, "steps": steps, "dtype": dtype, "abstract": abstract,
         "backend": jax.default_backend(), "note": "flops per image = program flops (one step) x steps / k"}

  lowered, args, _ = inversion_program(cfg, params, layers, latent, steps, jdt, abstract)
  inv = accounting(lowered.compile())
  row_flops = inv["flops"] / CFG.rows  # one UNet row-evaluation (with IP-Adapter tokens)
  out["row_evaluation_gflop"] = _g(row_flops)
  out["inversion"] = {"gflop_per_reference": _g(inv["flops"] * steps), "peak_gib": _gib(inv["peak"])}
  out["release_gflop_per_image"] = _g(8 * steps * row_flops)  # 400 row-evaluations at 50 steps
  out["layouts"] = {}
  for k in group_sizes:
    entry = {}
    for name, layout, groups in (("per_job", KADIFF, k), ("grouped", KADIFF_GROUPED.grouped(k), 1)):
      lowered, args = injection_program(cfg, params, layout, groups, latent, steps, jdt, abstract)
      compiled = lowered.compile()
      acc = accounting(compiled)
      e = {"rows_per_step": groups * layout.rows, "gflop_per_image": _g(acc["flops"] * steps / k),
           "row_evaluations_per_image": round(acc["flops"] * steps / k / row_flops, 1),
           "gb_accessed_per_image": round(acc["bytes"] * steps / k / 1e9, 3), "peak_gib": _gib(acc["peak"])}
      if not abstract:
        compiled(*args)  # warm
        e["images_per_s"] = round(k / _median_s(lambda: compiled(*args), iters), 4)
      entry[name] = e
    entry["flops_ratio"] = round(entry["per_job"]["gflop_per_image"] / entry["grouped"]["gflop_per_image"], 3)
    entry["row_ratio"] = round(entry["per_job"]["rows_per_step"] / entry["grouped"]["rows_per_step"], 3)
    if not abstract:
      entry["speedup"] = round(entry["grouped"]["images_per_s"] / entry["per_job"]["images_per_s"], 3)
    out["layouts"][f"k{k}"] = entry
  out["memory"] = _batch_memory(cfg, params, max(group_sizes), latent, steps, jdt)
  return out


def _g(flops: float) -> float:
  """GFLOP to 4 significant digits."""
  return float(f"{flops / 1e9:.4g}")


def _gib(b):
  return None if b is None else round(b / 2 ** 30, 3)


def _batch_memory(cfg, params, k, latent, steps, dtype) -> dict:
  """How many groups of k one device of this machine holds (`generate.groups_per_device`, what the job runner's
  automatic batch size uses on accelerators)."""
  limit = sharding.device_memory()
  out = {"k": k, "device_gib": _gib(limit)}
  if limit:
    out["groups_per_device"] = G.groups_per_device(params, cfg, KADIFF_GROUPED.grouped(k), latent, steps, IP_TOKENS,
                                                   limit)
  return out
