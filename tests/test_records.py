"""Job records and the resume rule (`kadiff_jax.records`), on an output folder without any model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kadiff_jax import records
from kadiff_jax.outputs import OutputDir


def _inputs(steps=10, prompt="a dog", seed=0):
  return {"model": "m", "options": {"steps": steps, "threshold": 0.7}, "prompt": prompt, "seed": seed}


def _finish(out, job_id, inputs):
  out.write_bytes(f"{job_id}.png", b"png")
  out.write_text(f"{job_id}.json", json.dumps(records.record(job_id, inputs, outputs={"ours": f"{job_id}.png"})))


def test_fingerprint_is_canonical_and_sensitive():
  a = records.fingerprint({"x": 1, "y": {"b": 2, "a": [1, 2]}})
  assert a == records.fingerprint({"y": {"a": [1, 2], "b": 2}, "x": 1})  # key order does not matter
  assert a != records.fingerprint({"x": 1, "y": {"b": 2, "a": [2, 1]}})
  assert records.array_sha256(np.zeros((2, 3), np.float32)) != records.array_sha256(np.zeros((3, 2), np.float32))
  assert records.array_sha256(np.zeros(4, np.float32)) != records.array_sha256(np.zeros(4, np.float64))


def test_resume_skips_matching_refuses_or_redoes_changed(tmp_path):
  out = OutputDir(tmp_path)
  for i, steps in (("a", 10), ("b", 10), ("c", 10)):
    _finish(out, i, _inputs(steps))
  (tmp_path / "d.png").write_bytes(b"half-written job: image but no record")
  new = [_inputs(10), _inputs(12), _inputs(10, prompt="a cat"), _inputs(10)]
  with pytest.raises(records.ChangedOutputs) as e:
    records.plan_resume(out, ["a", "b", "c", "d"], new)
  msg = str(e.value)
  assert "2 job(s)" in msg and "b: options.steps: 10 -> 12" in msg and 'c: prompt: "a dog" -> "a cat"' in msg
  assert "--overwrite" in msg
  plan = records.plan_resume(out, ["a", "b", "c", "d"], new, overwrite=True)
  assert plan.todo == [1, 2, 3] and plan.done == ["a"] and sorted(plan.redo) == ["b", "c"]
  assert "1 job(s) already done" in plan.describe() and "redoing 2" in plan.describe()


def test_resume_redoes_missing_outputs_and_damaged_records(tmp_path):
  out = OutputDir(tmp_path)
  for i in "abc":
    _finish(out, i, _inputs())
  (tmp_path / "a.png").unlink()                     # an output deleted since
  (tmp_path / "b.json").write_text('{"id": "b", ')  # a damaged record
  (tmp_path / "c.json").write_text(json.dumps({"id": "c", "status": "no_match"}))  # a record of no job
  plan = records.plan_resume(out, ["a", "b", "c"], [_inputs()] * 3)
  assert plan.todo == [0, 1, 2] and not plan.done and not plan.redo


def test_changes_reads_nested_and_absent_keys():
  assert records.changes({"o": {"s": 1}, "p": "x"}, {"o": {"s": 2}, "q": 1}) == [
      "o.s: 1 -> 2", 'p: "x" -> "<absent>"', 'q: "<absent>" -> 1']


def test_labelled_row_places_every_tile_in_order():
  """The grid: each tile enlarged (nearest) to one height, left to right, a missing one as a grey panel."""
  from kadiff_jax.image_grid import labelled_row
  colours = [(200, 10, 10), (10, 200, 10), None, (10, 10, 200)]
  tiles = [(f"t{k}", None if c is None else np.full((64, 64, 3), c, np.uint8)) for k, c in enumerate(colours)]
  row = labelled_row(tiles, "a caption long enough to be drawn under the row")
  assert row.dtype == np.uint8 and row.shape[1] == 4 * 256 + 5 * 4
  xs = []
  for c in [c for c in colours if c is not None] + [(200, 200, 200)]:
    hit = np.all(row == c, axis=-1)
    _, x = np.nonzero(hit)
    assert hit.sum() >= 250 * 250, c  # a whole 256-pixel panel of it (text may cover a few pixels of grey)
    xs.append(x.min())
  red, green, blue, grey = xs
  assert red < green < grey < blue  # reference order kept, the missing tile in its own column
  assert (row[-3:] == 255).all()  # white margin under the caption
