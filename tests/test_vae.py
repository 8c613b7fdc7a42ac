"""AutoencoderKL parity with diffusers (encode mean/logvar/sample, decode, scaling)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from conftest import max_rel_err, nchw, nhwc
from kadiff_jax.models import vae
from kadiff_jax.models.config_util import ConfigError
from kadiff_jax.tiny_model import random_params
from kadiff_jax.weights import convert, load


def _pair(cfg):
  d = cfg.to_diffusers()
  d.pop("_class_name")
  m = AutoencoderKL(**d).eval()
  params = random_params(vae.init_shapes(cfg), 3)
  m.load_state_dict({k: torch.from_numpy(v) for k, v in convert.params_to_torch(params).items()}, strict=True)
  return m, params


@pytest.mark.parametrize("shift", [None, 0.1159])
def test_vae_matches_diffusers(shift):
  cfg = dataclasses.replace(vae.tiny(), shift_factor=shift)
  tm, params = _pair(cfg)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    dist = tm.encode(torch.tensor(x)).latent_dist
    ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
    z = (ref_mean - (shift or 0.0)) * cfg.scaling_factor
    ref_img = tm.decode(torch.tensor(z / cfg.scaling_factor + (shift or 0.0))).sample.numpy()
  post = vae.posterior(params, jnp.asarray(nhwc(x)), config=cfg)
  assert max_rel_err(nchw(post.mean), ref_mean) < 1e-4
  assert max_rel_err(nchw(post.logvar), ref_logvar) < 1e-4
  ours_z = vae.encode(params, jnp.asarray(nhwc(x)), config=cfg)
  assert max_rel_err(nchw(ours_z), z) < 1e-4
  img = vae.decode(params, jnp.asarray(nhwc(z)), config=cfg)
  assert max_rel_err(nchw(img), ref_img) < 1e-4
  # sampling: mean + exp(logvar / 2) * noise
  key = jax.random.PRNGKey(0)
  noise = np.asarray(jax.random.normal(key, post.mean.shape))
  sampled = vae.encode(params, jnp.asarray(nhwc(x)), config=cfg, key=key)
  want = (nhwc(ref_mean) + np.exp(0.5 * nhwc(ref_logvar)) * noise - (shift or 0.0)) * cfg.scaling_factor
  assert max_rel_err(sampled, want) < 1e-4


def test_vae_legacy_attention_names_load(tmp_path):
  """Old checkpoints name the mid-block attention query/key/value/proj_attn (1x1 convs in some)."""
  cfg = vae.tiny()
  params = random_params(vae.init_shapes(cfg), 4)
  state = convert.params_to_torch(params)
  legacy = {}
  for k, v in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f"attentions.0.{new}." in k:
        k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        v = v[:, :, None, None] if v.ndim == 2 else v  # stored as 1x1 conv weights
        break
    legacy[k] = v
  load.save_component(tmp_path, legacy, cfg.to_diffusers())
  got = load.load_component(tmp_path, load.VAE, lambda: vae.init_shapes(cfg), cfg, use_cache=False)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vae_rejects_unsupported_block_type():
  d = vae.tiny().to_diffusers()
  d["down_block_types"] = ["DownEncoderBlock2D", "Frob", "DownEncoderBlock2D", "DownEncoderBlock2D"]
  with pytest.raises(ConfigError, match="down_block_types"):
    vae.VAEConfig.from_diffusers(d)
