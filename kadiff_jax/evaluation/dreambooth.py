"""The DreamBooth evaluation (spec section 8): subjects x their 25 prompts x seeds, three methods, three metrics.

A dataset folder holds one sub-folder of images per subject and
`prompts_and_classes.txt` (the DreamBooth release's file: a `subject_name,class`
table, then the object and the live-subject prompt lists, written as
`'a {0} {1} in the snow'.format(unique_token, class_token)`). Live subjects
are those whose class is cat or dog, as in DreamBooth. KA-Diff needs no
fine-tuning, so the unique token defaults to nothing: "a dog in the snow".

For each subject the reference is its image number `reference_index` (sorted
by name) and its ref_prompt "a photo of a {class}". Every (subject, prompt,
seed) is one KA-Diff job; its IP-Adapter baseline comes from the same noise,
and the MasaCtrl-style baseline is a second run of the same jobs. Generation
resumes (finished images are skipped) and reference inversions are cached.
Metrics per image: CLIP-T against the prompt, CLIP-I and DINO against the
reference image.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from kadiff_jax.job import Job
from kadiff_jax.kadiff import jobs as kjobs

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = frozenset({"cat", "dog"})
METHODS = ("kadiff", "baseline", "masactrl")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclasses.dataclass(frozen=True)
class Subject:
  name: str
  cls: str
  images: tuple[Path, ...]

  @property
  def live(self) -> bool:
    return self.cls in LIVE_CLASSES


@dataclasses.dataclass(frozen=True)
class Dataset:
  root: Path
  subjects: tuple[Subject, ...]
  object_prompts: tuple[str, ...]  # templates with {0} = unique token, {1} = class
  live_prompts: tuple[str, ...]

  def prompts_for(self, subject: Subject) -> tuple[str, ...]:
    return self.live_prompts if subject.live else self.object_prompts


def _prompt_list(text: str, heading: str, path: Path) -> tuple[str, ...]:
  start = text.find(heading)
  if start < 0:
    raise ValueError(f"{path}: no '{heading}' section")
  block = text[start:]
  end = block.find("]")
  templates = tuple(re.findall(r"'([^']*)'\s*\.format", block[:end if end >= 0 else None]))
  if not templates:
    raise ValueError(f"{path}: the '{heading}' section has no prompts of the form 'a {{0}} {{1}} ...'.format(...)")
  return templates


def load_dataset(root: str | Path) -> Dataset:
  """Reads a DreamBooth-layout folder; errors name what is missing."""
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"DreamBooth dataset folder {root} does not exist (expected subject folders and "
                            f"{PROMPTS_FILE})")
  path = root / PROMPTS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{root} has no {PROMPTS_FILE} (the DreamBooth subject/class table and prompt lists)")
  text = path.read_text()
  m = re.search(r"subject_name\s*,\s*class\s*\n(.*?)(?:\n\s*\n|$)", text, re.S)
  if not m:
    raise ValueError(f"{path}: no 'subject_name,class' table")
  subjects = []
  for line in m.group(1).splitlines():
    name, _, cls = (p.strip() for p in line.partition(","))
    if not name or not cls:
      raise ValueError(f"{path}: bad subject line {line!r}; expected NAME,CLASS")
    folder = root / name
    images = tuple(sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)) \
        if folder.is_dir() else ()
    if not images:
      raise FileNotFoundError(f"subject {name!r}: no images in {folder}")
    subjects.append(Subject(name, cls, images))
  return Dataset(root, tuple(subjects), _prompt_list(text, "Object Prompts", path),
                 _prompt_list(text, "Live Subject Prompts", path))


def format_prompt(template: str, unique_token: str, cls: str) -> str:
  return " ".join(template.format(unique_token, cls).split())


@dataclasses.dataclass(frozen=True)
class Item:
  """One evaluated (subject, prompt, seed)."""

  id: str
  subject: str
  cls: str
  prompt_index: int
  prompt: str
  seed: int
  reference: str
  ref_prompt: str


def plan(dataset: Dataset, subjects: Sequence[str] | None = None, prompt_indices: Sequence[int] | None = None,
         seeds: Sequence[int] = (0,), unique_token: str = "", reference_index: int = 0) -> list[Item]:
  """The evaluation items, subject-major; selections are checked against the dataset."""
  by_name = {s.name: s for s in dataset.subjects}
  unknown = [s for s in subjects or () if s not in by_name]
  if unknown:
    raise ValueError(f"unknown subjects {unknown}; the dataset has {sorted(by_name)}")
  chosen = [by_name[s] for s in subjects] if subjects else list(dataset.subjects)
  items = []
  for subj in chosen:
    templates = dataset.prompts_for(subj)
    indices = list(prompt_indices) if prompt_indices is not None else list(range(len(templates)))
    bad = [i for i in indices if not 0 <= i < len(templates)]
    if bad:
      raise ValueError(f"prompt indices {bad}: subject {subj.name} has prompts 0-{len(templates) - 1}")
    if not 0 <= reference_index < len(subj.images):
      raise ValueError(f"reference index {reference_index}: subject {subj.name} has {len(subj.images)} images")
    for i in indices:
      for seed in seeds:
        items.append(Item(f"{subj.name}-p{i:02d}-s{seed}", subj.name, subj.cls, i,
                          format_prompt(templates[i], unique_token, subj.cls), int(seed),
                          str(subj.images[reference_index]), f"a photo of a {subj.cls}"))
  return items


def image_path(out_dir: Path, method: str, item_id: str) -> Path:
  """Where a method's image for an item lives (the baseline comes with the KA-Diff run)."""
  if method == "baseline":
    return out_dir / "images" / "kadiff" / f"{item_id}_baseline.png"
  return out_dir / "images" / method / f"{item_id}.png"


def generate(models, adapter, items: Sequence[Item], options, out_dir: str | Path, *, mask: str | None = "auto",
             methods: Sequence[str] = METHODS, batch_size: int | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
  """Generates every missing image of every method; returns {method: images generated now}."""
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise ValueError(f"methods {sorted(unknown)}: expected some of {METHODS}")
  out_dir = Path(out_dir)
  cache_dir = out_dir / "cache"
  jobs = [Job(it.id, it.prompt, it.seed, reference=it.reference, ref_prompt=it.ref_prompt, mask=mask)
          for it in items]
  counts = {}
  if "kadiff" in methods or "baseline" in methods:
    # one KA-Diff run writes ours and the IP-Adapter baseline from the same noise (baseline before ours,
    # so a finished job always has both)
    done = kjobs.run(models, adapter, jobs, dataclasses.replace(options, mode="kadiff"), out_dir / "images" / "kadiff",
                     cache_dir=cache_dir, baseline=True, batch_size=batch_size, progress=progress,
                     overwrite=overwrite)
    counts["kadiff+baseline"] = done.ran
  if "masactrl" in methods:
    done = kjobs.run(models, adapter, jobs, dataclasses.replace(options, mode="masactrl"),
                     out_dir / "images" / "masactrl", cache_dir=cache_dir, baseline=False, batch_size=batch_size,
                     progress=progress, overwrite=overwrite)
    counts["masactrl"] = done.ran
  return counts


def score(items: Sequence[Item], out_dir: str | Path, clip, dino, methods: Sequence[str] = METHODS,
          batch: int = 16, progress: bool = True) -> list[dict]:
  """Per-image rows: item fields, method, image path, clip_t, clip_i, dino (against the reference)."""
  out_dir = Path(out_dir)
  rows = []
  pairs = [(it, m) for it in items for m in methods]
  missing = [str(image_path(out_dir, m, it.id)) for it, m in pairs if not image_path(out_dir, m, it.id).is_file()]
  if missing:
    raise FileNotFoundError(f"{len(missing)} generated image(s) are missing, e.g. {missing[0]}; run generation first")
  # each image and each reference is embedded once (CLIP-T and CLIP-I share the image's CLIP embedding)
  refs = sorted({it.reference for it in items})
  ref_clip = dict(zip(refs, clip.image_embeds(refs)))
  ref_dino = dict(zip(refs, dino.features(refs)))
  bar = tqdm(total=len(pairs), unit="img", desc="scoring (CLIP-T, CLIP-I, DINO)", disable=not progress)
  for start in range(0, len(pairs), batch):
    chunk = pairs[start:start + batch]
    images = [image_path(out_dir, m, it.id) for it, m in chunk]
    g_clip, g_dino = clip.image_embeds(images), dino.features(images)
    clip_t = clip.clip_t_from_embeds(g_clip, clip.text_embeds([it.prompt for it, _ in chunk]))
    clip_i = (g_clip * np.stack([ref_clip[it.reference] for it, _ in chunk])).sum(-1)
    dino_s = (g_dino * np.stack([ref_dino[it.reference] for it, _ in chunk])).sum(-1)
    for k, (it, m) in enumerate(chunk):
      rows.append({**dataclasses.asdict(it), "method": m, "image": str(images[k].relative_to(out_dir)),
                   "clip_t": float(clip_t[k]), "clip_i": float(clip_i[k]), "dino": float(dino_s[k])})
    bar.update(len(chunk))
  bar.close()
  return rows
