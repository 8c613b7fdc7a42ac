"""End-to-end tiny SDXL vs diffusers' StableDiffusionXLPipeline, PNG output, the CLI, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from conftest import nchw, nhwc
from kadiff_jax import cli, image_io
from kadiff_jax.job import Job
from kadiff_jax.pipelines import text_to_image as t2i

PROMPTS = ["a photo of a cat", "a dog in the snow"]


@pytest.mark.parametrize("scheduler,negative,guidance", [("euler", None, 5.0), ("ddim", "blurry, lowres", 7.5),
                                                         ("euler", "ignored", 1.0)])
def test_tiny_sdxl_matches_diffusers(tiny_models, torch_pipe, scheduler, negative, guidance):
  noise = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  opts = t2i.GenerationOptions(steps=6, guidance=guidance, scheduler=scheduler)
  jobs = [Job.numbered(p, 0, i, negative_prompt=negative) for i, p in enumerate(PROMPTS)]
  latents, images = t2i.generate(tiny_models, jobs, opts, init_latents=nhwc(noise), progress=False)
  cls = EulerDiscreteScheduler if scheduler == "euler" else DDIMScheduler
  torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config)
  kw = dict(num_inference_steps=6, guidance_scale=guidance, latents=torch.tensor(noise))
  neg = None if negative is None else [negative] * 2
  ref = torch_pipe(PROMPTS, negative_prompt=neg, output_type="latent", **kw).images.numpy()
  assert np.abs(nchw(latents) - ref).max() < 1e-3
  ref_img = torch_pipe(PROMPTS, negative_prompt=neg, output_type="np", **kw).images
  assert np.abs(images.astype(int) - (ref_img * 255).round().astype(int)).max() <= 1


def test_initial_noise_is_normal_of_the_folded_key():
  """The one-program noise equals jax.random.normal(fold_in(PRNGKey(seed), i)) bit for bit, across the seed range."""
  import jax
  for seed in (0, 7, 2**31 + 5, 2**32 - 1):
    for indices in ([0], [3, 1], [0, 1, 2]):
      want = np.stack([np.asarray(jax.random.normal(t2i.image_key(seed, i), (8, 8, 4))) for i in indices])
      np.testing.assert_array_equal(np.asarray(t2i.initial_noise(seed, indices, (8, 8, 4))), want)


def test_generate_cli_writes_pngs_with_metadata(tmp_path, tiny_dir):
  out = tmp_path / "out"
  rc = cli.main(["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--out", str(out), "--steps", "3",
                 "--num-images", "2", "--seed", "7"])
  assert rc == 0
  assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "seed7_0000.json", "seed7_0000.png",
                                                   "seed7_0001.json", "seed7_0001.png"]
  rec = json.loads((out / "seed7_0001.json").read_text())
  assert rec["inputs"]["options"]["steps"] == 3 and rec["inputs"]["index"] == 1 and rec["outputs"] == {
      "image": "seed7_0001.png"}
  names = ["seed7_0000.png", "seed7_0001.png"]
  meta = image_io.read_png_metadata(out / names[1])
  assert meta["prompt"] == "a cat" and meta["seed"] == "7" and meta["index"] == "1"
  assert json.loads(meta["kadiff"])["steps"] == 3
  a, b = (np.asarray(__import__("PIL.Image").Image.open(out / n)) for n in names)
  assert a.shape == (64, 64, 3) and not np.array_equal(a, b)  # different noise per index
  # reproducible: the same command gives bit-identical images
  rc = cli.main(["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--out", str(tmp_path / "again"),
                 "--steps", "3", "--num-images", "2", "--seed", "7"])
  for n in names:
    np.testing.assert_array_equal(np.asarray(__import__("PIL.Image").Image.open(tmp_path / "again" / n)),
                                  np.asarray(__import__("PIL.Image").Image.open(out / n)))
  # image 0 made alone uses the same noise; only float rounding of the batch-2 GEMMs differs
  rc = cli.main(["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--out", str(tmp_path / "alone"),
                 "--steps", "3", "--seed", "7"])
  alone = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "alone" / names[0])).astype(int)
  assert np.abs(alone - a).max() <= 1 and (alone != a).mean() < 0.01


def test_generate_cli_resume_follows_the_records(tmp_path, tiny_dir, capsys):
  """Plain generate follows the jobs-file rule: matching outputs are skipped, changed ones refused or redone."""
  argv = ["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--out", str(tmp_path / "o"), "--steps", "3",
          "--num-images", "2", "--seed", "7"]
  assert cli.main(argv) == 0
  stamp = (tmp_path / "o" / "seed7_0000.png").stat().st_mtime_ns
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "wrote 0 job(s)" in capsys.readouterr().out and \
      (tmp_path / "o" / "seed7_0000.png").stat().st_mtime_ns == stamp
  assert cli.main(argv + ["--num-images", "3"]) == 0  # one more image: only it is made
  assert "wrote 1 job(s)" in capsys.readouterr().out
  dog = ["a dog" if a == "a cat" else a for a in argv]
  assert cli.main(dog) == 2
  err = capsys.readouterr().err
  assert "2 job(s) already have outputs made from other inputs" in err and 'prompt: "a cat" -> "a dog"' in err
  assert (tmp_path / "o" / "seed7_0000.png").stat().st_mtime_ns == stamp
  assert cli.main(dog + ["--overwrite"]) == 0
  assert "2 of them redone" in capsys.readouterr().out
  assert json.loads((tmp_path / "o" / "seed7_0001.json").read_text())["prompt"] == "a dog"


@pytest.mark.parametrize("argv,message", [
    (["--height", "60"], "height=60: expected a positive multiple of 8"),
    (["--scheduler", "dpm"], "scheduler='dpm': expected one of ['ddim', 'euler', 'euler_ancestral']"),
    (["--dtype", "fp8"], "dtype='fp8': expected one of"),
    (["--init-latents", "BAD"], "--init-latents"),
])
def test_cli_bad_input_gives_one_clear_error(tmp_path, tiny_dir, capsys, argv, message):
  if "BAD" in argv:
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 4, 8, 8), np.float32))  # 2 latents for 1 image
    argv = ["--init-latents", str(bad)]
  rc = cli.main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--out", str(tmp_path / "o"), *argv])
  err = capsys.readouterr().err
  assert rc == 2 and message in err and "Traceback" not in err


def test_cli_missing_subfolder(tmp_path, tiny_dir, capsys):
  import shutil
  broken = tmp_path / "m"
  shutil.copytree(tiny_dir, broken)
  shutil.rmtree(broken / "tokenizer_2")
  rc = cli.main(["generate", "--model", str(broken), "--prompt", "x", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert rc == 2 and "no subfolder 'tokenizer_2'" in err and "Traceback" not in err


def test_init_latents_file_reproduces(tmp_path, tiny_models, tiny_dir):
  noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
  np.save(tmp_path / "z.npy", noise)
  assert cli.main(["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--out", str(tmp_path / "o"),
                   "--steps", "3", "--init-latents", str(tmp_path / "z.npy")]) == 0
  _, imgs = t2i.generate(tiny_models, [Job.numbered("a cat", 0, 0)], t2i.GenerationOptions(steps=3),
                         init_latents=nhwc(noise), progress=False)
  png = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "o" / "seed0_0000.png"))
  np.testing.assert_array_equal(png, imgs[0])


SHARDED = textwrap.dedent("""
    import sys, numpy as np, jax
    assert jax.device_count() == 4, jax.devices()
    from kadiff_jax import sharding
    from kadiff_jax.weights.models import load_models
    from kadiff_jax.pipelines import text_to_image as t2i
    m = load_models(sys.argv[1])
    from kadiff_jax.job import Job
    jobs = [Job.numbered(p, 11, i) for i, p in enumerate(["a cat", "a dog", "a red car"])]  # 3: padded to 4
    opts = t2i.GenerationOptions(steps=3)
    lat4, img4 = t2i.generate(m, jobs, opts, mesh=sharding.data_mesh(), progress=False)
    one = sharding.data_mesh(jax.devices()[:1])
    lat1, img1 = t2i.generate(m, jobs, opts, mesh=one, progress=False)
    # one device running the same per-device batch (1 image) as each of the 4 shards
    lat1b, img1b = t2i.generate(m, jobs, opts, mesh=one, batch_size=1, progress=False)
    np.savez(sys.argv[2], lat4=lat4, lat1=lat1, img4=img4, img1=img1, lat1b=lat1b, img1b=img1b)
""")


@pytest.mark.slow
def test_sharded_over_4_cpu_devices_equals_single_device(tmp_path, tiny_dir):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "r.npz"
  subprocess.run([sys.executable, "-c", SHARDED, str(tiny_dir), str(out)], env=env, check=True, timeout=600)
  r = np.load(out)
  assert r["lat4"].shape == (3, 8, 8, 4)
  # XLA compiles the partitioned program differently from the one-device one, so results
  # agree to float rounding (a few 1e-6 relative), not bit for bit; an indexing or noise
  # bug would show as O(1) differences.
  for lat, img in ((r["lat1"], r["img1"]), (r["lat1b"], r["img1b"])):
    assert np.abs(r["lat4"] - lat).max() / np.abs(lat).max() < 2e-5
    assert np.abs(r["img4"].astype(int) - img).max() <= 1


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_second_cli_run_loads_its_programs_from_the_persistent_cache(tmp_path, tiny_dir):
  """The CLI keeps JAX's compilation cache under $KADIFF_CACHE/xla and the big programs' executables under
  $KADIFF_CACHE/programs: a second process running the same shapes compiles nothing; KADIFF_COMPILE_CACHE=off and
  KADIFF_PROGRAM_CACHE=off turn them off."""
  env = {**os.environ, "KADIFF_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  argv = [sys.executable, "-m", "kadiff_jax.cli", "-v", "generate", "--model", str(tiny_dir), "--prompt", "a cat",
          "--steps", "2"]

  def programs(out, **extra):
    """(compiled, loaded from the compilation cache, loaded from the program cache)"""
    run = subprocess.run(argv + ["--out", str(tmp_path / out)], env={**env, **extra}, capture_output=True,
                         text=True, timeout=300, check=True)
    line = next(l for l in run.stderr.splitlines() if "XLA programs:" in l)
    return (int(line.split("XLA programs: ")[1].split(" compiled")[0]),
            int(line.split(", ")[1].split(" loaded")[0]), int(line.split("), ")[1].split(" from the program")[0]))

  first = programs("a")
  assert first[0] > 0 and first[1:] == (0, 0) and any((tmp_path / "cache" / "xla").iterdir())
  second = programs("b")
  assert second[0] == 0 and second[2] > 0 and second[1] + second[2] == first[0]
  assert programs("c", KADIFF_COMPILE_CACHE="off") == (second[1], 0, second[2])
  assert programs("d", KADIFF_COMPILE_CACHE="off", KADIFF_PROGRAM_CACHE="off") == (first[0], 0, 0)
  np.testing.assert_array_equal(np.asarray(__import__("PIL.Image").Image.open(tmp_path / "a" / "seed0_0000.png")),
                                np.asarray(__import__("PIL.Image").Image.open(tmp_path / "b" / "seed0_0000.png")))
