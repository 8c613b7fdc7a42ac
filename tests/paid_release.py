"""The AID/PAID release's text interpolation as PAID_SPEC.md states it, in PyTorch over diffusers' SDXL pipeline:
the oracle our batched JAX frames are checked against (one call of three rows [A, M, B] per middle, conditional
pass with interpolated attention during the warm-up, unconditional pass plain, CFG, one scheduler step)."""

from __future__ import annotations

import torch


def slerp(a, b, t):
  """Spec 2: along the last axis; lerp where |cos| > 0.9995 or NaN; no renormalisation."""
  c = ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1, keepdim=True)
  theta = torch.acos(c)
  out = torch.sin(theta - theta * t) / torch.sin(theta) * a + torch.sin(theta * t) / torch.sin(theta) * b
  return torch.where((c.abs() > 0.9995) | torch.isnan(c), torch.lerp(a, b, t), out)


def _attn(q, k, v, scale):
  return torch.softmax(torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2),
                                     beta=0, alpha=scale), dim=-1) @ v


class InterpolationProcessor:
  """Spec 3 on rows [A, M, B] with coefficients (0, t, 1) while `state['on']`; plain attention otherwise."""

  def __init__(self, state, t, variant):
    self.state, self.c, self.variant = state, (0.0, t, 1.0), variant

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
    ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
    split = lambda x: attn.head_to_batch_dim(x)  # [B * heads, L, d]
    scale = attn.scale
    if not self.state["on"]:
      out = _attn(split(q), split(k), split(v), scale)
    else:
      rows = []
      for r, c in enumerate(self.c):
        qr = split(q[r:r + 1])
        kr, vr = k[r:r + 1], v[r:r + 1]
        ka, va, kb, vb = k[0:1], v[0:1], k[2:3], v[2:3]
        fused = self.variant.startswith("fused")
        cat = lambda own, e: torch.cat([own, e], dim=1) if fused else e
        if self.variant.endswith("outer"):
          oa = _attn(qr, split(cat(kr, ka)), split(cat(vr, va)), scale)
          ob = _attn(qr, split(cat(kr, kb)), split(cat(vr, vb)), scale)
          rows.append((1 - c) * oa + c * ob)
        else:
          kt, vt = (1 - c) * ka + c * kb, (1 - c) * va + c * vb
          rows.append(_attn(qr, split(cat(kr, kt)), split(cat(vr, vt)), scale))
      out = torch.cat(rows, dim=0)
    out = attn.batch_to_head_dim(out)
    return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def interpolate_single(pipe, prompt_a, prompt_b, t, z_a, z_b, *, steps, guidance=5.0, warmup_ratio=0.5,
                       variant="fused_outer", negative_prompt=None, guide_prompt=None, init="linear"):
  """(latents [3, 4, h, w], images [3, H, W, 3] in [0, 1]) of one release call: rows A, M(t), B."""
  state = {"on": False}
  pipe.unet.set_attn_processor(InterpolationProcessor(state, t, variant))
  enc = lambda p: pipe.encode_prompt(p, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                     negative_prompt=negative_prompt)
  ea, eb = enc(prompt_a), enc(prompt_b)  # (prompt, negative, pooled, negative pooled)
  if guide_prompt is not None:
    em = enc(guide_prompt)
  else:
    mix = (lambda a, b: torch.lerp(a, b, t)) if init == "linear" else (lambda a, b: slerp(a, b, t))
    em = tuple(mix(a, b) for a, b in zip(ea, eb))
  sched = pipe.scheduler
  sched.set_timesteps(steps)
  sigma = sched.init_noise_sigma
  za, zb = z_a * sigma, z_b * sigma
  x = torch.cat([za, slerp(za, zb, t), zb])
  h = z_a.shape[2] * pipe.vae_scale_factor
  ids = torch.tensor([[h, h, 0, 0, h, h]], dtype=torch.float32).repeat(3, 1)
  rows = lambda j: torch.cat([ea[j], em[j], eb[j]])
  warm = int(steps * warmup_ratio)
  for i, ts in enumerate(sched.timesteps):
    xin = sched.scale_model_input(x, ts)
    state["on"] = i < warm
    c = pipe.unet(xin, ts, encoder_hidden_states=rows(0), added_cond_kwargs={"text_embeds": rows(2),
                                                                          "time_ids": ids}).sample
    state["on"] = False
    u = pipe.unet(xin, ts, encoder_hidden_states=rows(1), added_cond_kwargs={"text_embeds": rows(3),
                                                                          "time_ids": ids}).sample
    x = sched.step(u + guidance * (c - u), ts, x).prev_sample
  images = [pipe.vae.decode(x[r:r + 1] / pipe.vae.config.scaling_factor).sample for r in range(3)]
  images = (torch.cat(images) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
  return x.numpy(), images.numpy()
