"""Pod-scale output: every process writes the jobs its own devices computed, to a local path or an fsspec URL."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kadiff_jax.outputs import OutputDir


def test_output_dir_writes_whole_files_inside_local_and_fsspec_folders(tmp_path):
  for location in (tmp_path / "plain", f"file://{tmp_path}/url", "memory://kadiff-test/out"):
    out = OutputDir(location)
    out.write_text("a.json", '{"x": 1}')
    out.write_bytes("sub/b.bin", b"\x00\x01")
    assert out.exists("a.json") and out.exists("sub/b.bin") and not out.exists("c.json")
    assert json.loads(out.read_text("a.json")) == {"x": 1}
    for bad in ("../escape.json", "/abs.json", "sub/../../x"):
      with pytest.raises(ValueError, match="outside"):
        out.write_text(bad, "no")
  assert (tmp_path / "url" / "a.json").is_file() and not list((tmp_path / "url").glob(".*tmp*"))


def _jobs(tmp_path: Path, n: int) -> Path:
  refs = []
  for r in range(2):
    rng = np.random.default_rng(r)
    p = tmp_path / f"ref{r}.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(p)
    refs.append(p)
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text("\n".join(json.dumps({"id": f"j{i:02d}", "prompt": f"a thing {i}", "reference": str(refs[i % 2]),
                                        "ref_prompt": "a thing", "seed": i}) for i in range(n)))
  return jobs


def _argv(tiny_dir, jobs, out, cache):
  return ["generate", "--model", str(tiny_dir), "--mode", "kadiff", "--jobs", str(jobs), "--steps", "4",
          "--inject-layers", "up_blocks.*", "--baseline", "--batch-size", "8", "--out", str(out), "--cache-dir",
          str(cache)]


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_generate_to_a_memory_url_writes_what_a_folder_gets(tmp_path, tiny_dir):
  import fsspec
  from kadiff_jax import cli
  jobs = _jobs(tmp_path, 3)
  assert cli.main(_argv(tiny_dir, jobs, tmp_path / "local", tmp_path / "c")) == 0
  assert cli.main(_argv(tiny_dir, jobs, "memory://kadiff-gen/out", tmp_path / "c")) == 0
  fs = fsspec.filesystem("memory")
  names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("/kadiff-gen/out", detail=False))
  assert names == sorted(p.name for p in (tmp_path / "local").iterdir())
  for name in names:
    if name.endswith(".png"):
      assert fs.cat(f"/kadiff-gen/out/{name}") == (tmp_path / "local" / name).read_bytes(), name
  # a rerun sees the URL's finished jobs
  assert cli.main(_argv(tiny_dir, jobs, "memory://kadiff-gen/out", tmp_path / "c")) == 0


def _port() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return str(s.getsockname()[1])


def _pod(argv, n, tmp_path, tag):
  """n processes x 2 CPU devices of one command; returns the Popen objects (logs in tmp_path)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  port = _port()
  return [subprocess.Popen([sys.executable, "-m", "kadiff_jax.cli", "-v", *argv, "--coordinator", f"127.0.0.1:{port}",
                            "--num-processes", str(n), "--process-id", str(i)], env=env,
                           stdout=open(tmp_path / f"{tag}{i}.out", "w"), stderr=open(tmp_path / f"{tag}{i}.err", "w"))
          for i in range(n)]


def _written(tmp_path, tag, i) -> set[str]:
  ids = set()
  for m in re.finditer(r"process \d+ wrote ([\w,]+)", (tmp_path / f"{tag}{i}.err").read_text()):
    ids.update(m.group(1).split(","))
  return ids


@pytest.mark.slow
def test_four_processes_write_their_own_jobs_and_a_rerun_redoes_only_a_lost_process(tmp_path, tiny_dir):
  from kadiff_jax import cli
  jobs = _jobs(tmp_path, 24)  # 3 batches of 8 jobs over 8 devices
  one = tmp_path / "one"
  assert cli.main(_argv(tiny_dir, jobs, one, tmp_path / "c")) == 0
  # 4 processes, run to the end: the same files, each process writing only its own jobs
  pod = tmp_path / "pod"
  procs = _pod(_argv(tiny_dir, jobs, pod, tmp_path / "c"), 4, tmp_path, "a")
  assert [p.wait(timeout=900) for p in procs] == [0] * 4
  assert sorted(p.name for p in pod.iterdir()) == sorted(p.name for p in one.iterdir())
  for p in one.glob("*.png"):
    a, b = (np.asarray(Image.open(d / p.name)).astype(int) for d in (one, pod))
    assert np.abs(a - b).max() <= 1, p.name
  per_process = [_written(tmp_path, "a", i) for i in range(4)]
  assert all(len(w) == 6 for w in per_process), per_process  # 2 jobs per process and batch, none gathered to one
  assert set().union(*per_process) == {f"j{i:02d}" for i in range(24)}
  # kill process 2 as soon as the first image appears; the others finish what needs no collective, then stop
  lost = tmp_path / "lost"
  procs = _pod(_argv(tiny_dir, jobs, lost, tmp_path / "c"), 4, tmp_path, "b")
  deadline = time.time() + 900
  while not list(lost.glob("j*.png")) and time.time() < deadline:
    time.sleep(0.05)
  procs[2].kill()
  time.sleep(20)
  for p in procs:
    p.kill()
    p.wait()
  finished = {p.stem for p in lost.glob("j??.png")}
  missing = {f"j{i:02d}" for i in range(24)} - finished
  assert missing, "process 2 was killed too late to lose anything"
  assert missing & per_process[2]  # jobs are assigned to processes deterministically: process 2's are lost
  procs = _pod(_argv(tiny_dir, jobs, lost, tmp_path / "c"), 4, tmp_path, "c")
  assert [p.wait(timeout=900) for p in procs] == [0] * 4
  redone = set().union(*(_written(tmp_path, "c", i) for i in range(4)))
  assert redone == missing
  for p in one.glob("*.png"):
    a, b = (np.asarray(Image.open(d / p.name)).astype(int) for d in (one, lost))
    assert np.abs(a - b).max() <= 1, p.name
