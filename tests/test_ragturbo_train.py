"""Training RAG-Turbo's H-space adapter: the discriminator's teacher-encoder features against diffusers, spectral
norm against an SVD, LoRA's identity at init; from the CLI (slow): losses written and plotted, 2N steps equal N +
kill + N, refusals of another model, another config and a damaged checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from conftest import max_rel_err, nchw
from kadiff_jax import cli
from kadiff_jax.models import unet
from kadiff_jax.pipelines import conditioning
from kadiff_jax.ragturbo import adapter_file, database, discriminator, lora, train
from kadiff_jax.tiny_model import make_tiny_model
from kadiff_jax.weights.models import load_models
from retrieval.dreambooth import dreambooth_corpus

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
SIZE = 128


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return make_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny-sd21", 0, "sd21")


def test_discriminator_features_are_diffusers_down_and_mid_outputs(teacher_dir):
  from diffusers import UNet2DConditionModel
  teacher = load_models(str(teacher_dir))
  ref = UNet2DConditionModel.from_pretrained(str(teacher_dir / "unet"))
  names = discriminator.stage_names(teacher.unet_config)
  assert names == ("down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block")
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  s = np.array([10.0, 700.0], np.float32)
  embeds = np.asarray(conditioning.encode_prompts(teacher, ["a cat", "a red chair"]).embeds)
  ours = unet.encoder_features(teacher.unet_params, x, s, unet.UNetCond(embeds), names, config=teacher.unet_config)
  got = {}

  def keeper(name):
    def hook(module, inputs, output):  # returns None: the module's output stays as it is
      got[name] = (output[0] if isinstance(output, tuple) else output).detach().numpy()
    return hook
  hooks = [ref.down_blocks[i].register_forward_hook(keeper(f"down_blocks.{i}")) for i in range(4)]
  hooks.append(ref.mid_block.register_forward_hook(keeper("mid_block")))
  with torch.no_grad():
    ref(torch.tensor(nchw(x)), torch.tensor(s), encoder_hidden_states=torch.tensor(embeds))
  for h in hooks:
    h.remove()
  for n in names:
    assert max_rel_err(nchw(ours[n]), got[n]) < 1e-4, n
  # heads: one score per sample and stage, and the spectral norm's σ converges to the largest singular value
  params, state = discriminator.init(teacher.unet_config, 32, jax.random.PRNGKey(0))
  out, _ = discriminator.apply(params, state, teacher.unet_params, x, s, unet.UNetCond(embeds), np.ones((2, 32)),
                               config=teacher.unet_config, update=True)
  assert set(out) == set(names) and all(v.shape == (2,) for v in out.values())
  kernel = params["mid_block"]["conv1"]["kernel"]
  u = state["mid_block"]["conv1"]
  for _ in range(100):
    normed, u = discriminator.spectral_normalize(kernel, u, True)
  top = np.linalg.svd(np.asarray(kernel).reshape(-1, kernel.shape[-1]), compute_uv=False)[0]
  np.testing.assert_allclose(np.asarray(kernel / normed).reshape(-1)[0], top, rtol=1e-3)


def test_untrained_lora_is_the_identity_and_targets_the_decoder(teacher_dir):
  teacher = load_models(str(teacher_dir))
  lo = lora.init(teacher.unet_params, jax.random.PRNGKey(0), 4)
  assert lo and all(p.startswith("up_blocks_") for p in lo)
  assert any(p.endswith("attn2/to_k/kernel") for p in lo) and any(p.endswith("ff/net_2/kernel") for p in lo)
  merged = lora.merge(teacher.unet_params, lo)
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(teacher.unet_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lo2 = jax.tree_util.tree_map(lambda a: a + 0.1, lo)
  changed = lora.merge(teacher.unet_params, lo2)
  path = sorted(lo)[0]
  a, b = lo2[path]["a"], lo2[path]["b"]
  keys = path.split("/")
  base, new = teacher.unet_params, changed
  for k in keys:
    base, new = base[k], new[k]
  np.testing.assert_allclose(np.asarray(new), np.asarray(base) + np.asarray(a @ b), rtol=1e-5, atol=1e-6)


def _random_latent_lpips(path):
  """Random E-LatentLPIPS weights in the release's state-dict names (safetensors)."""
  from safetensors.numpy import save_file
  from kadiff_jax.metrics import latent_lpips
  rng = np.random.default_rng(0)
  state, cin = {}, 4
  for i, cout in latent_lpips.CONVS:
    n = next(k for k, (lo, hi) in enumerate(latent_lpips.SLICES, 1) if lo <= i <= hi)
    state[f"net.slice{n}.{i}.weight"] = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) / np.sqrt(9 * cin)
    state[f"net.slice{n}.{i}.bias"] = np.zeros(cout, np.float32)
    for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
      state[f"net.slice{n}.{i + 1}.{name}"] = np.full(cout, value, np.float32)
    cin = cout
  for k, c in enumerate(latent_lpips.CHANNELS):
    state[f"lin{k}.model.1.weight"] = rng.random((1, c, 1, 1)).astype(np.float32)
  save_file(state, str(path))
  return path


def _kadiff(*argv):
  return cli.main([str(a) for a in argv])


@pytest.mark.slow
def test_train_from_the_cli_resumes_exactly_and_refuses_other_runs(teacher_dir, tmp_path, capsys):
  student_dir = make_tiny_model(tmp_path / "tiny-sd-turbo", 0, "sd-turbo")
  student = load_models(str(student_dir))
  entries = [e for e in dreambooth_corpus(SHARED) if e.id in ("backpack", "bear_plushie", "candle", "dog2")]
  db_dir = tmp_path / "db"
  database.HSpaceDatabase.build(entries, student, size=SIZE).save(db_dir)
  lpips_file = _random_latent_lpips(tmp_path / "elpips.safetensors")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a teddy bear on a rock\na red backpack\na candle in a jar\n")
  common = ["train", "hspace-adapter", "--model", student_dir, "--teacher", teacher_dir, "--database", db_dir,
            "--prompts", prompts, "--images", SHARED, "--teacher-steps", 2, "--size", SIZE, "--batch-size", 2,
            "--lora-rank", 4, "--lr", 1e-3, "--checkpoint-every", 2, "--keep", 2, "--latent-lpips", lpips_file]
  # 2N steps in one go
  assert _kadiff(*common, "--steps", 6, "--out", tmp_path / "a") == 0
  # N steps, killed (the API's stop_after stands in for the kill), then resumed from the CLI to 2N
  db = database.HSpaceDatabase.load(db_dir, student)
  teacher = load_models(str(teacher_dir))
  opts = train.TrainOptions(steps=6, batch_size=2, lora_rank=4, lr=1e-3, checkpoint_every=2, keep=2, size=SIZE,
                            teacher_steps=2)
  real = dreambooth_corpus(SHARED)
  train.train(student, teacher, db, tmp_path / "b", opts, prompts=train.read_prompts(prompts), real_entries=real,
              latent_lpips=str(lpips_file), progress=False, stop_after=3)
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["2", "3"]
  assert _kadiff(*common, "--steps", 6, "--out", tmp_path / "b") == 0
  pa, _, la = adapter_file.load(tmp_path / "a" / "adapter.safetensors", student.unet_config)
  pb, _, lb = adapter_file.load(tmp_path / "b" / "adapter.safetensors", student.unet_config)
  for x, y in zip(jax.tree_util.tree_leaves((pa, la)), jax.tree_util.tree_leaves((pb, lb))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  fresh = adapter_file.load(tmp_path / "a" / "adapter.safetensors", student.unet_config)[2]
  assert any(np.abs(v["b"]).max() > 0 for v in fresh.values())  # the LoRA trained
  rows = (tmp_path / "b" / "log.csv").read_text().splitlines()
  assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3", "4", "5", "6"]
  header = rows[0].split(",")
  assert all(float(r.split(",")[header.index("lpips")]) > 0 for r in rows[1:])  # the latent LPIPS term is on
  assert len(list((tmp_path / "a" / "checkpoints").iterdir())) == 2  # keep 2
  assert (tmp_path / "a" / "losses.png").stat().st_size > 1000
  # the trained adapter generates (its LoRA folded into the student)
  assert _kadiff("generate", "--model", student_dir, "--mode", "rag-turbo", "--database", db_dir, "--hspace",
                 f"adapter:{tmp_path / 'a' / 'adapter.safetensors'}", "--prompt", "a teddy bear", "--height", SIZE,
                 "--width", SIZE, "--out", tmp_path / "gen") == 0
  rec = json.loads((tmp_path / "gen" / "seed0_0000.json").read_text())
  assert rec["inputs"]["injection"].startswith("adapter:") and rec["inputs"]["adapter_sha256"]

  def fails(*argv, says):
    capsys.readouterr()
    assert _kadiff(*argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kadiff: error")]
    assert len(errors) == 1 and says in errors[0], errors

  fails(*[v if v != 4 else 8 for v in common], "--steps", 8, "--out", tmp_path / "a", says="options.lora_rank: 4 -> 8")
  other = make_tiny_model(tmp_path / "other", 1, "sd-turbo")
  db_other = tmp_path / "db-other"
  database.HSpaceDatabase.build(entries, load_models(str(other)), size=SIZE).save(db_other)
  swapped = [other if v == student_dir else db_other if v == db_dir else v for v in common]
  fails(*swapped, "--steps", 8, "--out", tmp_path / "a", says="student.fingerprint")
  newest = tmp_path / "a" / "checkpoints" / "6"
  for f in newest.rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b"\0" * f.stat().st_size)
  fails(*common, "--steps", 8, "--out", tmp_path / "a", says="cannot be restored")
  shutil.rmtree(newest)  # the way out the message names: the run resumes from the checkpoint before
  assert _kadiff(*common, "--steps", 5, "--out", tmp_path / "a") == 0


@pytest.mark.slow
def test_four_devices_equal_one(teacher_dir, tmp_path):
  """The database's features, RAG-Turbo images and two training steps, data-parallel over 4 CPU devices, equal one
  device's up to float rounding."""
  import os
  import subprocess
  import sys
  import textwrap
  student_dir = make_tiny_model(tmp_path / "tiny-sd-turbo", 0, "sd-turbo")
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from pathlib import Path
      from kadiff_jax import sharding
      from kadiff_jax.job import Job
      from kadiff_jax.pipelines.text_to_image import GenerationOptions
      from kadiff_jax.ragturbo import database, pipeline, train
      from kadiff_jax.weights.models import load_models
      from retrieval.dreambooth import dreambooth_corpus

      def go(tag, mesh):
        student, teacher = load_models({str(student_dir)!r}), load_models({str(teacher_dir)!r})
        entries = [e for e in dreambooth_corpus({str(SHARED)!r})][:8]
        db = database.HSpaceDatabase.build(entries, student, size={SIZE}, batch_size=8)
        jobs = [Job.numbered(p, 0, i) for i, p in enumerate(["a bear", "a red bag", "a candle", "a dog"])]
        lat, _, _ = pipeline.generate(student, jobs, GenerationOptions(height={SIZE}, width={SIZE}),
                                      pipeline.RagTurboOptions(k=2, hspace="adapter:init", w=0.7), db,
                                      progress=False, mesh=mesh)
        lat2, _, _ = pipeline.generate(student, jobs, GenerationOptions(height={SIZE}, width={SIZE}),
                                       pipeline.RagTurboOptions(k=2, w=0.7), db, progress=False, mesh=mesh)
        opts = train.TrainOptions(steps=2, batch_size=4, lora_rank=2, lr=1e-3, size={SIZE}, teacher_steps=1)
        out = train.train(student, teacher, db, Path({str(tmp_path)!r}) / tag, opts,
                          prompts=["a bear", "a bag", "a candle", "a dog"], progress=False, mesh=mesh)
        params = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(
            __import__("kadiff_jax.ragturbo.adapter_file", fromlist=["load"]).load(out["adapter"],
                                                                             student.unet_config)[::2])])
        np.savez(Path({str(tmp_path)!r}) / f"{{tag}}.npz", features=db.features, latents=lat2, params=params)

      import sys
      if sys.argv[1] == "4":
        assert len(jax.devices()) == 4
        go("four", sharding.data_mesh())
      else:
        go("one", sharding.data_mesh(jax.devices()[:1]))
  """)
  env4 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  for n, env in (("4", env4), ("1", dict(os.environ))):
    res = subprocess.run([sys.executable, "-c", script, n], capture_output=True, text=True, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
  four, one = np.load(tmp_path / "four.npz"), np.load(tmp_path / "one.npz")
  assert max_rel_err(four["features"], one["features"]) < 1e-4  # 2 vs 8 rows per matmul: rounding only
  assert max_rel_err(four["latents"], one["latents"]) < 5e-4
  assert max_rel_err(four["params"], one["params"]) < 1e-3
