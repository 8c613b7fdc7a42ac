"""The Python API: a KA-Diff pipeline object, as a diffusers or maxdiffusion user expects one.

    from kadiff_jax import KADiffPipeline
    pipe = KADiffPipeline.from_pretrained("tiny")        # or a pipeline folder / Hub id + ip_adapter, image_encoder
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

from kadiff_jax import xla_cpu
from kadiff_jax.job import Job, check_seed
from kadiff_jax.kadiff.options import DEFAULT_PROMPT, KADiffOptions
from kadiff_jax.kadiff.reference import PreparedReference
from kadiff_jax.weights.options import ModelOptions


class KADiffOutput(NamedTuple):
  images: list[Image.Image]  # one per prompt x num_images, in order
  latents: np.ndarray        # [N, h, w, C] final latents
  records: list[dict]        # per image: as `{id}.json` of `kadiff generate` (inputs, fingerprint, mask)


@dataclasses.dataclass
class KADiffPipeline:
  """Loaded pipeline models (any family) and IP-Adapter; call it to generate, `invert` to prepare a reference once."""

  models: Any
  adapter: Any
  model_options: ModelOptions = ModelOptions()
  mesh: Any = None

  @classmethod
  def from_pretrained(cls, model: str = "tiny", *, ip_adapter: str | None = None, image_encoder: str | None = None,
                      dtype: str = "fp32", variant: str | None = None, cache_dir: str | None = None,
                      mesh=None) -> "KADiffPipeline":
    """A pipeline folder in diffusers layout (SDXL, SD1.x, SD2.x and their turbo models), a Hub id, or "tiny",
    "tiny-sd15", ... (the built-in random models with their own adapters), with an IP-Adapter file and its CLIP
    image encoder folder; dtype fp32, bf16 or fp16."""
    return cls.from_options(ModelOptions(model=model, variant=variant, dtype=dtype, ip_adapter=ip_adapter,
                                         image_encoder=image_encoder, cache_dir=cache_dir), mesh=mesh)

  @classmethod
  def from_options(cls, model_options: ModelOptions, *, mesh=None) -> "KADiffPipeline":
    """The pipeline the model options (the CLI's model flags) name. Applies `xla_cpu.configure()` first (it
    takes effect when no JAX computation has run yet in this process)."""
    xla_cpu.configure()
    models = model_options.load()
    return cls(models, model_options.load_adapter(models, required=True), model_options, mesh)

  def write_jobs(self, jobs: Sequence[Job], out_dir, options: KADiffOptions | None = None, *,
                 baseline: bool = False, overwrite: bool = False, **kwargs):
    """Runs a batch of jobs into an output folder (what `kadiff generate --mode` does): images, grids and one
    JSON record per job, resuming where records match (see `kadiff_jax.kadiff.jobs.run`)."""
    from kadiff_jax.kadiff import jobs as kjobs
    return kjobs.run(self.models, self.adapter, jobs, self.options(options), out_dir,
                     cache_dir=self.reference_cache_dir(kwargs.pop("cache_dir", None)), baseline=baseline,
                     overwrite=overwrite, mesh=kwargs.pop("mesh", self.mesh), **kwargs)

  def options(self, options: KADiffOptions | None = None, **overrides) -> KADiffOptions:
    """`options` (default: the release's) with keyword overrides, resolved for this model."""
    return dataclasses.replace(options or KADiffOptions(), **overrides).for_model(self.models)

  def reference_cache_dir(self, cache_dir=None):
    """Where prepared references (inversions) are cached: `cache_dir`, else references/ in the cache root."""
    from kadiff_jax.weights.load import default_cache_dir
    return cache_dir if cache_dir is not None else (self.model_options.cache_path or default_cache_dir()) / "references"

  def invert(self, reference, ref_prompt: str, options: KADiffOptions | None = None, *, auto_mask: bool = False,
             cache_dir: str | os.PathLike | None = None, **overrides) -> PreparedReference:
    """A reference (path or PIL image) prepared once: pixels, IP-Adapter tokens, ref_prompt embeddings and its
    DDIM inversion (from the reference cache when it holds one). Pass it as `reference=` to later calls."""
    from kadiff_jax.kadiff import reference as R
    return R.prepare_reference(self.models, self.adapter, reference, ref_prompt, self.options(options, **overrides),
                               auto_mask=auto_mask, cache_dir=self.reference_cache_dir(cache_dir), mesh=self.mesh)

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
    from kadiff_jax import records
    ref_digest = kjobs.reference_digest(prepared.image)
    given = None  # a mask given in memory (PIL, or an array: bool, or uint8 with white = concept), read once
    if mask is not None and path_mask is None:
      from kadiff_jax.kadiff.reference import load_mask
      image = mask if isinstance(mask, Image.Image) else Image.fromarray(
          np.asarray(mask, np.uint8) * (255 if np.asarray(mask).dtype == bool else 1))
      given = (load_mask(image, opts.size, opts.mask_padding), {"source": "user", "path": "<in memory>"},
               "sha256:" + records.array_sha256(np.asarray(image.convert("L"))))
    mask_digests: dict[str, str] = {}
    items, masks, inputs = [], [], []
    for job in jobs:
      if given is not None:
        m, info, mask_digest = given
      else:
        m, info = kjobs.job_mask(job, prepared, self.models.tokenizer, opts)
        mask_digest = kjobs.mask_input(job, mask_digests)
      items.append(G.GenerationItem(job, prepared, m, kjobs.job_noise(job, self.models, opts)))
      masks.append(info)
      inputs.append(kjobs.job_inputs(job, self.models, self.adapter, opts, reference_sha256=ref_digest,
                                     mask=mask_digest))
    out = G.run_jobs(self.models, self.adapter, items, opts, mesh=self.mesh)
    recs = [records.record(j.id, i, **kjobs.job_fields(j), mask=info) for j, i, info in zip(jobs, inputs, masks)]
    return KADiffOutput([Image.fromarray(im) for im in out.images], out.latents, recs)


class KnowledgeAugmentedOutput(NamedTuple):
  images: list[Image.Image]  # num_images per query; empty when no reference matched
  record: dict               # retrieval (candidates, scores, re-ranking), the chosen entry, then the job's record
  retrieval: Any             # retrieval.retriever.Retrieval


@dataclasses.dataclass
class KnowledgeAugmentedPipeline:
  """Retrieval, then KA-Diff: a prompt -> a reference retrieved from an index -> images and a record.

      from kadiff_jax import KnowledgeAugmentedPipeline
      kap = KnowledgeAugmentedPipeline.from_pretrained("tiny", index="idx")   # kadiff retrieve build ... --index idx
      out = kap("a chow chow in the snow", concept="chow chow", steps=10)
      out.images[0].save("chow.png"); print(out.record["chosen"])

  As `kadiff run`: the entry's caption is the ref_prompt (else "a photo of TITLE"); with mask "auto" the mask
  words are the entity's (title, else aliases) found in it; a best dense score under `min_score` is a weak
  match: no images (or the top-1 anyway with on_no_match="top1").
  """

  pipe: KADiffPipeline
  retriever: Any

  @classmethod
  def from_pretrained(cls, model: str = "tiny", *, index: str, rerank: str | None = None, embedder: str | None = None,
                      scoring: str = "logprob", **model_kwargs) -> "KnowledgeAugmentedPipeline":
    """`model` and `model_kwargs` as `KADiffPipeline.from_pretrained`; `index` a `kadiff retrieve build` folder;
    `rerank` an MLLM folder, Hub id or "tiny"."""
    from retrieval import embed, rerank as rerank_lib, retriever, store
    ri = store.RetrievalIndex.load(index)
    r = retriever.Retriever(ri, embed.load_embedder(embedder or ri.manifest["embedder"]["id"]),
                            reranker=rerank_lib.MLLMReranker(rerank, scoring=scoring) if rerank else None)
    return cls(KADiffPipeline.from_pretrained(model, **model_kwargs), r)

  def __call__(self, prompt: str, concept: str | None = None, *, k: int = 5, mask="auto", seed: int = 0,
               num_images: int = 1, min_score: float | None = None, on_no_match: str = "skip",
               options: KADiffOptions | None = None, **overrides) -> KnowledgeAugmentedOutput:
    from kadiff_jax.kadiff import run as krun
    concept = concept or prompt
    found = self.retriever.retrieve(concept, k)
    auto = isinstance(mask, str) and mask == "auto"
    d = krun.decide(found, concept, auto_mask=auto, words_given=bool((options and options.mask_words)
                                                                     or overrides.get("mask_words")),
                    min_score=krun.MIN_SCORE if min_score is None else min_score, on_no_match=on_no_match)
    record = {"prompt": prompt, "seed": seed, **d.record}
    if d.entry is None:
      return KnowledgeAugmentedOutput([], record, found)
    if d.mask_words:
      overrides["mask_words"] = d.mask_words
    out = self.pipe(prompt, reference=d.entry.image, ref_prompt=d.ref_prompt, mask=mask, seed=seed,
                    num_images=num_images, options=options, **overrides)
    record.update(status="done", images=out.records)
    return KnowledgeAugmentedOutput(out.images, record, found)
