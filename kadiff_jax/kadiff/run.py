"""Knowledge-augmented generation end to end: query -> retrieved reference -> KA-Diff images + a record.

For each query: retrieve (optionally expand and re-rank) a reference entry,
derive its `ref_prompt` (the entry's caption, else "a photo of TITLE"), take
the user's mask if one is given (or derive one from the reference's
cross-attention with mask "auto"), then invert and generate with the KA-Diff
job runner, which writes ours / baseline / the side-by-side grid. Every
decision (candidates and scores, re-ranking, chosen entry, ref_prompt and
mask source, options, seed) goes into `{id}.json`, written atomically.

A query whose best dense score is under `min_score` has no good match: by
default it is reported (status "no_match" in its record) and skipped;
`on_no_match="top1"` generates from the top-1 anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from kadiff_jax import records as records_lib
from kadiff_jax.job import check_seed
from kadiff_jax.outputs import OutputDir, check_id

log = logging.getLogger(__name__)

# The no-match threshold for the bundled all-MiniLM-L6-v2: `kadiff retrieve calibrate` on the DreamBooth index
# puts 59 of its 60 queries' top-1 scores at or over 0.32 (min 0.290, p5 0.407) and 29 of 30 off-topic queries'
# under it (p95 0.285, max 0.385).
MIN_SCORE = 0.32


@dataclasses.dataclass(frozen=True)
class Query:
  id: str
  prompt: str               # what to generate
  concept: str              # what to retrieve (defaults to the prompt)
  seed: int = 0
  mask: str | None = None   # a user mask for whichever reference is chosen, or "auto"


def slug(text: str, n: int = 40) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "query"


def read_queries(path: str | os.PathLike) -> list[Query]:
  """JSONL: {"prompt", optional "concept", "id", "seed", "mask"}; a plain line is a prompt."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"queries file {path} does not exist")
  out, seen = [], set()
  try:
    text = path.read_text()
  except UnicodeDecodeError as e:
    raise ValueError(f"queries file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    if line.lstrip().startswith("{"):
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
      row = {"prompt": line.strip()}
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' and optional id, concept, seed, mask")
    unknown = set(row) - {"id", "prompt", "concept", "seed", "mask"}
    if unknown or not isinstance(row.get("prompt"), str) or not row.get("prompt"):
      raise ValueError(f"{path}:{n}: expected 'prompt' and optional id, concept, seed, mask; got {sorted(row)}")
    mask = row.get("mask")
    if mask is not None and not isinstance(mask, str):
      raise ValueError(f"{path}:{n}: mask is {json.dumps(mask)}, expected an image path or 'auto'")
    if mask and mask != "auto" and not Path(mask).is_absolute():
      mask = str(path.parent / mask)
    try:
      q = Query(id=check_id(row.get("id") or f"{n:04d}_{slug(row['prompt'])}", "query"), prompt=row["prompt"],
                concept=str(row.get("concept") or row["prompt"]), seed=check_seed(row.get("seed") or 0), mask=mask)
    except ValueError as e:
      raise ValueError(f"{path}:{n}: {e}") from None
    if q.id in seen:
      raise ValueError(f"{path}:{n}: duplicate query id {q.id!r}")
    seen.add(q.id)
    out.append(q)
  if not out:
    raise ValueError(f"queries file {path} holds no queries")
  return out


def entity_mask_words(entry, ref_prompt: str) -> tuple[tuple[str, ...], str]:
  """The words of `ref_prompt` that name the entity, for mask "auto": those of its title, else of its aliases,
  found in the ref_prompt (not the caption's background: a teapot's tray stays out); with none, () and the
  ref_prompt's own content words are used. Returns (words, where they came from)."""
  from kadiff_jax.kadiff.concept_mask import FRAMING_WORDS
  words = lambda text: re.findall(r"[\w'-]+", text.lower())  # as concept_mask.subject_positions splits words
  in_prompt = set(words(ref_prompt))
  for source, texts in (("title", [entry.title]), ("aliases", list(getattr(entry, "aliases", ()) or ()))):
    found = []
    for w in (w for text in texts for w in words(text)):
      if w in in_prompt and w not in FRAMING_WORDS and w not in found:
        found.append(w)
    if found:
      return tuple(found), source
  return (), "ref_prompt"


def ref_prompt_for(entry) -> tuple[str, str]:
  """(ref_prompt, where it came from) for a chosen corpus entry."""
  if entry.caption.strip():
    return entry.caption.strip(), "caption"
  return f"a photo of {entry.title.strip()}", "title"


@dataclasses.dataclass(frozen=True)
class Decision:
  """What a retrieval decided for one query."""

  record: dict                    # retrieval, weak_match, then the chosen entry or status "no_match" and why
  line: str                       # the decision in one line, for stdout
  entry: Any = None               # the chosen corpus entry; None: no good match, skipped
  ref_prompt: str = ""
  mask_words: tuple[str, ...] = ()  # mask "auto": the entity's words (empty: the options' or the default)


def decide(r, concept: str, *, auto_mask: bool, words_given: bool, min_score: float = MIN_SCORE,
           on_no_match: str = "skip") -> Decision:
  """The reference for a retrieval `r` (retrieval.retriever.Retrieval): skipped when its best dense score is under
  `min_score` (unless on_no_match="top1"), else the chosen entry with its ref_prompt and, for mask "auto" without
  words given, the entity's mask words. One rule for `kadiff run` and `KnowledgeAugmentedPipeline`."""
  if on_no_match not in ("skip", "top1"):
    raise ValueError(f"on_no_match = {on_no_match!r}; expected 'skip' or 'top1'")
  top = r.candidates[0].score
  record: dict[str, Any] = {"concept": concept, "retrieval": r.to_json(), "weak_match": top < min_score}
  if top < min_score and on_no_match == "skip":
    record.update(status="no_match", reason=f"best dense score {top:.3f} is under min_score {min_score}")
    return Decision(record, f"no match for {concept!r} (best {r.candidates[0].entry.title!r} at {top:.3f} "
                            f"< {min_score}); skipped")
  entry = r.chosen.entry
  ref_prompt, source = ref_prompt_for(entry)
  words, words_source = entity_mask_words(entry, ref_prompt) if auto_mask and not words_given else ((), None)
  record.update(chosen={"id": entry.id, "title": entry.title, "image": entry.image, "score": r.chosen.score},
                ref_prompt_source=source, **({"mask_words_source": words_source} if words else {}))
  line = (f"{concept!r} -> {entry.title!r} ({entry.id}, score {r.chosen.score:.3f}"
          + (", weak match" if top < min_score else "")
          + (f", re-ranked from {len(r.candidates)}" if r.decision is not None else "") + ")"
          + (f", mask words {list(words)}" if words else ""))
  return Decision(record, line, entry, ref_prompt, words)


def run(models, adapter, retriever, queries: Sequence[Query], options, out_dir: str | os.PathLike, *,
        k: int = 5, min_score: float = MIN_SCORE, on_no_match: str = "skip", cache_dir: str | Path | None = None,
        baseline: bool = False, batch_size: int | None = None, progress: bool = True,
        overwrite: bool = False) -> dict[str, Any]:
  """Retrieves, generates and records every query; returns counts, and under "decisions" one line per query
  naming the chosen reference (or why none). Finished queries are skipped."""
  from kadiff_jax import sharding
  from kadiff_jax.job import Job
  from kadiff_jax.kadiff import jobs as kjobs

  out = OutputDir(out_dir)
  records: dict[str, dict] = {}
  jobs, decisions = [], []
  for q in queries:
    d = decide(retriever.retrieve(q.concept, k), q.concept, auto_mask=q.mask == kjobs.AUTO_MASK,
               words_given=bool(options.mask_words), min_score=min_score, on_no_match=on_no_match)
    decisions.append(f"{q.id}: {d.line}")
    records[q.id] = d.record
    if d.entry is None:
      d.record.update(id=q.id, prompt=q.prompt, seed=q.seed)
      log.warning("query %r: no good match (%s); skipped", q.concept, d.record["reason"])
      continue
    jobs.append(Job(q.id, q.prompt, q.seed, reference=d.entry.image, ref_prompt=d.ref_prompt, mask=q.mask,
                    mask_words=d.mask_words))
  ran = kjobs.run(models, adapter, jobs, options, out_dir, cache_dir=cache_dir, baseline=baseline,
                  batch_size=batch_size, progress=progress, overwrite=overwrite,
                  extra_fields={j.id: records[j.id] for j in jobs}) if jobs else None
  if sharding.is_writer():
    for q in queries:
      if records[q.id].get("status") != "no_match":
        continue
      if records_lib.read_record(out, q.id) is not None:  # images from an earlier run: keep them and their record
        log.warning("query %s: no good match now, but %s holds its earlier images; left as they are", q.id, out)
        continue
      out.write_text(f"{q.id}.json", json.dumps(records[q.id], indent=1, default=str))
  return {"queries": len(queries), "generated": ran.ran if ran else 0,
          "already_done": len(ran.skipped) if ran else 0, "redone": len(ran.redone) if ran else 0,
          "no_match": sum(r.get("status") == "no_match" for r in records.values()), "decisions": decisions}
