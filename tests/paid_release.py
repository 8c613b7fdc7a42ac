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


class ImageProcessor(InterpolationProcessor):
  """Spec 4 in the cross-attention layers of an IP-Adapter UNet (the release's `load_aid_ip_adapter` wrappers):
  morph (fused_outer: each branch's text and image parts read [own; endpoint]; fused_inner: text fused inner, image
  part the row's own tokens; scale 1.0) or scale control (text as spec 3, plus c_r Attn(q, Kip, Vip) always)."""

  def __init__(self, state, t, variant, mode, to_k_ip, to_v_ip):
    super().__init__(state, t, variant)
    self.mode, self.to_k_ip, self.to_v_ip = mode, to_k_ip, to_v_ip

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
    text, (tokens,) = encoder_hidden_states
    tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    split, scale = attn.head_to_batch_dim, attn.scale
    q, k, v = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
    kip, vip = self.to_k_ip(tokens), self.to_v_ip(tokens)
    out = []
    for r, c in enumerate(self.c):
      qr = split(q[r:r + 1])
      both = lambda a, e: torch.cat([a[r:r + 1], a[e:e + 1]], dim=1)
      text_part = lambda e: _attn(qr, split(both(k, e)), split(both(v, e)), scale)
      image_part = lambda e: _attn(qr, split(both(kip, e)), split(both(vip, e)), scale)
      own_text = _attn(qr, split(k[r:r + 1]), split(v[r:r + 1]), scale)
      own_image = _attn(qr, split(kip[r:r + 1]), split(vip[r:r + 1]), scale)
      if self.mode == "scale-control":
        t_r = (1 - c) * text_part(0) + c * text_part(2) if self.state["on"] else own_text
        out.append(t_r + c * own_image)
      elif not self.state["on"]:
        out.append(own_text + own_image)
      elif self.variant == "fused_outer":
        out.append((1 - c) * (text_part(0) + image_part(0)) + c * (text_part(2) + image_part(2)))
      else:  # fused_inner
        kt, vt = (1 - c) * k[0:1] + c * k[2:3], (1 - c) * v[0:1] + c * v[2:3]
        out.append(_attn(qr, split(torch.cat([k[r:r + 1], kt], 1)), split(torch.cat([v[r:r + 1], vt], 1)), scale)
                   + own_image)
    return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.cat(out))))


def image_features(pipe, image, plus):
  """(features, unconditional features) before the projection, [1, 1, ...] (one image per row)."""
  px = pipe.feature_extractor(image, return_tensors="pt").pixel_values
  if plus:
    f = pipe.image_encoder(px, output_hidden_states=True).hidden_states[-2]
    u = pipe.image_encoder(torch.zeros_like(px), output_hidden_states=True).hidden_states[-2]
  else:
    f = pipe.image_encoder(px).image_embeds
    u = torch.zeros_like(f)
  return f[:, None], u[:, None]


@torch.no_grad()
def interpolate_single(pipe, prompt_a, prompt_b, t, z_a, z_b, *, steps, guidance=5.0, warmup_ratio=0.5,
                       variant="fused_outer", negative_prompt=None, guide_prompt=None, init="linear", mode="text",
                       image_a=None, image_b=None, plus=True):
  """(latents [3, 4, h, w], images [3, H, W, 3] in [0, 1]) of one release call: rows A, M(t), B. With mode
  "morph" or "scale-control" the pipe must hold an IP-Adapter (`load_ip_adapter`)."""
  state = {"on": False}
  image = None
  if mode == "text":
    pipe.unet.set_attn_processor(InterpolationProcessor(state, t, variant))
  else:
    if not hasattr(pipe, "ip_linears"):  # the loaded adapter's per-layer projections, kept across calls
      pipe.ip_linears = {name: (p.to_k_ip[0], p.to_v_ip[0]) for name, p in pipe.unet.attn_processors.items()
                         if hasattr(p, "to_k_ip")}
    # the image projection (Resampler) has attention modules of its own: they keep their processors
    procs = {name: (proc if name.startswith("encoder_hid_proj.") else
                    ImageProcessor(state, t, variant, mode, *pipe.ip_linears[name]) if name in pipe.ip_linears
                    else InterpolationProcessor(state, t, variant))
             for name, proc in pipe.unet.attn_processors.items()}
    pipe.unet.set_attn_processor(procs)
    f_b, u = image_features(pipe, image_b, plus)
    f_a = image_features(pipe, image_a, plus)[0] if image_a is not None else u
    cond = torch.cat([f_a, torch.lerp(f_a, f_b, t), f_b]) if mode == "morph" else torch.cat([f_b] * 3)
    image = {"cond": cond, "uncond": torch.cat([u] * 3)}
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
    extra = lambda role: {} if image is None else {"image_embeds": [image[role]]}
    c = pipe.unet(xin, ts, encoder_hidden_states=rows(0), added_cond_kwargs={"text_embeds": rows(2),
                                                                          "time_ids": ids, **extra("cond")}).sample
    state["on"] = False
    u = pipe.unet(xin, ts, encoder_hidden_states=rows(1), added_cond_kwargs={"text_embeds": rows(3),
                                                                          "time_ids": ids, **extra("uncond")}).sample
    x = sched.step(u + guidance * (c - u), ts, x).prev_sample
  images = [pipe.vae.decode(x[r:r + 1] / pipe.vae.config.scaling_factor).sample for r in range(3)]
  images = (torch.cat(images) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
  return x.numpy(), images.numpy()
