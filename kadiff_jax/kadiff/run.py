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

from kadiff_jax.job import check_seed
from kadiff_jax.outputs import OutputDir, check_id

log = logging.getLogger(__name__)


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


def ref_prompt_for(entry) -> tuple[str, str]:
  """(ref_prompt, where it came from) for a chosen corpus entry."""
  if entry.caption.strip():
    return entry.caption.strip(), "caption"
  return f"a photo of {entry.title.strip()}", "title"


def run(models, adapter, retriever, queries: Sequence[Query], options, out_dir: str | os.PathLike, *,
        k: int = 5, min_score: float = 0.2, on_no_match: str = "skip", cache_dir: str | Path | None = None,
        baseline: bool = False, batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Retrieves, generates and records every query; returns counts. Finished queries are skipped."""
  from kadiff_jax import sharding
  from kadiff_jax.job import Job
  from kadiff_jax.kadiff import jobs as kjobs

  if on_no_match not in ("skip", "top1"):
    raise ValueError(f"on_no_match = {on_no_match!r}; expected 'skip' or 'top1'")
  out = OutputDir(out_dir)
  records: dict[str, dict] = {}
  jobs = []
  for q in queries:
    r = retriever.retrieve(q.concept, k)
    record: dict[str, Any] = {"id": q.id, "prompt": q.prompt, "concept": q.concept, "seed": q.seed,
                              "retrieval": r.to_json()}
    top = r.candidates[0].score
    if top < min_score and on_no_match == "skip":
      record["status"] = "no_match"
      record["reason"] = f"best dense score {top:.3f} is under min_score {min_score}"
      log.warning("query %r: no good match (%s); skipped", q.concept, record["reason"])
      records[q.id] = record
      continue
    entry = r.chosen.entry
    ref_prompt, source = ref_prompt_for(entry)
    record.update(status="done", weak_match=top < min_score,
                  chosen={"id": entry.id, "title": entry.title, "image": entry.image, "score": r.chosen.score},
                  ref_prompt=ref_prompt, ref_prompt_source=source,
                  mask=({"source": "auto"} if q.mask == kjobs.AUTO_MASK else {"source": "user", "path": q.mask})
                  if q.mask else {"source": "none"},
                  outputs={"ours": f"{q.id}.png", "grid": f"{q.id}_grid.png",
                           **({"baseline": f"{q.id}_baseline.png"} if baseline else {})})
    records[q.id] = record
    jobs.append(Job(q.id, q.prompt, q.seed, reference=entry.image, ref_prompt=ref_prompt, mask=q.mask))
  done = kjobs.run(models, adapter, jobs, options, out_dir, cache_dir=cache_dir, baseline=baseline,
                   batch_size=batch_size, progress=progress) if jobs else {}
  if sharding.is_writer():
    resolved = dataclasses.asdict(options.for_model(models))
    for q in queries:
      rec = records[q.id]
      if rec["status"] == "done":
        if q.id in done:
          rec["mask"] = done[q.id]["mask"]
        elif out.exists(f"{q.id}.json"):  # resumed: keep what the finished run recorded
          rec["mask"] = json.loads(out.read_text(f"{q.id}.json")).get("mask", rec["mask"])
        if rec["mask"]["source"] == "auto":
          rec["outputs"]["mask"] = f"{q.id}_mask.png"
        rec.update(options=resolved, model=str(models.source), ip_adapter=str(adapter.source))
      out.write_text(f"{q.id}.json", json.dumps(rec, indent=1, default=str))
  return {"queries": len(queries), "generated": len(done), "already_done": len(jobs) - len(done),
          "no_match": sum(r["status"] == "no_match" for r in records.values())}
