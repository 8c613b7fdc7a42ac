"""Reference-grouped rows: the layout algebra, the packing plan, and equality with the release's 4-row path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import max_rel_err
from kadiff_jax.kadiff.grouping import plan_groups
from kadiff_jax.sampling import KADIFF, KADIFF_GROUPED, MASACTRL_GROUPED

STEPS = 6


def test_grouped_layout_rows_follow_a_plain_transcription():
  """Group g of k jobs: rows [uncond_gen x k, cond_gen x k, cond_ref]; shared rows take the group's first job."""
  lay = KADIFF_GROUPED.grouped(3)
  assert lay.rows == 7 and lay.span("cond_gen") == slice(3, 6) and lay.span("cond_ref") == slice(6, 7)
  g, k = 2, 3
  vals = {r: np.arange(g * k, dtype=np.float32) + 100 * i for i, r in enumerate(lay.roles)}
  rows = np.asarray(lay.assemble(vals))
  want = []
  for gi in range(g):
    want += list(vals["uncond_gen"][gi * k:(gi + 1) * k]) + list(vals["cond_gen"][gi * k:(gi + 1) * k])
    want.append(vals["cond_ref"][gi * k])
  np.testing.assert_array_equal(rows, want)
  np.testing.assert_array_equal(np.asarray(lay.take(rows, "cond_ref")), vals["cond_ref"][::k])
  eps = np.random.default_rng(0).standard_normal((g * lay.rows, 2)).astype(np.float32)
  guided = np.asarray(lay.guide(jnp.asarray(eps), 5.0))
  for job in range(g * k):
    gi, j = divmod(job, k)
    u, c = eps[gi * 7 + j], eps[gi * 7 + 3 + j]
    np.testing.assert_allclose(guided[job], u + 5.0 * (c - u), rtol=1e-6)
  # with one job per group and nothing shared, the release's layout is the old one: 4 rows per job
  assert KADIFF.rows == 4 and KADIFF.span("cond_ref") == slice(3, 4)


def test_plan_picks_fewest_rows_and_pads_groups_with_their_first_job():
  # 8 jobs on one reference: one group of 8 (17 rows) beats 8 groups of 1 (24 rows)
  p = plan_groups(["a"] * 8, KADIFF_GROUPED)
  assert p.layout.group == 8 and p.groups == 1 and p.layout.rows == 17
  # 3, 2 and 1 jobs on three references: groups of 1 (18 rows) beat 2 (20) and 3 (21)
  keys = ["a", "b", "a", "c", "b", "a"]
  p = plan_groups(keys, KADIFF_GROUPED)
  assert p.layout.group == 1 and p.groups == 6
  p3 = plan_groups(keys, KADIFF_GROUPED, max_group=3)
  for pl in (p, p3):
    assert [keys[pl.slots[s]] for s in pl.position] == keys and all(pl.slots[s] == i for i, s in enumerate(pl.position))
  # the cap bounds k: 8 jobs in groups of at most 3 -> k=2 (4 groups, 20 rows) beats 3 (21) and 1 (24)
  assert plan_groups(["a"] * 8, KADIFF_GROUPED, max_group=3).layout.group == 2
  # whole groups per device: 3 references of 4 jobs on 1 device -> k=4 (27 rows; k=2 30, k=1 36); on 2 devices
  # k=4's 3 groups pad to 4 (36 rows), so k=2 (6 groups, 30 rows) wins
  twelve = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
  assert plan_groups(twelve, KADIFF_GROUPED).layout.group == 4
  assert plan_groups(twelve, KADIFF_GROUPED, devices=2).layout.group == 2
  # a short group repeats its first job
  p = plan_groups(["a"] * 8 + ["b"] * 7, KADIFF_GROUPED)
  assert p.layout.group == 8 and p.slots == list(range(15)) + [8] and p.position == list(range(15))
  assert plan_groups(["a"] * 5, KADIFF).layout.group == 1  # nothing shared: nothing to gain


@pytest.mark.parametrize("layout", [KADIFF, KADIFF_GROUPED.grouped(3)], ids=["per_job", "grouped3"])
def test_kv_injection_and_mutual_attention_match_a_plain_transcription(layout):
  """Spec 6.4, per job b of group g (if active) and target t (if injected): cond_gen's K and V at t <- the cond_ref
  row's (the group's own, or the job's) at source(b, t); queries untouched. MasaCtrl: gen rows <- ref rows."""
  from kadiff_jax.kadiff.correspondence import Correspondence
  from kadiff_jax.kadiff.injection import InjectionArgs, KVInjection, MutualSelfAttention
  from kadiff_jax.models.attention import AttentionCall, AttentionSite, parse_layers
  rng = np.random.default_rng(1)
  g, kk, r, heads, d = 2, layout.group, 4, 2, 5
  n, b = r * r, g * kk
  q, k, v = (rng.standard_normal((g * layout.rows, n, heads, d)).astype(np.float32) for _ in range(3))
  source = rng.integers(0, n, (b, n)).astype(np.int32)
  inject = rng.random((b, n)) < 0.5
  active = np.array([True, False, True, True, True, False])[:b]
  site = AttentionSite("up_blocks.0.attentions.0.transformer_blocks.0.attn1", "self", 1, 0, "up", heads * d, heads)
  seen = {}

  def attend(q_, k_, v_):
    seen.update(q=np.asarray(q_), k=np.asarray(k_), v=np.asarray(v_))
    return q_

  def row(job, role):
    gi, j = divmod(job, kk)
    return gi * layout.rows + layout.span(role).start + (0 if role in layout.shared else j)

  call = AttentionCall(site, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), (r, r), None, None)
  corr = Correspondence(jnp.asarray(source), jnp.asarray(inject), jnp.zeros((b, n)))
  KVInjection(parse_layers("1"), layout=layout)(call, attend, InjectionArgs(jnp.asarray(active), {r: corr}))
  want_k, want_v = k.copy(), v.copy()
  for job in range(b):
    for t in range(n):
      if active[job] and inject[job, t]:
        want_k[row(job, "cond_gen"), t] = k[row(job, "cond_ref"), source[job, t]]
        want_v[row(job, "cond_gen"), t] = v[row(job, "cond_ref"), source[job, t]]
  np.testing.assert_array_equal(seen["q"], q)
  np.testing.assert_array_equal(seen["k"], want_k)
  np.testing.assert_array_equal(seen["v"], want_v)
  assert not np.array_equal(want_k, k)  # the case injects something

  layout = MASACTRL_GROUPED.grouped(kk) if layout.shared else layout
  km = rng.standard_normal((g * layout.rows, n, heads, d)).astype(np.float32)
  call = AttentionCall(site, jnp.asarray(km), jnp.asarray(km), jnp.asarray(km), (r, r), None, None)
  MutualSelfAttention(parse_layers("1"), layout)(call, attend, InjectionArgs(jnp.asarray(active), {}))
  want = km.copy()
  for job in range(b):
    if active[job]:
      want[row(job, "uncond_gen")] = km[row(job, "uncond_ref")]
      want[row(job, "cond_gen")] = km[row(job, "cond_ref")]
  np.testing.assert_array_equal(seen["k"], want)
  np.testing.assert_array_equal(seen["q"], km)


def _reference(path, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:80, 0:72]
  img = np.stack([yy * (2 + seed), xx * 3, yy + xx * seed], -1) % 256 + rng.integers(0, 50, (80, 72, 3))
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
  return str(path)


@pytest.fixture(scope="module")
def setup(tiny_dir, tiny_models, tmp_path_factory):
  from kadiff_jax.kadiff import reference as R
  from kadiff_jax.kadiff.options import KADiffOptions
  from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
  from kadiff_jax.weights.ip_adapter import load_ip_adapter
  tmp = tmp_path_factory.mktemp("refs")
  adapter = load_ip_adapter(tiny_dir / TINY_IP_ADAPTER, tiny_dir / TINY_IMAGE_ENCODER, tiny_models.unet_config)
  opts = KADiffOptions(steps=STEPS, inject_layers="up_blocks.*", inject_steps=(1, STEPS - 1))
  refs = R.prepare_references(tiny_models, adapter, [(_reference(tmp / f"r{i}.png", i), p) for i, p in
                                                     enumerate(("a dog", "a cat", "a teapot"))], opts)
  return adapter, opts, refs


def _items(refs, which):
  """Jobs on references refs[w] for w in `which`, each with its own prompt, seed and mask."""
  from kadiff_jax.job import Job
  from kadiff_jax.kadiff import generate as G
  prompts = ("in the snow", "on a beach", "on a table", "in a forest", "at night")
  out = []
  for i, w in enumerate(which):
    rng = np.random.default_rng(100 + i)
    mask = np.zeros((64, 64), bool)
    mask[4 + i % 5:56, 8:60 - i % 7] = True
    out.append(G.GenerationItem(Job(str(i), f"a thing {prompts[i % 5]}", i, reference=refs[w].path), refs[w], mask,
                                rng.standard_normal((8, 8, 4)).astype(np.float32)))
  return out


def _compare(models, adapter, opts, items, mode="kadiff", group_size=None, want_k=None):
  import dataclasses
  from kadiff_jax.kadiff import generate as G
  grouped = dataclasses.replace(opts, row_layout="grouped", group_size=group_size)
  if want_k is not None:
    assert G.plan_batch(adapter, items, grouped.for_model(models), mode).layout.group == want_k
  a = G.run_jobs(models, adapter, items, grouped, mode=mode)
  b = G.run_jobs(models, adapter, items, dataclasses.replace(opts, row_layout="per_job"), mode=mode)
  assert max_rel_err(a.latents, b.latents) < 1e-5
  assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
  return a, b


@pytest.mark.parametrize("k", [1, 3])
def test_grouped_equals_per_job_path(tiny_models, setup, k):
  adapter, opts, refs = setup
  a, _ = _compare(tiny_models, adapter, opts, _items(refs, [0] * k), want_k=k)
  if k > 1:  # different prompts, seeds and masks in one group really give different images
    assert np.abs(a.latents[0] - a.latents[1]).max() > 1e-2


def test_grouped_equals_per_job_with_three_references_and_fillers(tiny_models, setup):
  """Three references (4, 2 and 1 jobs, interleaved) in groups of 2 (20 rows; 1: 21, 3: 28): the lone job's group
  has a filler, and the outputs come back in the items' order."""
  adapter, opts, refs = setup
  _compare(tiny_models, adapter, opts, _items(refs, [0, 1, 0, 2, 0, 1, 0]), want_k=2)


@pytest.mark.slow
def test_grouped_masactrl_equals_per_job(tiny_models, setup):
  adapter, opts, refs = setup
  # 4 + 1 jobs, 4 rows per job + 2 per group: k=2 (3 groups, 18 rows) beats k=1 and k=4 (20)
  _compare(tiny_models, adapter, opts, _items(refs, [0, 1, 0, 0, 0]), mode="masactrl", want_k=2)


@pytest.mark.slow
def test_grouped_equals_per_job_at_k8(tiny_models, setup):
  adapter, opts, refs = setup
  _compare(tiny_models, adapter, opts, _items(refs, [1] * 8), want_k=8)


SHARDED = """
import sys, numpy as np, jax
assert jax.device_count() == 4
sys.path.insert(0, sys.argv[3])
import test_grouping as T
from kadiff_jax import sharding
from kadiff_jax.kadiff import generate as G, reference as R
from kadiff_jax.kadiff.options import KADiffOptions
from kadiff_jax.tiny_model import TINY_IMAGE_ENCODER, TINY_IP_ADAPTER
from kadiff_jax.weights.ip_adapter import load_ip_adapter
from kadiff_jax.weights.models import load_models
from pathlib import Path
import dataclasses
d, tmp = Path(sys.argv[1]), Path(sys.argv[2])
m = load_models(str(d))
a = load_ip_adapter(d / TINY_IP_ADAPTER, d / TINY_IMAGE_ENCODER, m.unet_config)
o = KADiffOptions(steps=T.STEPS, inject_layers="up_blocks.*", inject_steps=(1, T.STEPS - 1))
refs = R.prepare_references(m, a, [(T._reference(tmp / f"r{i}.png", i), p) for i, p in
                                   enumerate(("a dog", "a cat", "a teapot"))], o)
items = T._items(refs, [0, 1, 0, 2, 0, 1, 0])
# groups of 3 (4 + 2 + 1 jobs -> 2 + 1 + 1 groups, 3 fillers) padded to 4 devices... k=2 gives 4 groups: no pad
plan = G.plan_batch(a, items, o.for_model(m), "kadiff", 4)
assert (plan.layout.group, plan.groups) == (2, 4), plan
three = [it for it, w in zip(items, [0, 1, 0, 2, 0, 1, 0]) if w != 2]  # 4 + 2 jobs: k=2 is 3 groups + a dummy
assert G.plan_batch(a, three, o.for_model(m), "kadiff", 4).groups == 3
four = G.run_jobs(m, a, items, o, mesh=sharding.data_mesh())
one = G.run_jobs(m, a, items, dataclasses.replace(o, row_layout="per_job"), mesh=sharding.data_mesh(jax.devices()[:1]))
four3 = G.run_jobs(m, a, three, o, mesh=sharding.data_mesh())
one3 = np.stack([one.latents[i] for i, w in enumerate([0, 1, 0, 2, 0, 1, 0]) if w != 2])
np.savez(tmp / "r.npz", four=four.latents, one=one.latents, four_img=four.images, one_img=one.images,
         four3=four3.latents, one3=one3)
"""


@pytest.mark.slow
def test_grouped_sharded_over_4_cpu_devices_equals_per_job_on_one(tmp_path, tiny_dir):
  import os, subprocess, sys
  from pathlib import Path
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", SHARDED, str(tiny_dir), str(tmp_path), str(Path(__file__).parent)],
                 env=env, check=True, timeout=900)
  r = np.load(tmp_path / "r.npz")
  assert r["four"].shape == (7, 8, 8, 4)
  assert max_rel_err(r["four"], r["one"]) < 1e-5
  assert np.abs(r["four_img"].astype(int) - r["one_img"].astype(int)).max() <= 1
  assert max_rel_err(r["four3"], r["one3"]) < 1e-5  # with a whole dummy group on the fourth device


@pytest.mark.slow
def test_groups_per_device_come_from_the_compiled_programs_memory(tiny_models):
  """The automatic batch: peak memory of the injection pass (shapes only) fitted per group, 90% of the device."""
  from kadiff_jax.kadiff import generate as G
  cfg, layout = tiny_models.unet_config, KADIFF_GROUPED.grouped(2)
  import jax
  params = tiny_models.unet_params
  shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)

  def peak(groups):
    args, static = G.abstract_inputs(cfg, layout, groups, 8, 4, 16, np.float32)
    return G.peak_bytes(G.kadiff_denoise.lower(shapes, *args, **static).compile())

  p1, p3 = peak(1), peak(3)
  assert p3 > p1 > 0
  fits = lambda memory: G.groups_per_device(params, cfg, layout, 8, 4, 16, memory)
  assert fits(p1 / 0.9) == 1
  assert fits(1.05 * p3 / 0.9) >= 3
  assert fits(100 * p3) > fits(1.05 * p3 / 0.9)  # more memory, more groups


@pytest.mark.slow
def test_benchmark_accounts_both_layouts_from_xla_cost_analysis(capsys):
  """`kadiff benchmark pipeline --config tiny --abstract`: XLA's FLOPs per image follow the rows per image."""
  import json
  from kadiff_jax import cli
  assert cli.main(["benchmark", "pipeline", "--config", "tiny", "--abstract", "--steps", "3",
                   "--group-sizes", "1,3"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["abstract"] and out["row_evaluation_gflop"] > 0
  for k, rows in (("k1", (4, 3)), ("k3", (12, 7))):
    e = out["layouts"][k]
    assert (e["per_job"]["rows_per_step"], e["grouped"]["rows_per_step"]) == rows
    assert abs(e["flops_ratio"] / e["row_ratio"] - 1) < 0.02, e  # FLOPs are the rows' (correspondence is small)
    assert "images_per_s" not in e["grouped"]  # nothing ran
  assert out["memory"]["groups_per_device"] >= 1
