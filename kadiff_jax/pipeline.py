"""The Python API: a KA-Diff pipeline object, as a diffusers or maxdiffusion user expects one.

    from kadiff_jax import KADiffPipeline
    pipe = KADiffPipeline.from_pretrained("tiny")        # or an SDXL folder / Hub id + ip_adapter, image_encoder
    out = pipe("a dog in the snow", reference="dog.jpg", ref_prompt="a dog", mask="auto", seed=0, steps=10)
    out.images[0].save("dog_snow.png")                    # PIL images; out.records: what was done, per image
    ref = pipe.invert("dog.jpg", "a dog", steps=10)       # prepared once, reused by later calls
    more = pipe(["a dog on the beach", "a dog in space"], reference=ref, seed=1, steps=10)

A call is the same job the CLI runs: `kadiff generate --mode kadiff` with the
same prompt, reference, ref_prompt, mask, seed and options gives the same
pixels. Options are `KADiffOptions` fields, given as keywords or as an
`options=` object.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

from kadiff_jax.job import Job, check_seed
from kadiff_jax.kadiff.options import DEFAULT_PROMPT, KADiffOptions
from kadiff_jax.kadiff.reference import PreparedReference
from kadiff_jax.weights.options import ModelOptions


class KADiffOutput(NamedTuple):
  images: list[Image.Image]  # one per prompt x num_images, in order
  latents: np.ndarray        # [N, h, w, C] final latents
  records: list[dict]        # per image: job, mask source, resolved options, model


@dataclasses.dataclass
class KADiffPipeline:
  """Loaded SDXL models and IP-Adapter; call it to generate, `invert` to prepare a reference once."""

  models: Any
  adapter: Any
  model_options: ModelOptions = ModelOptions()
  mesh: Any = None

  @classmethod
  def from_pretrained(cls, model: str = "tiny", *, ip_adapter: str | None = None, image_encoder: str | None = None,
                      dtype: str = "fp32", variant: str | None = None, cache_dir: str | None = None,
                      mesh=None) -> "KADiffPipeline":
    """An SDXL folder in diffusers layout, a Hub id, or "tiny" (the built-in random model with its own
    adapter), with an IP-Adapter file and its CLIP image encoder folder; dtype fp32, bf16 or fp16."""
    opts = ModelOptions(model=model, variant=variant, dtype=dtype, ip_adapter=ip_adapter,
                        image_encoder=image_encoder, cache_dir=cache_dir)
    models = opts.load()
    return cls(models, opts.load_adapter(models, required=True), opts, mesh)

  def options(self, options: KADiffOptions | None = None, **overrides) -> KADiffOptions:
    """`options` (default: the release's) with keyword overrides, resolved for this model."""
    return dataclasses.replace(options or KADiffOptions(), **overrides).for_model(self.models)

  def _cache_dir(self, cache_dir):
    from kadiff_jax.weights.load import default_cache_dir
    return cache_dir if cache_dir is not None else (self.model_options.cache_path or default_cache_dir()) / "references"

  def invert(self, reference, ref_prompt: str, options: KADiffOptions | None = None, *, auto_mask: bool = False,
             cache_dir: str | os.PathLike | None = None, **overrides) -> PreparedReference:
    """A reference (path or PIL image) prepared once: pixels, IP-Adapter tokens, ref_prompt embeddings and its
    DDIM inversion (from the reference cache when it holds one). Pass it as `reference=` to later calls."""
    from kadiff_jax.kadiff import reference as R
    return R.prepare_reference(self.models, self.adapter, reference, ref_prompt, self.options(options, **overrides),
                               auto_mask=auto_mask, cache_dir=self._cache_dir(cache_dir), mesh=self.mesh)

  def __call__(self, prompt: str | Sequence[str] = DEFAULT_PROMPT, reference=None, *, ref_prompt: str = "",
               mask=None, seed: int = 0, num_images: int = 1, options: KADiffOptions | None = None,
               cache_dir: str | os.PathLike | None = None, **overrides) -> KADiffOutput:
    """Generates num_images per prompt from `reference` (a path, PIL image, or `invert`'s result); `mask` is the
    reference's concept (a path, PIL image or bool array; "auto" from its cross-attention; None: everywhere)."""
    from kadiff_jax.kadiff import generate as G
    from kadiff_jax.kadiff import jobs as kjobs
    if reference is None:
      raise ValueError("KA-Diff needs reference=: an image path, a PIL image, or pipe.invert(...)'s result")
    opts = self.options(options, **overrides)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    check_seed(seed)
    auto = isinstance(mask, str) and mask == kjobs.AUTO_MASK
    if isinstance(reference, PreparedReference):
      if auto and reference.cross_attention is None:
        raise ValueError("mask='auto' needs a reference inverted with auto_mask=True")
      prepared, ref_prompt = reference, reference.ref_prompt
    else:
      prepared = self.invert(reference, ref_prompt, opts, auto_mask=auto, cache_dir=cache_dir)
    path_mask = mask if isinstance(mask, (str, os.PathLike)) else None
    jobs = [Job.numbered(p, seed, i + n * num_images, reference=prepared.path, ref_prompt=ref_prompt,
                         mask=str(path_mask) if path_mask is not None else None)
            for n, p in enumerate(prompts) for i in range(num_images)]
    items, masks = [], []
    for job in jobs:
      if mask is not None and path_mask is None:  # a PIL image or an array (bool, or uint8 with white = concept)
        from kadiff_jax.kadiff.reference import load_mask
        image = mask if isinstance(mask, Image.Image) else Image.fromarray(
            np.asarray(mask, np.uint8) * (255 if np.asarray(mask).dtype == bool else 1))
        m, info = load_mask(image, opts.size, opts.mask_padding), {"source": "user", "path": "<in memory>"}
      else:
        m, info = kjobs.job_mask(job, prepared, self.models.tokenizer, opts)
      items.append(G.GenerationItem(job, prepared, m, kjobs.job_noise(job, self.models, opts)))
      masks.append(info)
    out = G.run_jobs(self.models, self.adapter, items, opts, mesh=self.mesh)
    resolved = dataclasses.asdict(opts)
    records = [{"prompt": j.prompt, "seed": j.seed, "index": j.index, "reference": prepared.path,
                "ref_prompt": ref_prompt, "mask": info, "mode": opts.mode, "options": resolved,
                "model": str(self.models.source), "ip_adapter": self.adapter.source}
               for j, info in zip(jobs, masks)]
    return KADiffOutput([Image.fromarray(im) for im in out.images], out.latents, records)
