"""RAG-Turbo (ImageRAGTurbo) on the tiny SD-Turbo model: the UNet's encoder half, the text key and the H-space
database against diffusers/transformers; slerp and adapter injection against a torch transcription of Eqs. 3-5
run through a forward hook on diffusers' `mid_block`; identity cases; the CLI and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from conftest import max_rel_err, nchw, nhwc
from kadiff_jax import cli, image_io
from kadiff_jax.job import Job
from kadiff_jax.models import hspace_adapter, unet
from kadiff_jax.pipelines import conditioning
from kadiff_jax.pipelines import text_to_image as t2i
from kadiff_jax.ragturbo import adapter_file, database, pipeline
from kadiff_jax.ragturbo.text_key import ModelTextKey
from kadiff_jax.tiny_model import make_tiny_model
from kadiff_jax.weights import convert
from kadiff_jax.weights.models import load_models
from retrieval.dreambooth import dreambooth_corpus

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth"
SIZE = 128  # 16 x 16 latents: a 2 x 2 H-space map on the tiny 4-level UNet
PROMPTS = ["a teddy bear on a rock", "a red backpack on a chair"]
SUBJECTS = ("backpack", "bear_plushie", "candle", "dog2", "robot_toy", "can")


@pytest.fixture(scope="module")
def turbo_dir(tmp_path_factory):
  return make_tiny_model(tmp_path_factory.mktemp("rt") / "tiny-sd-turbo", 0, "sd-turbo")


@pytest.fixture(scope="module")
def models(turbo_dir):
  return load_models(str(turbo_dir))


@pytest.fixture(scope="module")
def entries():
  return [e for e in dreambooth_corpus(SHARED) if e.id in SUBJECTS]


@pytest.fixture(scope="module")
def db_dir(models, entries, tmp_path_factory):
  folder = tmp_path_factory.mktemp("rtdb") / "db"
  database.HSpaceDatabase.build(entries, models, size=SIZE, batch_size=4).save(folder)
  return folder


@pytest.fixture(scope="module")
def db(db_dir, models):
  return database.HSpaceDatabase.load(db_dir, models)


@pytest.fixture(scope="module")
def pipe(turbo_dir):
  from diffusers import StableDiffusionPipeline
  return StableDiffusionPipeline.from_pretrained(str(turbo_dir))


def _noise(n=2):
  return np.random.default_rng(5).standard_normal((n, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


def _torch_hspace(pipe, latents_nchw, prompts):
  """diffusers' mid_block output of the UNet at t = 0 on clean latents with their own prompts (h0_r)."""
  got = {}
  handle = pipe.unet.mid_block.register_forward_hook(lambda m, i, o: got.setdefault("h", o.detach().clone()))
  try:
    with torch.no_grad():
      embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
      pipe.unet(torch.tensor(latents_nchw), torch.zeros(len(prompts)), encoder_hidden_states=embeds)
  finally:
    handle.remove()
  return got["h"].numpy()


def test_encoder_half_and_database_features_match_diffusers(models, db, entries, pipe):
  # the split UNet is the UNet: decode(encode(x)) == apply(x)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 4))
  cond = unet.UNetCond(conditioning.encode_prompts(models, PROMPTS).embeds)
  eps, _ = unet.apply(models.unet_params, x, 500.0, cond, config=models.unet_config)
  h, skips = unet.encode(models.unet_params, x, 500.0, cond, config=models.unet_config)
  assert h.shape == (2, 2, 2, 64)
  np.testing.assert_array_equal(np.asarray(unet.decode(models.unet_params, h, skips, 500.0, cond,
                                                       config=models.unet_config)), np.asarray(eps))
  # the database's cached h0_r: diffusers' VAE posterior mean and mid_block output on the same pixels and captions
  pixels = np.stack([database.entry_pixels(image_io.load_rgb(e.image), SIZE) for e in entries])
  with torch.no_grad():
    z = pipe.vae.encode(torch.tensor(nchw(pixels))).latent_dist.mean * pipe.vae.config.scaling_factor
  want = _torch_hspace(pipe, z.numpy(), [e.caption for e in entries])
  assert max_rel_err(nchw(db.hspace(models, [e.id for e in entries])), want) < 1e-4


def test_text_key_is_the_normalised_pooled_output_of_transformers(models, pipe, db, entries):
  keys = ModelTextKey(models).encode(PROMPTS)
  with torch.no_grad():
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    pooled = pipe.text_encoder(ids.input_ids).pooler_output.numpy()
  want = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  np.testing.assert_allclose(keys, want, atol=1e-5)
  # every entry's own caption finds it first, with λ = 1
  found = pipeline.retrieve(models, db, [e.caption for e in entries], 2)
  assert [row[0].id for row in found] == [e.id for e in entries]
  np.testing.assert_allclose([row[0].score for row in found], 1.0, atol=1e-5)
  assert all(row[1].score < row[0].score for row in found)


def test_no_injection_is_plain_one_step_generation(models, db):
  """w = 1 and an untrained adapter (zero proj_out) give bit-identical images to plain one-step generation."""
  jobs = [Job.numbered(p, 3, i) for i, p in enumerate(PROMPTS)]
  opts = t2i.GenerationOptions(height=SIZE, width=SIZE)
  plain_latents, plain = t2i.generate(models, jobs, opts, progress=False)
  for rag in (pipeline.RagTurboOptions(w=1.0), pipeline.RagTurboOptions(hspace="adapter:init", k=2)):
    latents, images, neighbours = pipeline.generate(models, jobs, opts, rag, db, progress=False)
    np.testing.assert_array_equal(latents, plain_latents)
    np.testing.assert_array_equal(images, plain)
    assert all(len(v) == rag.k for v in neighbours.values())
  latents, _, _ = pipeline.generate(models, jobs, opts, pipeline.RagTurboOptions(w=0.8), db, progress=False)
  assert np.abs(latents - plain_latents).max() > 1e-3  # and w = 0.8 does inject


def _slerp_torch(h_t, h_r, w):
  """Eq. 3 transcribed in torch (whole-map angle from unit vectors, per sample)."""
  b = h_t.shape[0]
  t, r = h_t.reshape(b, -1), h_r.reshape(b, -1)
  cos = ((t / t.norm(dim=1, keepdim=True)) * (r / r.norm(dim=1, keepdim=True))).sum(1).clamp(-1, 1)
  om = torch.arccos(cos)[:, None]
  out = torch.sin((1 - w) * om) / torch.sin(om) * r + torch.sin(w * om) / torch.sin(om) * t
  return out.reshape(h_t.shape)


def _torch_adapter(params, config):
  from diffusers.models.transformers.transformer_2d import Transformer2DModel
  t2d = Transformer2DModel(num_attention_heads=config.heads, attention_head_dim=config.dim_head,
                           in_channels=config.channels, cross_attention_dim=config.channels,
                           norm_num_groups=config.norm_num_groups, use_linear_projection=True)
  state = {k: torch.tensor(v) for k, v in convert.params_to_torch(jax.device_get(params)).items()}
  t2d.load_state_dict(state, strict=True)
  return t2d.eval()


@pytest.mark.parametrize("mode", ["slerp", "adapter"])
def test_injection_matches_torch_hook_on_diffusers_mid_block(models, db, pipe, mode, tmp_path, monkeypatch):
  import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
  k = 1 if mode == "slerp" else 2
  rag = pipeline.RagTurboOptions(k=k, w=0.7)
  if mode == "adapter":  # a trained-looking adapter: random weights everywhere, proj_out included
    config = hspace_adapter.HSpaceAdapterConfig.for_unet(models.unet_config)
    params = hspace_adapter.init_params(config, jax.random.PRNGKey(7), zero_out=False)
    params = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(8), a.shape), params)
    path = adapter_file.save(tmp_path / "adapter.safetensors", params, config, database.model_identity(models))
    rag = pipeline.RagTurboOptions(k=k, hspace=f"adapter:{path}")
  jobs = [Job.numbered(p, 3, i) for i, p in enumerate(PROMPTS)]
  noise = _noise()
  opts = t2i.GenerationOptions(height=SIZE, width=SIZE)
  latents, _, neighbours = pipeline.generate(models, jobs, opts, rag, db, init_latents=nhwc(noise), progress=False)
  # torch: the same neighbours' h0_r and λ, blended into diffusers' mid_block output by a forward hook
  ids = [n.id for j in jobs for n in neighbours[j.id]]
  h_r = torch.tensor(nchw(db.hspace(models, ids))).reshape(2, k, 64, 2, 2)
  lam = torch.tensor([[n.score for n in neighbours[j.id]] for j in jobs])
  if mode == "slerp":
    edit = lambda h: _slerp_torch(h, h_r.mean(1), rag.w)
  else:
    t2d = _torch_adapter(params, config)

    def edit(h):
      tokens = h_r.permute(0, 1, 3, 4, 2).reshape(2, k * 4, 64)  # NHWC order: row-major over positions
      delta = t2d(h, encoder_hidden_states=tokens).sample - h
      return h + lam.mean(1)[:, None, None, None] * delta
  handle = pipe.unet.mid_block.register_forward_hook(lambda m, i, o: edit(o))
  # one step ends at sigma 0, where ancestral Euler's fresh noise is multiplied by zero: any noise will do
  monkeypatch.setattr(ea, "randn_tensor", lambda shape, **_: torch.zeros(shape))
  try:
    with torch.no_grad():
      ref = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, latents=torch.tensor(noise), height=SIZE,
                 width=SIZE, output_type="latent").images.numpy()
  finally:
    handle.remove()
  plain = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, latents=torch.tensor(noise), height=SIZE,
               width=SIZE, output_type="latent").images.numpy()
  assert np.abs(ref - plain).max() > 1e-3  # the hook changed diffusers' result
  assert max_rel_err(nchw(latents), ref) < 1e-3


def _kadiff(*argv):
  return cli.main([str(a) for a in argv])


@pytest.mark.slow
def test_cli_builds_queries_generates_resumes_and_refuses_bad_input(turbo_dir, db_dir, tmp_path, capsys):
  out = tmp_path / "out"
  base = ["generate", "--model", turbo_dir, "--mode", "rag-turbo", "--database", db_dir, "--height", SIZE,
          "--width", SIZE]
  assert _kadiff(*base, "--prompt", "a teddy bear", "--num-images", 2, "--k", 2, "--out", out) == 0
  rec = json.loads((out / "seed0_0000.json").read_text())
  assert rec["inputs"]["mode"] == "rag-turbo" and len(rec["retrieved"]) == 2
  assert rec["retrieved"][0]["lambda"] >= rec["retrieved"][1]["lambda"]
  assert _kadiff(*base, "--prompt", "a teddy bear", "--num-images", 2, "--k", 2, "--out", out) == 0
  assert "wrote 0 job(s)" in capsys.readouterr().out
  before = sorted(p.name for p in out.iterdir())

  def fails(*argv, says):
    capsys.readouterr()
    assert _kadiff(*argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kadiff: error")]
    assert len(errors) == 1 and says in errors[0], errors

  fails(*base, "--prompt", "x", "--k", 7, "--out", out, says="k=7: expected 1 to 6")
  fails(*base, "--prompt", "x", "--w", 1.5, "--out", out, says="w=1.5")
  fails("generate", "--model", turbo_dir, "--prompt", "x", "--k", 2, "--out", out, says="--mode rag-turbo")
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  fails(*base, "--prompt", "x", "--hspace", f"adapter:{bad}", "--out", out, says="not a readable safetensors")
  other = make_tiny_model(tmp_path / "other", 1, "sd-turbo")
  fails("generate", "--model", other, "--mode", "rag-turbo", "--database", db_dir, "--prompt", "x", "--out", out,
        says="built with model")
  damaged = tmp_path / "damaged"
  shutil.copytree(db_dir, damaged)
  arr = np.load(damaged / "features.npy")
  np.save(damaged / "features.npy", arr + 1)
  fails(*base[:-6], "--database", damaged, "--height", SIZE, "--width", SIZE, "--prompt", "x", "--out", out,
        says="checksums")
  assert sorted(p.name for p in out.iterdir()) == before  # nothing in the output folder was touched
  # an emptied database refuses to generate; the original is left as it was
  empty = tmp_path / "empty"
  shutil.copytree(db_dir, empty)
  assert _kadiff("hspace", "delete", "--model", turbo_dir, "--database", empty, *SUBJECTS) == 0
  fails(*base[:-6], "--database", empty, "--height", SIZE, "--width", SIZE, "--prompt", "x", "--out", out,
        says="empty")
  assert len(database.HSpaceDatabase.load(db_dir)) == len(SUBJECTS)


def test_upsert_delete_and_query(models, db_dir, entries, tmp_path, capsys):
  folder = tmp_path / "db"
  shutil.copytree(db_dir, folder)
  d = database.HSpaceDatabase.load(folder, models)
  before = d.hspace(models, ["candle"])
  d.delete(["candle", "can"])
  d.save(folder)
  d = database.HSpaceDatabase.load(folder, models)
  assert len(d) == len(SUBJECTS) - 2 and "candle" not in d.row
  d.upsert([e for e in entries if e.id == "candle"], models, batch_size=4)
  d.save(folder)
  d = database.HSpaceDatabase.load(folder, models)
  assert max_rel_err(d.hspace(models, ["candle"]), before) < 1e-5  # another batch size: float rounding only
  capsys.readouterr()
  assert _kadiff("hspace", "query", "--model", models.source, "--database", folder, "--json", "-k", 2,
                 next(e.caption for e in entries if e.id == "candle")) == 0
  got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert got["neighbours"][0]["id"] == "candle"
  queries = tmp_path / "q.jsonl"
  kept = [e for e in entries if e.id != "can"]  # deleted above
  queries.write_text("".join(json.dumps({"query": e.caption, "id": e.id}) + "\n" for e in kept))
  assert _kadiff("hspace", "evaluate", "--model", models.source, "--database", folder, "--queries", queries,
                 "-k", 2) == 0
  got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert got["top1"] == 1.0 and got["queries"] == len(kept)  # an entry's own caption finds it


def test_latent_cache_recomputes_the_same_h(models, db, entries):
  """cache="latent" keeps E(x_r) only; h0_r computed per query equals the cached one."""
  two = entries[:2]
  lat = database.HSpaceDatabase.build(two, models, cache="latent", size=SIZE, batch_size=4)
  assert lat.features.shape == (2, SIZE // 8, SIZE // 8, 4)
  ids = [e.id for e in two]
  assert max_rel_err(lat.hspace(models, ids), db.hspace(models, ids)) < 1e-5


@pytest.mark.slow
def test_evaluate_scores_plain_and_slerp_with_clip(turbo_dir, db_dir, tmp_path, capsys):
  from kadiff_jax.metrics.clip_score import CLIPScorer
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a teddy bear on a rock\na red backpack\n")
  argv = ["evaluate", "rag-turbo", "--model", turbo_dir, "--database", db_dir, "--prompts", prompts, "--seeds", "0,1",
          "--clip", "tiny", "--height", SIZE, "--width", SIZE, "--out", tmp_path / "ev"]
  assert _kadiff(*argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = (tmp_path / "ev" / "scores.csv").read_text().splitlines()
  assert len(rows) == 1 + 2 * 2 * 2 and set(summary["clip"]) == {"sd-turbo", "slerp"}
  # a score is the plain cosine of CLIP's image and prompt embeddings
  clip = CLIPScorer("tiny")
  first = rows[1].split(",")
  img = tmp_path / "ev" / first[3] / "p0000_s0.png"
  want = float((clip.image_embeds([img]) * clip.text_embeds([first[1]])).sum())
  assert abs(float(first[4]) - want) < 1e-5
  stamp = (tmp_path / "ev" / "slerp" / "p0000_s0.png").stat().st_mtime_ns
  assert _kadiff(*argv) == 0  # resumes: nothing generated again
  assert (tmp_path / "ev" / "slerp" / "p0000_s0.png").stat().st_mtime_ns == stamp
