"""Full-size SDXL: our parameter names/shapes equal the real checkpoints' (torch modules on `meta`)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from kadiff_jax.models import clip_text, unet, vae
from kadiff_jax.weights import convert, load

# The published configs of stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder*/config.json).
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_TE1 = {"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77,
            "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
SDXL_TE2 = {**SDXL_TE1, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
            "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}


def _torch_shapes(module, rename=lambda k: k):
  return {rename(k): tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def test_sdxl_unet_shapes():
  cfg = unet.UNetConfig.from_diffusers(SDXL_UNET)
  assert cfg == unet.sdxl_base()
  with torch.device("meta"):
    tm = UNet2DConditionModel(**{k: v for k, v in SDXL_UNET.items()})
  ours = convert.expected_torch_shapes(unet.init_shapes(cfg))
  assert ours == _torch_shapes(tm)
  assert len(ours) == 1680


def test_sdxl_vae_shapes():
  cfg = vae.VAEConfig.from_diffusers(SDXL_VAE)
  with torch.device("meta"):
    tm = AutoencoderKL(**SDXL_VAE)
  assert convert.expected_torch_shapes(vae.init_shapes(cfg)) == _torch_shapes(tm)


@pytest.mark.parametrize("hf_cfg,proj", [(SDXL_TE1, False), (SDXL_TE2, True)])
def test_sdxl_text_encoder_shapes(hf_cfg, proj):
  cfg = clip_text.CLIPTextConfig.from_transformers(hf_cfg, with_projection=proj)
  assert cfg == (clip_text.open_clip_big_g() if proj else clip_text.clip_vit_l())
  with torch.device("meta"):
    tm = (CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig(**hf_cfg))
  shapes = convert.expected_torch_shapes(clip_text.init_shapes(cfg))
  # real SDXL repos (transformers 4) prefix every non-projection weight with text_model.
  real_names = {("" if k.startswith("text_projection") else "text_model.") + k: v for k, v in shapes.items()}
  strip = lambda k: k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
  assert real_names == _torch_shapes(tm, strip)
  # and the loader maps those real names onto our tree
  expected = clip_text.init_shapes(cfg)
  import numpy as np
  state = {k: np.broadcast_to(np.float32(0), v) for k, v in real_names.items()}
  state["text_model.embeddings.position_ids"] = np.zeros((1, 77), np.int64)
  convert.torch_to_params(state, expected, component="te", renames=load.CLIP_TEXT.renames, ignore=load.CLIP_TEXT.ignore)
