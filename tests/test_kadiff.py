"""KA-Diff on the tiny model: inversion, injection semantics, cache, masks, determinism."""

from __future__ import annotations

import glob

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from kadiff_jax import image_io
from kadiff_jax.job import Job
from kadiff_jax.kadiff import generate as G
from kadiff_jax.kadiff import reference as R
from kadiff_jax.kadiff.options import KADiffOptions, kadiff_scheduler
from kadiff_jax.models import ip_adapter
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.sampling import CFG
from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
from kadiff_jax.weights.ip_adapter import load_ip_adapter

DREAMBOOTH_DOG = sorted(glob.glob(str(__import__("pathlib").Path(__file__).parents[2] / "shared/data/dreambooth/dog/*")))
OPTS = KADiffOptions(steps=10, inject_layers="up_blocks.*")


@pytest.fixture(scope="module")
def reference_image(tmp_path_factory):
  if DREAMBOOTH_DOG:
    return DREAMBOOTH_DOG[0]
  p = tmp_path_factory.mktemp("ref") / "ref.png"  # shared/ absent: a synthetic stand-in
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80, 3)).astype(np.uint8)).save(p)
  return str(p)


@pytest.fixture(scope="module")
def adapter(tiny_dir, tiny_models):
  return load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config)


@pytest.fixture(scope="module")
def cache(tiny_models, adapter, reference_image):
  return R.prepare_reference(tiny_models, adapter, reference_image, "a dog", OPTS)


def _item(prepared, seed=0, mask=None):
  if mask is None:
    mask = np.zeros((64, 64), bool)
    mask[8:56, 16:60] = True
  noise = np.random.default_rng(seed).standard_normal((8, 8, 4)).astype(np.float32)
  return G.GenerationItem(Job("j", "a dog in the snow", seed, reference=prepared.path, ref_prompt="a dog"),
                          prepared, mask, noise)


def _run(models, adapter, cache, reference_image, opts, mode=None, seed=0, trajectory=False):
  """(latents, images, trajectory) of one job."""
  out = G.run_jobs(models, adapter, [_item(cache, seed)], opts, mode=mode,
                   record=("trajectory",) if trajectory else ())
  return out.latents, out.images, out.aux.get("trajectory")


def test_inversion_step_matches_spec_formula():
  sched = kadiff_scheduler()
  state = sched.set_timesteps(50)
  ac = sched.config.alphas_cumprod().astype(np.float64)
  rng = np.random.default_rng(0)
  z, eps = rng.standard_normal((2, 1, 4, 4, 4))
  for k, t in enumerate(range(0, 1000, 20)):  # inversion visits t = 0, 20, ..., 980
    i = 49 - k
    assert int(state.timesteps[i]) == t
    prev = t - 20
    a_prev = ac[prev] if prev >= 0 else ac[0]  # set_alpha_to_one=False
    want = np.sqrt(ac[t]) * (z - np.sqrt(1 - a_prev) * eps) / np.sqrt(a_prev) + np.sqrt(1 - ac[t]) * eps
    got = sched.invert_step(state, i, jnp.asarray(z, jnp.float32), jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_cache_layout_and_reconstruction(tiny_models, adapter, cache, reference_image):
  s = OPTS.steps
  assert cache.latents.shape == (s + 1, 8, 8, 4) and cache.features.shape == (s, 4, 4, 64)
  np.testing.assert_array_equal(cache.timesteps, np.arange(900, -1, -100))
  # entry S is z0_ref: the VAE mean of the resized reference, scaled
  from kadiff_jax.models import vae
  z0 = vae.encode(tiny_models.vae_params, jnp.asarray(R.reference_pixels(image_io.load_rgb(reference_image), 64))[None],
                  config=tiny_models.vae_config)
  np.testing.assert_allclose(cache.latents[-1], np.asarray(z0)[0], atol=1e-5)


def _reconstruction_error(models, adapter, reference_image, steps):
  """DDIM from the inverted z_T with the inversion's own conditioning (guidance 1) vs z0_ref."""
  opts = KADiffOptions(steps=steps, inversion_guidance=1.0).for_model(models)
  c = R.prepare_reference(models, adapter, reference_image, "a dog", opts)
  cond, ip_rows = R.inversion_conditioning([c], models, opts, R.ip_scale(adapter, opts))
  sched = kadiff_scheduler()
  rec, _ = t2i.denoise(models.unet_params, jnp.asarray(c.latents[:1]), cond, sched.set_timesteps(steps),
                       jnp.float32(1.0), {"ip_adapter": ip_adapter.hook_inputs(adapter, *ip_rows)},
                       unet_config=models.unet_config, scheduler=sched, layout=CFG,
                       hooks=(ip_adapter.IPAdapterAttention(),))
  return np.abs(np.asarray(rec)[0] - c.latents[-1]).max() / np.abs(c.latents[-1]).max()


def test_ref_branch_reconstructs_z0(tiny_models, adapter, reference_image):
  """DDIM inversion is first-order: the replay error shrinks with the step count. Random tiny weights
  make eps rough in t, so it takes more steps than a trained model: for the DreamBooth dog, 200 steps
  replay z0_ref within 0.5 (relative max error; measured 0.33, and 1.7 at 50 steps)."""
  e50 = _reconstruction_error(tiny_models, adapter, reference_image, 50)
  e200 = _reconstruction_error(tiny_models, adapter, reference_image, 200)
  assert e200 < e50 / 2, (e50, e200)
  if DREAMBOOTH_DOG:  # the stated tolerance is for that image; a noise image inverts worse
    assert e200 < 0.5, (e50, e200)


def test_injection_off_is_baseline_and_on_changes_only_after_start(tiny_models, adapter, cache, reference_image):
  base = _run(tiny_models, adapter, cache, reference_image, OPTS, mode="baseline", trajectory=True)
  off = _run(tiny_models, adapter, cache, reference_image, KADiffOptions(steps=10, inject_layers="up_blocks.*",
                                                                         threshold=-np.inf), trajectory=True)
  np.testing.assert_allclose(off[2], base[2], rtol=0, atol=2e-5 * np.abs(base[2]).max())  # 4 rows vs 2: rounding
  with pytest.raises(ValueError, match="inject_layers '999' matches no self-attention layer of this UNet; it has "
                     r"layers 1-11 \(11 in all\), by path: .*up_blocks.0.attentions.0.\*"):
    _run(tiny_models, adapter, cache, reference_image, KADiffOptions(steps=10, inject_layers="999"))
  start = 6
  on = _run(tiny_models, adapter, cache, reference_image,
            KADiffOptions(steps=10, inject_layers="up_blocks.*", inject_steps=(start, 9)), trajectory=True)
  np.testing.assert_allclose(on[2][:start], base[2][:start], rtol=0, atol=2e-5 * np.abs(base[2]).max())  # untouched
  assert np.abs(on[2][start] - base[2][start]).max() > 1e-4
  assert np.abs(on[0] - base[0]).max() > 1e-3
  masa = _run(tiny_models, adapter, cache, reference_image, OPTS, mode="masactrl")
  assert np.abs(masa[0] - base[0]).max() > 1e-3 and np.abs(masa[0] - on[0]).max() > 1e-4


def test_deterministic(tiny_models, adapter, cache, reference_image):
  a = _run(tiny_models, adapter, cache, reference_image, OPTS, seed=3)
  b = _run(tiny_models, adapter, cache, reference_image, OPTS, seed=3)
  np.testing.assert_array_equal(a[1], b[1])


def test_use_init_latents_copies_masked_region(tiny_models, cache):
  mask = np.zeros((64, 64), bool)
  mask[:, :32] = True  # left half
  item = _item(cache, mask=mask)
  out = G.initial_latents([item], True)
  np.testing.assert_array_equal(out[0, :, :4], cache.latents[0][:, :4])
  np.testing.assert_array_equal(out[0, :, 4:], item.noise[:, 4:])
  np.testing.assert_array_equal(G.initial_latents([item], False)[0], item.noise)


def test_cache_round_trip_and_mismatch(tmp_path, tiny_models, adapter, cache, reference_image):
  path = cache.inversion.save(tmp_path / "dog")
  loaded = R.load_inversion(path, expected=cache.inversion.manifest)
  np.testing.assert_array_equal(loaded.features, cache.features)
  other = dict(cache.inversion.manifest, steps=50)
  with pytest.raises(ValueError, match="steps: cache has 10, this run needs 50"):
    R.load_inversion(path, expected=other)


def test_mask_loading_quirk_q2(tmp_path):
  Image.fromarray(np.zeros((10, 20), np.uint8)).save(tmp_path / "m.png")  # wide, all background
  fg = R.load_mask(tmp_path / "m.png", 64)  # padding counts as foreground (the reference's quirk)
  assert fg.shape == (64, 64) and fg[0].all() and fg[-1].all() and not fg[32].any()
  bg = R.load_mask(tmp_path / "m.png", 64, padding="background")
  assert not bg.any()


def test_options_validation():
  with pytest.raises(ValueError, match="inversion_uncond='x'"):
    KADiffOptions(inversion_uncond="x")
  with pytest.raises(ValueError, match="inject_steps=.*steps=10"):
    KADiffOptions(steps=10, inject_steps=(5, 10))
  assert KADiffOptions().step_range() == (19, 49) and KADiffOptions(steps=25).step_range() == (10, 24)


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_cli_jobs_resume_invert_and_bad_input(tmp_path, tiny_dir, reference_image, capsys):
  import json
  from kadiff_jax import cli
  mask = np.zeros((40, 60), np.uint8)
  mask[5:35, 10:50] = 255  # synthetic concept mask (non-square: exercises the Q2 padding)
  Image.fromarray(mask).save(tmp_path / "mask.png")
  jobs = tmp_path / "jobs.jsonl"
  jobs.write_text("\n".join(json.dumps(j) for j in [
      {"id": "snow", "prompt": "a dog in the snow", "reference": reference_image, "ref_prompt": "a dog",
       "mask": "mask.png", "seed": 1},
      {"id": "beach", "prompt": "a dog on the beach", "reference": reference_image, "ref_prompt": "a dog"}]))
  argv = ["generate", "--model", str(tiny_dir), "--mode", "kadiff", "--jobs", str(jobs), "--steps", "6",
          "--inject-layers", "up_blocks.*", "--baseline", "--out", str(tmp_path / "out"), "--cache-dir",
          str(tmp_path / "c")]
  assert cli.main(argv) == 0
  names = sorted(p.name for p in (tmp_path / "out").iterdir())
  assert names == ["beach.json", "beach.png", "beach_baseline.png", "beach_grid.png", "config.yaml", "snow.json",
                   "snow.png", "snow_baseline.png", "snow_grid.png"]
  rec = json.loads((tmp_path / "out" / "snow.json").read_text())
  assert rec["outputs"] == {"ours": "snow.png", "grid": "snow_grid.png", "baseline": "snow_baseline.png"}
  assert rec["inputs"]["options"]["steps"] == 6 and rec["inputs"]["baseline"] and rec["mask"]["source"] == "user"
  meta = image_io.read_png_metadata(tmp_path / "out" / "snow.png")
  assert meta["mode"] == "kadiff" and meta["mask"].endswith("mask.png") and meta["ref_prompt"] == "a dog"
  assert len(list((tmp_path / "c" / "references").glob("*.npz"))) == 1  # one reference, inverted once
  first = np.asarray(Image.open(tmp_path / "out" / "snow.png"))
  (tmp_path / "out" / "beach.png").unlink()  # an interrupted run: only the missing job is redone
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "wrote 1 job(s)" in capsys.readouterr().out
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "snow.png")), first)
  # a changed job is refused (naming it and what changed), then redone alone with --overwrite
  rows = [json.loads(line) for line in jobs.read_text().splitlines()]
  rows[1]["prompt"] = "a dog on the moon"
  jobs.write_text("\n".join(json.dumps(r) for r in rows))
  stamps = {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in ("snow.png", "beach.png", "snow.json")}
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "1 job(s) already have outputs made from other inputs" in err and "beach: prompt:" in err, err
  assert "--overwrite" in err
  assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in stamps} == stamps  # nothing touched
  assert cli.main(argv + ["--overwrite"]) == 0
  printed = capsys.readouterr().out
  assert "wrote 1 job(s)" in printed and "1 of them redone with new inputs" in printed, printed
  assert (tmp_path / "out" / "snow.png").stat().st_mtime_ns == stamps["snow.png"]
  assert json.loads((tmp_path / "out" / "beach.json").read_text())["prompt"] == "a dog on the moon"
  # kadiff invert writes a cache that generate --reference-cache reads (without inverting again)
  assert cli.main(["invert", "--model", str(tiny_dir), "--reference", reference_image, "--ref-prompt", "a dog",
                   "--steps", "6", "--out", str(tmp_path / "inv" / "dog.npz"), "--cache-dir", str(tmp_path / "c")]) == 0
  assert R.load_inversion(tmp_path / "inv" / "dog.npz").latents.shape == (7, 8, 8, 4)
  refs_before = sorted((tmp_path / "c" / "references").glob("*.npz"))
  from_cache = ["generate", "--model", str(tiny_dir), "--mode", "kadiff", "--reference-cache",
                str(tmp_path / "inv" / "dog.npz"), "--prompt", "a dog in the snow", "--seed", "1", "--steps", "6",
                "--inject-layers", "up_blocks.*", "--out", str(tmp_path / "fc"), "--cache-dir",
                str(tmp_path / "c")]
  assert cli.main(from_cache) == 0
  assert sorted((tmp_path / "c" / "references").glob("*.npz")) == refs_before
  jobs_no_mask = [{"id": "nm", "prompt": "a dog in the snow", "reference": reference_image, "ref_prompt": "a dog",
                   "seed": 1}]
  (tmp_path / "nm.jsonl").write_text(json.dumps(jobs_no_mask[0]))
  assert cli.main(argv[:6] + [str(tmp_path / "nm.jsonl")] + argv[7:-5] + ["--out", str(tmp_path / "nm")]
                  + argv[-2:]) == 0
  assert not (tmp_path / "nm" / "nm_baseline.png").exists()  # the baseline only when asked for
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "fc" / "seed1_0000.png")),
                                np.asarray(Image.open(tmp_path / "nm" / "nm.png")))
  assert cli.main(from_cache[:-4] + ["--steps", "4", "--out", str(tmp_path / "fc2"), "--cache-dir",
                                     str(tmp_path / "c")]) == 2
  assert "steps: cache has 6, this run needs 4" in capsys.readouterr().err
  # bad input
  jobs.write_text(json.dumps({"id": "a", "reference": reference_image}) + "\n" + json.dumps({"id": "a", "reference": reference_image}))
  assert cli.main(argv) == 2 and "duplicate job id 'a'" in capsys.readouterr().err
  assert cli.main(["generate", "--model", str(tiny_dir), "--mode", "kadiff", "--prompt", "x", "--out", "o"]) == 2
  assert "needs --reference" in capsys.readouterr().err
  assert cli.main(["generate", "--model", str(tiny_dir), "--mode", "kadiff", "--reference", str(tmp_path / "no.png"),
                   "--out", "o"]) == 2
  assert "does not exist" in capsys.readouterr().err


SHARDED = """
import sys, numpy as np, jax
assert jax.device_count() == 4
from kadiff_jax import sharding
from kadiff_jax.job import Job
from kadiff_jax.weights.models import load_models
from kadiff_jax.weights.ip_adapter import load_ip_adapter
from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
from kadiff_jax.kadiff import generate as G, reference as R
from kadiff_jax.kadiff.options import KADiffOptions
from pathlib import Path
from PIL import Image
d, ref = Path(sys.argv[1]), sys.argv[2]
m = load_models(str(d))
a = load_ip_adapter(d / TINY_IP_ADAPTER, d / TINY_IMAGE_ENCODER, m.unet_config)
o = KADiffOptions(steps=6, inject_layers="up_blocks.*")
flipped = Image.open(ref).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT)
requests = [(ref, "a dog"), (flipped, "a dog"), (ref, "a photo of a dog")]  # 3 references: padded to 4 devices
def run(mesh):
  preps = R.prepare_references(m, a, requests, o, mesh=mesh, batch_size=4)  # inverted together, over the mesh
  prompts = ("a dog in the snow", "a dog on the beach", "a red dog")
  items = [G.GenerationItem(Job(str(i), p, reference=ref), prep, np.ones((64, 64), bool),
                            np.random.default_rng(i).standard_normal((8, 8, 4)).astype(np.float32))
           for i, (p, prep) in enumerate(zip(prompts, preps))]
  return np.stack([p.latents for p in preps]), G.run_jobs(m, a, items, o, mesh=mesh).latents
inv4, z4 = run(sharding.data_mesh())
inv1, z1 = run(sharding.data_mesh(jax.devices()[:1]))
np.savez(sys.argv[3], z4=z4, z1=z1, inv4=inv4, inv1=inv1)
"""


@pytest.mark.slow
def test_kadiff_sharded_over_4_cpu_devices(tmp_path, tiny_dir, reference_image):
  import os, subprocess, sys
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", SHARDED, str(tiny_dir), reference_image, str(tmp_path / "r.npz")],
                 env=env, check=True, timeout=900)
  r = np.load(tmp_path / "r.npz")
  assert r["z4"].shape == (3, 8, 8, 4) and r["inv4"].shape == (3, 7, 8, 8, 4)
  assert np.abs(r["z4"] - r["z1"]).max() / np.abs(r["z1"]).max() < 2e-5  # float rounding only
  assert np.abs(r["inv4"] - r["inv1"]).max() / np.abs(r["inv1"]).max() < 2e-5
  assert np.abs(r["inv4"][0] - r["inv4"][1]).max() > 1e-2  # the flipped reference really is another one


TWO_PROCESS = """
import sys
from kadiff_jax import sharding
sharding.initialize_distributed(f"127.0.0.1:{sys.argv[4]}", 2, int(sys.argv[5]))
import jax
assert jax.process_count() == 2 and jax.device_count() == 4
""" + SHARDED.replace("import sys, numpy as np, jax\n", "import numpy as np\n").replace(
    "inv1, z1 = run(sharding.data_mesh(jax.devices()[:1]))\n", "").replace(
    "np.savez(sys.argv[3], z4=z4, z1=z1, inv4=inv4, inv1=inv1)",
    "if jax.process_index() == 0: np.savez(sys.argv[3], z4=z4, inv4=inv4)")
assert "z1" not in TWO_PROCESS


@pytest.mark.slow
def test_kadiff_two_processes_equal_one(tmp_path, tiny_dir, reference_image):
  """jax.distributed over loopback (gloo): 2 processes x 2 CPU devices give the same images as one process."""
  import os, socket, subprocess, sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  args = [str(tiny_dir), reference_image, str(tmp_path / "two.npz"), port]
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS, *args, str(i)], env=env) for i in range(2)]
  try:
    codes = [p.wait(timeout=400) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert codes == [0, 0]
  env1 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", SHARDED, str(tiny_dir), reference_image, str(tmp_path / "one.npz")],
                 env=env1, check=True, timeout=900)
  two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  assert two["z4"].shape == (3, 8, 8, 4)
  for key in ("z4", "inv4"):  # inversion and generation, each split over both processes
    assert np.abs(two[key] - one[key]).max() / np.abs(one[key]).max() < 2e-5


def test_threshold_and_inject_steps_change_without_recompiling(tiny_models, adapter, cache):
  """Thresholds and injection steps are traced: a second and third run with other values compile nothing."""
  import jax
  compiles = []

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    run = lambda prepared=cache, **kw: G.run_jobs(tiny_models, adapter, [_item(prepared)], KADiffOptions(
        **{"steps": 10, "inject_layers": "up_blocks.*", **kw})).latents
    a = run(threshold=0.7, inject_steps=(3, 9))  # compiles, unless an earlier test already did
    first = len(compiles)
    b = run(threshold=0.3, inject_steps=(5, 8))
    c = run(threshold=0.9)
    again = len(compiles)
    # the counter is live: another step count is another program
    run(R.prepare_reference(tiny_models, adapter, cache.image, "a dog", KADiffOptions(steps=7)), steps=7)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert again == first, (first, again)
  assert len(compiles) > again
  assert np.abs(a - b).max() > 1e-4 and np.abs(a - c).max() > 1e-4  # the values were used


def test_cli_kadiff_without_layer_flag_injects_and_bad_selector_lists_layers(tmp_path, tiny_dir, reference_image,
                                                                            capsys):
  from kadiff_jax import cli
  argv = ["generate", "--model", str(tiny_dir), "--mode", "kadiff", "--reference", reference_image, "--ref-prompt",
          "a dog", "--prompt", "a dog in the snow", "--steps", "6", "--baseline", "--out", str(tmp_path / "o"),
          "--cache-dir", str(tmp_path / "c")]
  assert cli.main(argv) == 0
  ours = np.asarray(Image.open(tmp_path / "o" / "seed0_0000.png")).astype(int)
  base = np.asarray(Image.open(tmp_path / "o" / "seed0_0000_baseline.png")).astype(int)
  assert np.abs(ours - base).max() > 10  # the tiny UNet's default layers (every up-block layer) inject
  assert "inject_layers: up_blocks.*" in (tmp_path / "o" / "config.yaml").read_text()
  capsys.readouterr()
  assert cli.main(argv + ["--inject-layers", "44-70"]) == 2
  err = capsys.readouterr().err
  assert "inject_layers '44-70' matches no self-attention layer of this UNet; it has layers 1-11" in err
  assert "up_blocks.1.attentions.1.*" in err
  assert [line for line in err.strip().splitlines() if not line.startswith("INFO ")] == [err.strip().splitlines()[-1]]
