"""What `kadiff app` does, without the web: models loaded once, and one method per action of the page.

Every action writes into its own folder, `OUT/session-{id}/{NNN}-{action}/`,
through the same code as the CLI (`kadiff_jax.kadiff.jobs.run` for KA-Diff,
`interpolation.cli.write_frames` for interpolation), so a page's images are
the CLI's pixels and every file is written whole. Bad input raises a
ValueError whose one line the page shows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kadiff_jax import image_io
from kadiff_jax.outputs import OutputDir

log = logging.getLogger("kadiff_jax")
MASK_SOURCES = ("auto", "drawn", "uploaded", "none")  # the concept mask: cross-attention, strokes, a file, all
JOB_ID = "image"  # the one job of a generation folder: image.png, image_baseline.png, image_grid.png, image.json


@dataclasses.dataclass(frozen=True)
class RunResult:
  """One KA-Diff generation as the page shows it."""

  folder: Path
  ours: Path
  baseline: Path | None
  grid: Path
  mask_overlay: Path
  record: dict
  record_path: Path


def mask_overlay(reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The reference at the mask's size, dimmed outside the concept, the concept outlined in red."""
  from kadiff_jax.kadiff.visualize import outline, resize_square
  ref = resize_square(np.asarray(reference), mask.shape[0])
  return outline(np.where(mask[..., None], ref, (ref * 0.3).astype(np.uint8)), mask)


def strokes_mask(layers: Sequence[np.ndarray]) -> np.ndarray:
  """The pixels any drawn layer covers (alpha > 0; a layer without alpha: non-black) as a white-on-black image."""
  covered = None
  for layer in layers:
    a = np.asarray(layer)
    hit = a[..., 3] > 0 if a.ndim == 3 and a.shape[-1] == 4 else np.asarray(a).reshape(a.shape[:2] + (-1,)).max(-1) > 0
    covered = hit if covered is None else covered | hit
  if covered is None or not covered.any():
    raise ValueError("mask 'drawn': nothing is drawn on the reference; paint over the concept, or choose another "
                     "mask source")
  return covered.astype(np.uint8) * 255


@dataclasses.dataclass
class AppService:
  """The loaded pipeline (and retriever), and where each session's outputs go."""

  pipe: Any                     # kadiff_jax.pipeline.KADiffPipeline
  out_root: Path
  retriever: Any = None         # retrieval.retriever.Retriever, when an index was given
  index: str | None = None
  rerank: str | None = None
  min_score: float | None = None
  database: Any = None          # kadiff_jax.ragturbo.database.HSpaceDatabase, when one was given
  database_path: str | None = None
  hspace_adapter: str | None = None  # a trained H-space adapter file offered beside slerp

  @classmethod
  def load(cls, model_options, out_root, *, index: str | None = None, rerank: str | None = None,
           embedder: str | None = None, scoring: str = "logprob", min_score: float | None = None,
           database: str | None = None, hspace_adapter: str | None = None) -> "AppService":
    """Loads the pipeline, its IP-Adapter, (with `index`) the retriever and (with `database`) the H-space database,
    once for the app's lifetime."""
    from kadiff_jax.pipeline import KADiffPipeline
    retriever = None
    if index:
      from retrieval import embed, rerank as rerank_lib, retriever as retriever_lib, store
      ri = store.RetrievalIndex.load(index)
      retriever = retriever_lib.Retriever(ri, embed.load_embedder(embedder or ri.manifest["embedder"]["id"]),
                                          reranker=rerank_lib.MLLMReranker(rerank, scoring=scoring)
                                          if rerank else None)
    pipe = KADiffPipeline.from_options(model_options)
    db = None
    if database:
      from kadiff_jax.ragturbo.database import HSpaceDatabase
      db = HSpaceDatabase.load(database, pipe.models)
    if hspace_adapter and not db:
      raise ValueError("--hspace-adapter is used by the RAG-Turbo tab, which needs --database DIR")
    return cls(pipe, Path(out_root), retriever, index, rerank, min_score, db, database, hspace_adapter)

  # -- what is loaded --------------------------------------------------------------------------------------------

  def describe(self) -> str:
    """One Markdown line per loaded part, for the page's header."""
    m, a = self.pipe.models, self.pipe.adapter
    size = m.unet_config.sample_size * m.vae_scale_factor
    lines = [f"**Model** `{m.source}` ({m.family.label}, {size} px)",
             f"**IP-Adapter** `{a.source}`"]
    if self.retriever is not None:
      ri = self.retriever.index
      lines.append(f"**Index** `{self.index}` ({len(ri)} entries, embedder `{ri.manifest['embedder']['id']}`)"
                   + (f", re-ranked by `{self.rerank}`" if self.rerank else ""))
    else:
      lines.append("**Index** none (start with `--index DIR` for knowledge-augmented generation)")
    if self.database is not None:
      lines.append(f"**H-space database** `{self.database_path}` ({len(self.database)} entries, cache "
                   f"{self.database.cache}, text key {self.database.text_key})"
                   + (f", adapter `{self.hspace_adapter}`" if self.hspace_adapter else ""))
    lines.append(f"**Outputs** `{self.out_root}`")
    return "  \n".join(lines)

  # -- folders ---------------------------------------------------------------------------------------------------

  def folder(self, session: str | None, action: str) -> Path:
    """A new folder for one action of one session: OUT/session-{id}/{NNN}-{action}."""
    sid = re.sub(r"[^A-Za-z0-9]", "", session or "")[:16] or "local"
    root = self.out_root / f"session-{sid}"
    root.mkdir(parents=True, exist_ok=True)
    n = len([p for p in root.iterdir() if p.is_dir()]) + 1
    while True:
      path = root / f"{n:03d}-{action}"
      try:
        path.mkdir()
        return path
      except FileExistsError:
        n += 1

  # -- knowledge-augmented generation ----------------------------------------------------------------------------

  def retrieve(self, session: str | None, query: str, concept: str | None = None, k: int = 5) -> dict:
    """Retrieves candidates for `concept` (default: the query): their pictures saved, each candidate's
    ref_prompt and mask words, and the decision (re-ranked or top-1; none under min_score)."""
    from kadiff_jax.kadiff import run as krun
    from retrieval.retriever import load_image
    if self.retriever is None:
      raise ValueError("no retrieval index is loaded; start the app with --index DIR (kadiff retrieve build)")
    query = (query or "").strip()
    concept = (concept or "").strip() or query
    if not concept:
      raise ValueError("the prompt is empty; say what to generate, e.g. 'a chow chow in the snow'")
    if not 1 <= int(k) <= 50:
      raise ValueError(f"k = {k}: expected 1 to 50 candidates")
    found = self.retriever.retrieve(concept, int(k))
    d = krun.decide(found, concept, auto_mask=True, words_given=False,
                    min_score=krun.MIN_SCORE if self.min_score is None else self.min_score)
    folder = self.folder(session, "retrieve")
    out = OutputDir(folder)
    rerank = found.decision.scores if found.decision is not None else {}
    candidates = []
    for c in found.candidates:
      picture = load_image(c.entry.image, cache_dir=self.retriever.image_cache)
      thumb = out.write_bytes(f"candidate_{c.rank:02d}.png", image_io.png_bytes(np.asarray(picture)))
      ref_prompt, source = krun.ref_prompt_for(c.entry)
      words, _ = krun.entity_mask_words(c.entry, ref_prompt)
      candidates.append({"id": c.id, "title": c.entry.title, "score": float(c.score), "image": c.entry.image,
                         "picture": thumb, "ref_prompt": ref_prompt, "ref_prompt_source": source,
                         "mask_words": list(words), "rerank": rerank.get(c.id)})
    chosen = None if d.entry is None else next(i for i, c in enumerate(candidates) if c["id"] == d.entry.id)
    state = {"query": query, "concept": concept, "folder": str(folder), "candidates": candidates,
             "chosen": chosen, "line": d.line, "decision": d.record,
             "rerank": None if found.decision is None else {"rule": found.decision.rule,
                                                           "top1_judgement": found.decision.judgement}}
    out.write_text("retrieval.json", json.dumps(state, indent=1, default=str))
    return state

  def generate_retrieved(self, session: str | None, state: dict | None, choice: int | None, prompt: str, *,
                         seed: int = 0, mask_source: str = "auto", drawn: Sequence[np.ndarray] = (),
                         mask_file: str | None = None, baseline: bool = True, **options) -> RunResult:
    """KA-Diff with the chosen candidate (`choice`, default the retrieval's decision) as the reference."""
    if not state or not state.get("candidates"):
      raise ValueError("retrieve first: no candidates yet")
    cands = state["candidates"]
    if choice is None:
      choice = state.get("chosen")
      if choice is None:
        raise ValueError(f"{state['line']}; pick a candidate to use one anyway")
    if not 0 <= int(choice) < len(cands):
      raise ValueError(f"candidate {choice}: expected 0 to {len(cands) - 1}")
    c = cands[int(choice)]
    extra = {"concept": state["concept"], "retrieval": state["decision"].get("retrieval"),
             "chosen": {k: c[k] for k in ("id", "title", "image", "score")},
             "chosen_by": "user" if choice != state.get("chosen") else "retrieval",
             "ref_prompt_source": c["ref_prompt_source"]}
    words = tuple(c["mask_words"]) if mask_source == "auto" and not options.get("mask_words") else None
    if words:
      options["mask_words"] = words
    # a web corpus's image was downloaded for the gallery: generate from those pixels (saved losslessly)
    reference = c["picture"] if "://" in str(c["image"]) else c["image"]
    return self.generate(session, prompt or state["query"], reference, c["ref_prompt"], seed=seed,
                         mask_source=mask_source, drawn=drawn, mask_file=mask_file, baseline=baseline,
                         extra_record=extra, action="generate-retrieved", **options)

  # -- KA-Diff from a given reference ----------------------------------------------------------------------------

  def generate(self, session: str | None, prompt: str, reference, ref_prompt: str, *, seed: int = 0,
               mask_source: str = "auto", drawn: Sequence[np.ndarray] = (), mask_file: str | None = None,
               baseline: bool = True, extra_record: dict | None = None, action: str = "generate",
               **options) -> RunResult:
    """One KA-Diff job: `reference` a path or an image array, the mask from `mask_source` (auto, drawn strokes,
    an uploaded file, none), options as `KADiffOptions` fields; ours, the baseline, the grid and the record."""
    from kadiff_jax.job import Job, check_seed
    from kadiff_jax.kadiff import reference as R
    from kadiff_jax.kadiff.options import KADiffOptions
    if not (prompt or "").strip():
      raise ValueError("the prompt is empty; say what to generate")
    if reference is None:
      raise ValueError("no reference image; upload one")
    if mask_source not in MASK_SOURCES:
      raise ValueError(f"mask source {mask_source!r}: expected one of {MASK_SOURCES}")
    seed = check_seed(seed)
    opts = self.pipe.options(KADiffOptions(), **{k: v for k, v in options.items() if v is not None})
    folder = self.folder(session, action)
    out = OutputDir(folder)
    if not isinstance(reference, (str, Path)):
      picture = np.asarray(reference)[..., :3]
      reference = out.write_bytes("reference.png", image_io.png_bytes(picture))
    else:
      picture = np.asarray(image_io.load_rgb(reference))  # a bad image is one line, before any work
    mask = {"auto": "auto", "none": None}.get(mask_source)
    if mask_source == "drawn":
      mask = out.write_bytes("mask.png", image_io.png_bytes(strokes_mask(drawn)))
    elif mask_source == "uploaded":
      if not mask_file:
        raise ValueError("mask 'uploaded': no mask file given; upload one (white = concept)")
      picture = np.asarray(image_io.load_rgb(mask_file))
      mask = out.write_bytes("mask.png", image_io.png_bytes(picture))
    job = Job(JOB_ID, prompt.strip(), seed, reference=str(reference), ref_prompt=(ref_prompt or "").strip(),
              mask=str(mask) if mask else None, mask_words=tuple(opts.mask_words or ()))
    ran = self.pipe.write_jobs([job], folder, opts, baseline=baseline, extra_fields={JOB_ID: extra_record or {}})
    record = ran.records[JOB_ID]
    if mask == "auto":
      used = np.asarray(image_io.load_rgb(folder / f"{JOB_ID}_mask.png"))[..., 0] > 127
    elif mask:
      used = R.load_mask(str(mask), opts.size, opts.mask_padding)
    else:
      used = np.ones((opts.size, opts.size), bool)
    overlay = out.write_bytes("mask_overlay.png", image_io.png_bytes(mask_overlay(picture, used)))
    state = {"folder": str(folder), "job": dataclasses.asdict(job), "options": {k: v for k, v in options.items()
                                                                                  if v is not None}}
    out.write_text("run.json", json.dumps(state, indent=1, default=str))
    return RunResult(folder, folder / f"{JOB_ID}.png", folder / f"{JOB_ID}_baseline.png" if baseline else None,
                     folder / f"{JOB_ID}_grid.png", Path(overlay), record, folder / f"{JOB_ID}.json")

  def correspondence(self, session: str | None, run_folder: str | None) -> tuple[list[Path], dict]:
    """`kadiff visualize correspondence` for a generation made on this page: its figures and summary."""
    from kadiff_jax.job import Job
    from kadiff_jax.kadiff import figures
    from kadiff_jax.kadiff.options import KADiffOptions
    if not run_folder or not (Path(run_folder) / "run.json").is_file():
      raise ValueError("generate an image first: the correspondence figures are drawn for a run of this page")
    if self.out_root.resolve() not in Path(run_folder).resolve().parents:
      raise ValueError(f"{run_folder} is not a run of this app")
    state = json.loads((Path(run_folder) / "run.json").read_text())
    job = dict(state["job"])
    job["mask_words"] = tuple(job.get("mask_words") or ())
    options = dict(state["options"])
    if options.get("inject_steps"):
      options["inject_steps"] = tuple(options["inject_steps"])
    opts = self.pipe.options(KADiffOptions(), **options)
    folder = self.folder(session, "correspondence")
    summary = figures.correspondence_figures(self.pipe.models, self.pipe.adapter, Job(**job), opts, folder,
                                             cache_dir=self.pipe.reference_cache_dir())
    names = ("matches.png", "distance.png", "injected.png", "cross_attention.png")
    return [folder / n for n in names], summary

  # -- attention interpolation -----------------------------------------------------------------------------------

  def interpolate(self, session: str | None, prompt_a: str, prompt_b: str, *, frames: int = 5, seed: int = 0,
                  guide_prompt: str | None = None, mode: str = "text", image_a=None, image_b=None,
                  **options) -> tuple[list[Path], Path, Path, dict]:
    """AID/PAID frames between two prompts (`kadiff interpolate`): frame paths, the strip, the GIF, the record."""
    from kadiff_jax.interpolation import cli as icli
    from kadiff_jax.interpolation import coefficients
    from kadiff_jax.interpolation.pipeline import InterpolationOptions, interpolate
    from kadiff_jax.job import check_seed
    if not (prompt_a or "").strip() or not (prompt_b or "").strip():
      raise ValueError("both prompts are needed: prompt A (the first frame) and prompt B (the last)")
    if not 3 <= int(frames) <= 16:
      raise ValueError(f"frames = {frames}: expected 3 to 16 (A, the middle frames, B)")
    if mode not in ("text", "morph", "scale-control"):
      raise ValueError(f"mode {mode!r}: expected text, morph or scale-control")
    if mode != "text" and image_b is None:
      raise ValueError(f"mode {mode}: upload image B (the end frame's image)")
    if mode == "morph" and image_a is None:
      raise ValueError("mode morph: upload image A too (morphing goes from image A to image B)")
    if mode == "text" and (image_a is not None or image_b is not None):
      raise ValueError("images are read in modes morph and scale-control; choose one, or clear the images")
    if mode == "morph" and guide_prompt:
      raise ValueError("a guide prompt works with mode text (PAID); clear it for morph")
    seed = check_seed(seed)
    opts = InterpolationOptions(**{k: v for k, v in options.items() if v is not None})
    coefs = coefficients.beta_prior(int(frames), 6.0, 3.0)
    pil = {k: None if v is None else image_io.load_rgb(v if isinstance(v, (str, Path)) else
                                                       np.asarray(v)[..., :3].astype(np.uint8))
           for k, v in (("image_a", image_a), ("image_b", image_b))}
    result = interpolate(self.pipe.models, prompt_a, prompt_b, coefs, opts, guide_prompt=guide_prompt or None,
                         seed=seed, mode=mode, adapter=self.pipe.adapter if mode != "text" else None, **pil)
    folder = self.folder(session, "interpolate")
    out = OutputDir(folder)
    names = icli.write_frames(out, result, {"prompt_a": prompt_a, "prompt_b": prompt_b, "seed": str(seed)})
    record = icli.record(self.pipe.models, self.pipe.adapter if mode != "text" else None, opts, result, names,
                         prompt_a=prompt_a, prompt_b=prompt_b, guide_prompt=guide_prompt or None,
                         negative_prompt=None, seed=seed, init_latents=None, mode=mode,
                         image_a="<uploaded>" if image_a is not None else None,
                         image_b="<uploaded>" if image_b is not None else None)
    out.write_text("interpolation.json", json.dumps(record, indent=1))
    return [folder / n for n in names], folder / "strip.png", folder / "interpolation.gif", record

  # -- RAG-Turbo -------------------------------------------------------------------------------------------------

  def rag_turbo(self, session: str | None, prompt: str, *, seed: int = 0, k: int = 1, w: float = 0.8,
                injection: str = "slerp", steps: int | None = None) -> tuple[Path, Path, list[tuple[Path, str]], dict]:
    """One-step generation with retrieved H-space features (`kadiff generate --mode rag-turbo`) and the plain
    image from the same noise: (ours, plain, [(neighbour picture, caption)], record)."""
    from kadiff_jax.job import Job, check_seed
    from kadiff_jax.pipelines import text_to_image as t2i
    from kadiff_jax.ragturbo import pipeline as rt
    from retrieval.retriever import load_image
    if self.database is None:
      raise ValueError("no H-space database is loaded: start the app with --database DIR")
    if not (prompt or "").strip():
      raise ValueError("the prompt is empty: describe the image to generate")
    if injection not in ("slerp", "adapter"):
      raise ValueError(f"injection {injection!r}: expected slerp or adapter")
    if injection == "adapter" and not self.hspace_adapter:
      raise ValueError("no H-space adapter is loaded: start the app with --hspace-adapter FILE, or use slerp")
    seed = check_seed(seed)
    rag = rt.RagTurboOptions(k=int(k), w=float(w),
                             hspace="slerp" if injection == "slerp" else f"adapter:{self.hspace_adapter}")
    options = t2i.GenerationOptions(steps=steps)
    models = self.pipe.models
    folder = self.folder(session, "rag-turbo")
    job = Job.numbered(prompt.strip(), seed, 0)
    job = dataclasses.replace(job, id=JOB_ID)
    _, neighbours = rt.write_jobs(models, [job], options, rag, self.database, folder, progress=False)
    _, plain = t2i.generate(models, [job], options, progress=False)
    image_io.write_png(folder / "plain.png", plain[0])
    pictures = []
    for i, n in enumerate(neighbours[job.id]):
      entry = self.database.entries([n.id])[0]
      path = folder / f"neighbour-{i}.png"
      image_io.write_png(path, np.asarray(load_image(entry.image, cache_dir=self.pipe.reference_cache_dir())))
      pictures.append((path, f"{n.id}: λ = {n.score:.3f}, {n.caption}"))
    record = json.loads((folder / f"{JOB_ID}.json").read_text())
    return folder / f"{JOB_ID}.png", folder / "plain.png", pictures, record
