"""Retrieval-augmented few-step generation (ImageRAGTurbo, HSPACE_SPEC §7): text-to-image with H-space injection.

Per image: its prompt's text key (the model's own encoder) → top-k entries of
the H-space database with their cosines λ → their h0_r (cached, or from
cached latents) → the one sampler over the family's steps (1 for SD-Turbo,
no CFG rows) with an H-space hook that blends h0_r into the target's map at
every step (choice Q10: the same h0_r at every step) → VAE decode. Each
image retrieves for itself, so one batch mixes neighbours freely; the
injection is a hook on the UNet's H-space seam, so everything else is
`pipelines.text_to_image` unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import jax
import numpy as np

from kadiff_jax.config import option
from kadiff_jax.job import Job
from kadiff_jax.models import hspace_adapter
from kadiff_jax.models.attention import HookInputs
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.ragturbo import adapter_file
from kadiff_jax.ragturbo import lora as lora_lib
from kadiff_jax.ragturbo.database import HSpaceDatabase, model_identity
from kadiff_jax.ragturbo.injection import SLERP_AXES, AdapterInjection, Retrieved, SlerpInjection
from kadiff_jax.ragturbo.text_key import ModelTextKey
from kadiff_jax.weights.models import DiffusionModels


def parse_hspace(value: str) -> str:
  value = str(value).strip()
  if value == "slerp" or (value.startswith("adapter:") and len(value) > len("adapter:")):
    return value
  raise ValueError(f"hspace={value!r}: expected 'slerp' or 'adapter:FILE' (a trained adapter) or 'adapter:init'")


@dataclasses.dataclass(frozen=True)
class RagTurboOptions:
  """How retrieved H-space features enter generation (HSPACE_SPEC §4-5, choices Q3 and Q5)."""

  k: int = option(1, "retrieved neighbours per image (Q3; the paper shows one)")
  w: float = option(0.8, "slerp: weight of the target map in Eq. 3 (1 = no injection)")
  hspace: str = option("slerp", "injection: 'slerp' (training-free, Eq. 3) or 'adapter:FILE' (a trained H-space "
                       "adapter, Eqs. 4-5; 'adapter:init' is the untrained one)", parse=parse_hspace)
  slerp_axes: str = option("all", "slerp angle over each sample's whole map (all) or per position over channels "
                           "(last) (Q5)", choices=SLERP_AXES)

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"k={self.k}: expected at least 1")
    if not 0.0 <= self.w <= 1.0:
      raise ValueError(f"w={self.w}: expected a weight in [0, 1]")
    parse_hspace(self.hspace)
    if self.slerp_axes not in SLERP_AXES:
      raise ValueError(f"slerp_axes={self.slerp_axes!r}: expected one of {SLERP_AXES}")

  @property
  def adapter_source(self) -> str | None:
    return self.hspace[len("adapter:"):] if self.hspace.startswith("adapter:") else None


@dataclasses.dataclass(frozen=True)
class Injection:
  """A loaded injection: its hook and (for the adapter) its params, with what identifies them in records."""

  hook: Any
  params: Any = None
  source: str = "slerp"
  sha256: str | None = None
  lora: dict | None = None  # the student decoder's LoRA trained with the adapter (folded into the UNet)

  def student(self, models: DiffusionModels) -> DiffusionModels:
    """`models` with this injection's LoRA folded into its UNet (itself when there is none)."""
    if not self.lora:
      return models
    return dataclasses.replace(models, unet_params=lora_lib.merge(models.unet_params, self.lora))

  @classmethod
  def load(cls, options: RagTurboOptions, models: DiffusionModels) -> "Injection":
    src = options.adapter_source
    if src is None:
      return cls(SlerpInjection(options.slerp_axes))
    if src == "init":
      config = hspace_adapter.HSpaceAdapterConfig.for_unet(models.unet_config)
      return cls(AdapterInjection(config), hspace_adapter.init_params(config, jax.random.PRNGKey(0)), "adapter:init")
    params, config, lora = adapter_file.load(src, models.unet_config, model_identity(models))
    with open(src, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    return cls(AdapterInjection(config), params, f"adapter:{src}", digest, lora)


@dataclasses.dataclass(frozen=True)
class Neighbour:
  id: str
  score: float      # λ: cosine of the prompt's and the entry caption's text keys
  caption: str

  def to_json(self) -> dict:
    return {"id": self.id, "lambda": round(self.score, 6), "caption": self.caption}


def retrieve(models: DiffusionModels, database: HSpaceDatabase, prompts: Sequence[str], k: int,
             batch_size: int = 64) -> list[list[Neighbour]]:
  """Top-k neighbours of each prompt by the model's own text key."""
  keys = ModelTextKey(models, database.text_key).encode(list(prompts), batch_size=batch_size)
  hits = database.search(keys, k)
  captions = {e.id: e.caption or e.title for e in database.entries(sorted({d for row in hits for d, _ in row}))}
  return [[Neighbour(d, s, captions[d]) for d, s in row] for row in hits]


def database_digest(database: HSpaceDatabase) -> str:
  """What identifies a database's content: the hash of its manifest's file checksums."""
  return hashlib.sha256(json.dumps(database.manifest.get("checksums", {}), sort_keys=True).encode()).hexdigest()[:20]


def job_inputs(job: Job, models: DiffusionModels, options: t2i.GenerationOptions, rag: RagTurboOptions,
               injection: Injection, database: HSpaceDatabase, neighbours: Sequence[Neighbour],
               init_latents: np.ndarray | None = None) -> dict:
  """Everything that decides a RAG-Turbo job's pixels (its record's fingerprinted inputs)."""
  return {**t2i.job_inputs(job, models, options, None, init_latents), "mode": "rag-turbo",
          "rag_turbo": dataclasses.asdict(rag), "injection": injection.source, "adapter_sha256": injection.sha256,
          "database": database_digest(database), "retrieved": [n.id for n in neighbours]}


def batch_hooks(models: DiffusionModels, database: HSpaceDatabase, rag: RagTurboOptions, injection: Injection,
                neighbours: dict[str, list[Neighbour]], mesh=None):
  """`text_to_image.generate`'s per-batch hooks: each job's retrieved h0_r, λ and w on the H-space seam."""

  def hooks_for(jobs: Sequence[Job]):
    ids = [n.id for j in jobs for n in neighbours[j.id]]
    h = database.hspace(models, ids, mesh)
    h = h.reshape((len(jobs), rag.k) + h.shape[1:])
    lam = np.asarray([[n.score for n in neighbours[j.id]] for j in jobs], np.float32)
    rows = Retrieved(h, lam, np.full((len(jobs),), rag.w, np.float32))
    return (injection.hook,), {injection.hook.name: HookInputs(injection.params, rows)}

  return hooks_for


def generate(models: DiffusionModels, jobs: Sequence[Job], options: t2i.GenerationOptions, rag: RagTurboOptions,
             database: HSpaceDatabase, out_dir=None, *, injection: Injection | None = None,
             init_latents: np.ndarray | None = None, batch_size: int | None = None, mesh=None, progress: bool = True,
             records: dict[str, dict] | None = None, neighbours: dict[str, list[Neighbour]] | None = None
             ) -> tuple[np.ndarray, np.ndarray, dict[str, list[Neighbour]]]:
  """RAG-Turbo images of `jobs`; returns (latents, uint8 images, neighbours by job id). `neighbours` (by job id)
  are retrieved here unless given (a caller that records them retrieves first)."""
  database.check_model(models)
  injection = injection or Injection.load(rag, models)
  models = injection.student(models)
  if neighbours is None:
    found = retrieve(models, database, [j.prompt for j in jobs], rag.k)
    neighbours = {j.id: row for j, row in zip(jobs, found)}
  latents, images = t2i.generate(
      models, jobs, options, out_dir, init_latents=init_latents, batch_size=batch_size, mesh=mesh, progress=progress,
      records=records, batch_hooks=batch_hooks(models, database, rag, injection, neighbours, mesh),
      extra_metadata={"mode": "rag-turbo", "injection": injection.source, "k": rag.k, "w": rag.w})
  return latents, images, neighbours


def write_jobs(models: DiffusionModels, jobs: Sequence[Job], options: t2i.GenerationOptions, rag: RagTurboOptions,
               database: HSpaceDatabase, out, *, injection: Injection | None = None,
               init_latents: np.ndarray | None = None, batch_size: int | None = None, overwrite: bool = False,
               progress: bool = True, on_plan=None):
  """`kadiff generate --mode rag-turbo`'s jobs into `out`: each `{id}.png` and its record `{id}.json` (inputs with
  their fingerprint, the retrieved entries and λ); jobs already done with the same inputs are skipped. Returns
  (the resume plan, neighbours by job id). `on_plan(plan)` runs once the plan stands (a refusal writes nothing)."""
  from kadiff_jax import records
  from kadiff_jax.outputs import OutputDir
  database.check_model(models)
  injection = injection or Injection.load(rag, models)
  found = retrieve(models, database, [j.prompt for j in jobs], rag.k)
  neighbours = {j.id: row for j, row in zip(jobs, found)}
  inputs = [job_inputs(j, models, options, rag, injection, database, neighbours[j.id],
                       None if init_latents is None else init_latents[i]) for i, j in enumerate(jobs)]
  resume = records.plan_resume(OutputDir(out), [j.id for j in jobs], inputs, overwrite=overwrite)
  if on_plan is not None:
    on_plan(resume)
  todo = [jobs[i] for i in resume.todo]
  if todo:
    generate(models, todo, options, rag, database, out, injection=injection, neighbours=neighbours,
             init_latents=None if init_latents is None else init_latents[resume.todo], batch_size=batch_size,
             progress=progress,
             records={j.id: records.record(j.id, inputs[i], prompt=j.prompt, seed=j.seed, index=j.index,
                                           retrieved=[n.to_json() for n in neighbours[j.id]],
                                           outputs={"image": f"{j.id}.png"})
                      for i, j in zip(resume.todo, todo)})
  return resume, neighbours
