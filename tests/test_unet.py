"""UNet parity with diffusers' UNet2DConditionModel, attention sites and hooks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import max_rel_err, nchw, nhwc
from kadiff_jax.models import unet
from kadiff_jax.models.attention import parse_layers
from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.tiny_model import random_params
from kadiff_jax.weights import convert

SD15_TINY = dataclasses.replace(
    unet.sd15(), sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=(1, 2, 1),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=(1, 1, 1),
    attention_heads=(2, 2, 2), cross_attention_dim=(48,) * 3, norm_num_groups=8)
SD21_TINY = dataclasses.replace(SD15_TINY, use_linear_projection=True, upcast_attention=True, attention_heads=(2, 4, 4))


def _torch_unet(cfg: unet.UNetConfig, seed=0):
  d = cfg.to_diffusers()
  d.pop("_class_name")
  m = UNet2DConditionModel(**d).eval()
  params = random_params(unet.init_shapes(cfg), seed)
  state = {k: torch.from_numpy(v) for k, v in convert.params_to_torch(params).items()}
  m.load_state_dict(state, strict=True)
  return m, params


def _inputs(cfg, batch=2, size=8, seq=7, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
  ehs = rng.standard_normal((batch, seq, cfg.cross_attention_dim[0])).astype(np.float32)
  te = tid = None
  if cfg.addition_embed_type:
    te = rng.standard_normal((batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim))
    te = te.astype(np.float32)
    tid = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1))
  return x, ehs, te, tid


def _run_both(cfg, size=8, capture=()):
  tm, params = _torch_unet(cfg)
  x, ehs, te, tid = _inputs(cfg, size=size)
  t = np.array([981.0, 1.0], np.float32)
  feats = {}
  handle = tm.up_blocks[0].register_forward_hook(lambda mod, i, o: feats.setdefault("up0", o))
  kw = {"added_cond_kwargs": {"text_embeds": torch.tensor(te), "time_ids": torch.tensor(tid)}} if te is not None else {}
  with torch.no_grad():
    ref = tm(torch.tensor(x), torch.tensor(t), torch.tensor(ehs), **kw).sample.numpy()
  handle.remove()
  cond = unet.UNetCond(jnp.asarray(ehs), None if te is None else jnp.asarray(te), None if tid is None else jnp.asarray(tid))
  out, aux = unet.apply(params, jnp.asarray(nhwc(x)), jnp.asarray(t), cond, config=cfg, capture=capture)
  return out, aux, ref, feats, params, (x, ehs, te, tid, t)


@pytest.mark.parametrize("name,cfg,size", [("sdxl", unet.tiny_sdxl(), 8), ("sdxl-odd", unet.tiny_sdxl(), 10),
                                           ("sd15", SD15_TINY, 8), ("sd21", SD21_TINY, 8)])
def test_unet_matches_diffusers(name, cfg, size):
  out, aux, ref, feats, *_ = _run_both(cfg, size, capture=("up_blocks.0",))
  assert max_rel_err(nchw(out), ref) < 1e-4
  # the DIFT feature map (up_blocks[0] output, after its upsampler) is the same tensor diffusers has
  assert max_rel_err(nchw(aux["up_blocks.0"]), feats["up0"].numpy()) < 1e-4


def test_unet_loads_diffusers_written_checkpoint(tmp_path):
  cfg = unet.tiny_sdxl()
  d = cfg.to_diffusers()
  d.pop("_class_name")
  torch.manual_seed(1)
  tm = UNet2DConditionModel(**d).eval()
  tm.save_pretrained(tmp_path)  # the real writer, real file names
  from kadiff_jax.weights import load
  params = load.load_component(tmp_path, load.UNET, lambda: unet.init_shapes(cfg), cfg, use_cache=False)
  x, ehs, te, tid = _inputs(cfg)
  with torch.no_grad():
    ref = tm(torch.tensor(x), 10, torch.tensor(ehs),
             added_cond_kwargs={"text_embeds": torch.tensor(te), "time_ids": torch.tensor(tid)}).sample.numpy()
  out, _ = unet.apply(params, jnp.asarray(nhwc(x)), 10, unet.UNetCond(jnp.asarray(ehs), jnp.asarray(te),
                                                                        jnp.asarray(tid)), config=cfg)
  assert max_rel_err(nchw(out), ref) < 1e-4


def test_sdxl_attention_numbering_follows_spec_and_diffusers():
  cfg = unet.sdxl_base()
  sites = unet.attention_sites(cfg)
  selfs = [s for s in sites.values() if s.kind == "self"]
  assert len(selfs) == 70
  by_index = {s.index: s for s in selfs}
  assert by_index[1].path == "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
  assert by_index[24].path == "down_blocks.2.attentions.1.transformer_blocks.9.attn1"
  assert by_index[25].path == "mid_block.attentions.0.transformer_blocks.0.attn1"
  assert by_index[34].path == "mid_block.attentions.0.transformer_blocks.9.attn1"
  assert by_index[35].path == "up_blocks.0.attentions.0.transformer_blocks.0.attn1"
  assert by_index[44].path == "up_blocks.0.attentions.0.transformer_blocks.9.attn1"
  assert by_index[70].path == "up_blocks.1.attentions.2.transformer_blocks.1.attn1"
  # diffusers' processor order (the IP-Adapter key numbering): down, up, mid; attn1/attn2 alternating
  d = cfg.to_diffusers()
  d.pop("_class_name")
  with torch.device("meta"):
    tm = UNet2DConditionModel(**d)
  order = [k.removesuffix(".processor") for k in tm.attn_processors]
  assert [sites[p].processor_index for p in order] == list(range(140))
  cross = sorted((s for s in sites.values() if s.kind == "cross"), key=lambda s: s.processor_index)
  assert [s.processor_index for s in cross] == list(range(1, 140, 2))
  assert cross[-1].region == "mid"
  # selection by number and by name agree: 44-70 is the last 21 of up_blocks.0 plus all of up_blocks.1
  by_num = {s.path for s in selfs if parse_layers("44-70").selects(s)}
  by_name = {s.path for s in selfs if parse_layers("up_blocks.1.*").selects(s)}
  assert len(by_num) == 27 and len(by_name) == 6 and by_name < by_num


@dataclasses.dataclass(frozen=True)
class _Record:
  """Passes attention through unchanged and reports the keys it saw."""
  name: str = "record"
  needs_args = False

  def selects(self, site):
    return site.kind == "self"

  def __call__(self, call, attend, args):
    return attend(call.q, call.k, call.v), {"k": call.k}


@dataclasses.dataclass(frozen=True)
class _ScaleValues:
  """Multiplies values by a traced factor in one layer: hooks get data through hook_args."""
  path: str
  name: str = "scale_v"

  def selects(self, site):
    return site.path == self.path

  def __call__(self, call, attend, args):
    return attend(call.q, call.k, call.v * args), {}


def test_hooks_compose_and_pass_through():
  cfg = unet.tiny_sdxl()
  params = random_params(unet.init_shapes(cfg), 0)
  x, ehs, te, tid = _inputs(cfg)
  args = (jnp.asarray(nhwc(x)), 500.0, unet.UNetCond(jnp.asarray(ehs), jnp.asarray(te), jnp.asarray(tid)))
  plain, aux0 = unet.apply(params, *args, config=cfg)
  assert aux0 == {}
  recorded, aux = unet.apply(params, *args, config=cfg, hooks=(_Record(),))
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(recorded))
  n_self = sum(s.kind == "self" for s in unet.attention_sites(cfg).values())
  assert len(aux) == n_self and all(k.endswith("/record.k") for k in aux)
  path = "up_blocks.0.attentions.1.transformer_blocks.1.attn1"
  both, aux2 = unet.apply(params, *args, config=cfg, hooks=(_Record(), _ScaleValues(path)),
                          hook_args={"scale_v": jnp.float32(1.0)})
  np.testing.assert_allclose(np.asarray(both), np.asarray(plain), rtol=0, atol=1e-6)
  changed, _ = jax.jit(lambda s: unet.apply(params, *args, config=cfg, hooks=(_Record(), _ScaleValues(path)),
                                            hook_args={"scale_v": s}))(jnp.float32(3.0))
  assert np.abs(np.asarray(changed) - np.asarray(plain)).max() > 1e-3
  # the outer hook saw the keys; the inner one changed only values, so keys are untouched
  np.testing.assert_array_equal(np.asarray(aux2[f"{path}/record.k"]), np.asarray(aux[f"{path}/record.k"]))


@pytest.mark.parametrize("field,value", [("class_embed_type", "timestep"), ("attention_type", "gated"),
                                         ("time_cond_proj_dim", 256), ("frobnicate", 1)])
def test_unsupported_config_field_is_named(field, value):
  d = unet.tiny_sdxl().to_diffusers()
  d[field] = value
  with pytest.raises(ConfigError, match=field):
    unet.UNetConfig.from_diffusers(d)


def test_bf16_runs_close_to_fp32():
  cfg = unet.tiny_sdxl()
  params = random_params(unet.init_shapes(cfg), 0)
  x, ehs, te, tid = _inputs(cfg)
  args = (jnp.asarray(nhwc(x)), 500.0, unet.UNetCond(jnp.asarray(ehs), jnp.asarray(te), jnp.asarray(tid)))
  ref, _ = unet.apply(params, *args, config=cfg)
  p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  out, _ = unet.apply(p16, *args, config=cfg, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  assert max_rel_err(np.asarray(out, np.float32), ref) < 0.1


def test_attention_implementation_is_decided_in_one_place_and_falls_back_where_cudnn_cannot_run(monkeypatch):
  from kadiff_jax import sharding
  from kadiff_jax.models.attention import dot_product_attention
  monkeypatch.delenv("KADIFF_ATTENTION", raising=False)
  want = "cudnn" if jax.default_backend() == "gpu" else "xla"
  assert sharding.attention_implementation(jnp.bfloat16) == want
  assert sharding.attention_implementation(jnp.float32) == "xla"
  monkeypatch.setenv("KADIFF_ATTENTION", "cudnn")
  assert sharding.attention_implementation(jnp.float32) == "cudnn"
  monkeypatch.setenv("KADIFF_ATTENTION", "flash")
  with pytest.raises(ValueError, match="KADIFF_ATTENTION='flash': expected one of"):
    sharding.attention_implementation(jnp.bfloat16)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 12)), jnp.float32) for _ in range(3))
  xla = dot_product_attention(q, k, v, implementation="xla")
  # fp32 and a head dim of 12 are not cuDNN's: asked for it, the layer still runs (XLA's kernel), same numbers
  np.testing.assert_array_equal(np.asarray(dot_product_attention(q, k, v, implementation="cudnn")), np.asarray(xla))
  if jax.default_backend() != "gpu":
    with pytest.raises(Exception):  # the fallback is what made the line above run: jax itself refuses here
      jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def test_applying_pretrained_models_traces_no_random_initialiser(monkeypatch):
  """Flax checks each param's shape on every apply by tracing its initialiser: pretrained layers use zeros
  (`layers.checkpoint_init`), so no random initialiser is traced; the H-space adapter, trained from scratch,
  keeps random ones."""
  from kadiff_jax.models import hspace_adapter, vae

  cfg = unet.tiny_sdxl()
  params = unet.init_shapes(cfg)
  vae_cfg = vae.tiny()
  vae_params = vae.init_shapes(vae_cfg)

  def refuse(*a, **k):
    raise AssertionError("a random initialiser was traced while applying a pretrained model")

  from jax._src import random as random_impl  # what jax.nn.initializers call

  with monkeypatch.context() as m:
    for name in ("normal", "truncated_normal", "uniform"):
      m.setattr(random_impl, name, refuse)
    x = jax.ShapeDtypeStruct((1, 8, 8, cfg.in_channels), jnp.float32)
    cond = unet.UNetCond(jax.ShapeDtypeStruct((1, 77, cfg.cross_attention_dim[0]), jnp.float32),
                         jax.ShapeDtypeStruct((1, cfg.projection_class_embeddings_input_dim
                                               - 6 * cfg.addition_time_embed_dim), jnp.float32),
                         jax.ShapeDtypeStruct((1, 6), jnp.float32))
    jax.eval_shape(lambda p, x_, c_: unet.apply(p, x_, 1.0, c_, config=cfg)[0], params, x, cond)
    jax.eval_shape(lambda p: vae.decode(p, jnp.zeros((1, 8, 8, vae_cfg.latent_channels)), config=vae_cfg),
                   vae_params)
  adapter = hspace_adapter.init_params(hspace_adapter.HSpaceAdapterConfig(64, 4, 8), jax.random.PRNGKey(0))
  kernel = np.asarray(adapter["transformer_blocks_0"]["attn1"]["to_q"]["kernel"])
  assert kernel.std() > 0.05  # lecun normal over 64 inputs: std 1/8
