"""What made an output: a per-job JSON record with a fingerprint, and the resume rule built on it.

Every finished job leaves `{id}.json` beside its images, written after them.
Its `inputs` hold everything that decides the pixels (model and adapter,
resolved options, prompt, seed and noise index, the reference's and mask's
content as sha256, init latents, which images were asked for), and
`fingerprint` is the sha256 of their canonical JSON. Paths are not inputs:
a reference moved but unchanged is the same job.

A rerun (`plan_resume`) skips a job whose record has the same fingerprint
and whose listed outputs all exist, runs a job with no readable record
(never finished) or a missing output, and for a job whose
inputs changed either refuses, naming what changed, or with `overwrite`
redoes it. Nothing is overwritten unless asked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import numpy as np


def image_sha256(image) -> str:
  """sha256 of an image's pixels as read (PIL or array): the content key of references everywhere."""
  return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def array_sha256(a) -> str:
  a = np.ascontiguousarray(a)
  return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def canonical(value: Any) -> str:
  return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(inputs: dict) -> str:
  return hashlib.sha256(canonical(inputs).encode()).hexdigest()


def record(job_id: str, inputs: dict, **fields) -> dict:
  """A finished job's record: its id, its inputs and their fingerprint, and whatever else is worth keeping."""
  from kadiff_jax import __version__
  return {"id": job_id, "status": "done", **fields, "inputs": inputs, "fingerprint": fingerprint(inputs),
          "kadiff_jax_version": __version__}


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Human-readable differences between two inputs dicts, e.g. ["options.steps: 10 -> 12"]."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += changes(a, b, f"{prefix}{key}.")
    elif canonical(a) != canonical(b):
      show = lambda v: (v[:12] + "...") if isinstance(v, str) and len(v) == 64 else json.dumps(v, default=str)
      out.append(f"{prefix}{key}: {show(a)} -> {show(b)}")
  return out


class ChangedOutputs(ValueError):
  """Outputs exist for some jobs, made from other inputs, and overwriting was not asked for."""


@dataclasses.dataclass
class ResumePlan:
  todo: list[int]                  # indices of the jobs to run
  done: list[str]                  # ids whose outputs match their inputs (skipped)
  redo: dict[str, list[str]]       # ids redone because their inputs changed -> what changed

  def describe(self) -> str:
    parts = [f"{len(self.done)} job(s) already done"] if self.done else []
    if self.redo:
      parts.append(f"redoing {len(self.redo)} whose inputs changed: " + "; ".join(
          f"{i} ({', '.join(c[:3])}{', ...' if len(c) > 3 else ''})" for i, c in list(self.redo.items())[:5])
          + (" ..." if len(self.redo) > 5 else ""))
    return ", ".join(parts)


def read_record(out, job_id: str) -> dict | None:
  """`{id}.json` from an OutputDir, or None where it is missing, damaged, or not a finished job's record."""
  if not out.exists(f"{job_id}.json"):
    return None
  try:
    rec = json.loads(out.read_text(f"{job_id}.json"))
  except (ValueError, UnicodeDecodeError, OSError):
    return None
  return rec if isinstance(rec, dict) and isinstance(rec.get("inputs"), dict) and "fingerprint" in rec else None


def plan_resume(out, ids: Sequence[str], inputs: Sequence[dict], *, overwrite: bool = False) -> ResumePlan:
  """Which jobs to run in `out` (an OutputDir): see the module docstring. Raises ChangedOutputs naming each
  job whose inputs changed, unless `overwrite`."""
  plan = ResumePlan([], [], {})
  for n, (job_id, new) in enumerate(zip(ids, inputs)):
    old = read_record(out, job_id)
    outputs = old.get("outputs") if old is not None else None
    if old is None or (isinstance(outputs, dict) and not all(out.exists(str(f)) for f in outputs.values())):
      plan.todo.append(n)  # never finished, or an output has since been deleted
    elif old["fingerprint"] == fingerprint(new):
      plan.done.append(job_id)
    else:
      plan.redo[job_id] = changes(old["inputs"], new) or ["fingerprint"]
      plan.todo.append(n)
  if plan.redo and not overwrite:
    shown = "; ".join(f"{i}: {', '.join(c[:3])}" for i, c in list(plan.redo.items())[:3])
    more = f" (and {len(plan.redo) - 3} more)" if len(plan.redo) > 3 else ""
    raise ChangedOutputs(f"{out}: {len(plan.redo)} job(s) already have outputs made from other inputs ({shown}"
                         f"{more}); pass --overwrite to redo them, or choose another output folder")
  return plan

