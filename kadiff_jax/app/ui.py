"""The page of `kadiff app` (Gradio): one tab per method that is loaded, each a thin layer over `AppService`.

Tabs: knowledge-augmented generation (with an index), KA-Diff from your own
reference, attention interpolation, one-step RAG-Turbo (with an H-space
database). Every button is also an API endpoint
(`api_name`), which is how the tests drive the page with `gradio_client`.
Errors become a message in the page (`gr.Error`), never a dead page; the
queue runs one request at a time, so two users never share a folder or race
on the models; each session writes under its own folder.
"""

from __future__ import annotations

import functools
import logging

import gradio as gr

from kadiff_jax.app.service import MASK_SOURCES, AppService

# small outputs (a tiny model's 64 px) fill their panel, pixels kept sharp
CSS = ".kadiff-out img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}"
MASK_HELP = ("auto: from the reference's cross-attention; drawn: paint over the concept on the reference; "
             "uploaded: a mask image (white = concept); none: the whole reference")


def page_errors(fn):
  """Runs `fn`; an error reaches the page as one line (`gr.Error`) instead of a traceback."""
  @functools.wraps(fn)
  def run(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except gr.Error:
      raise
    except Exception as e:
      from kadiff_jax.cli import _one_line
      logging.getLogger("kadiff_jax").warning("%s: %s", fn.__name__, _one_line(e), exc_info=log_tracebacks())
      raise gr.Error(_one_line(e), print_exception=False) from None
  return run


def log_tracebacks() -> bool:
  """The server's log shows an error's traceback at -v (debug level), its one line always."""
  return logging.getLogger("kadiff_jax").isEnabledFor(logging.DEBUG)


def as_json(record: dict) -> str:
  """A record as the page shows it: JSON text (a JSON component would take {"path": ...} for a file to serve)."""
  import json
  return json.dumps(record, indent=1, default=str)


def _session(request: gr.Request | None) -> str | None:
  return getattr(request, "session_hash", None)


def _editor_parts(value) -> tuple:
  """(reference image or None, drawn layers) from an ImageEditor value."""
  if not value:
    return None, []
  return value.get("background"), [layer for layer in value.get("layers") or [] if layer is not None]


def _number(value, name: str, cast=int):
  if value is None or value == "":
    return None
  try:
    return cast(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} = {value!r}: expected a number") from None


def _kadiff_options(steps, threshold=None, inject_layers=None, inject_steps=None, use_init_latents=None) -> dict:
  from kadiff_jax.kadiff.options import parse_step_range
  return {"steps": _number(steps, "steps"), "threshold": _number(threshold, "threshold", float),
          "inject_layers": (inject_layers or "").strip() or None,
          "inject_steps": parse_step_range(inject_steps.strip()) if (inject_steps or "").strip() else None,
          "use_init_latents": bool(use_init_latents) if use_init_latents is not None else None}


def candidate_label(i: int, c: dict) -> str:
  """'0. Chow Chow (dog2, 0.696)', with the re-ranker's mean score when it scored the candidate."""
  mean = (c.get("rerank") or {}).get("mean")
  return f"{i}. {c['title']} ({c['id']}, {c['score']:.3f}" + (f", re-rank {mean:.2f}" if mean is not None else "") + ")"


def _run_outputs(r) -> tuple:
  return (str(r.mask_overlay), str(r.baseline) if r.baseline else None, str(r.ours), str(r.grid), as_json(r.record),
          str(r.record_path), str(r.folder))


def _result_panel(prefix: str) -> list:
  """A KA-Diff run's outputs, in `_run_outputs`' order: mask used, baseline, ours, grid, record, its file, and
  the run's folder (kept in the session for the correspondence button)."""
  with gr.Row():
    overlay = gr.Image(label="mask used", height=280, elem_classes="kadiff-out")
    baseline = gr.Image(label="baseline (IP-Adapter)", height=280, elem_classes="kadiff-out")
    ours = gr.Image(label="ours (KA-Diff)", height=280, elem_id=f"{prefix}-ours", elem_classes="kadiff-out")
  with gr.Accordion("grid and record", open=False):
    grid = gr.Image(label="reference | mask | baseline | ours")
    record = gr.Code(label="record", language="json")
    record_file = gr.File(label="record (JSON)")
  return [overlay, baseline, ours, grid, record, record_file, gr.State(None)]


def _knowledge_tab(service: AppService) -> None:
  with gr.Tab("Knowledge-augmented generation", id="knowledge"):
    gr.Markdown("A prompt retrieves reference candidates from the index; the chosen one (pick another if you like) "
                "lends its look to the new image through KA-Diff.")
    with gr.Row():
      query = gr.Textbox(label="prompt", placeholder="a chow chow in the snow", scale=3, elem_id="ka-prompt")
      concept = gr.Textbox(label="concept to retrieve (default: the prompt)", scale=2)
      k = gr.Slider(1, 10, value=5, step=1, label="candidates")
      retrieve = gr.Button("Retrieve", variant="primary", elem_id="ka-retrieve")
    decision = gr.Markdown()
    gallery = gr.Gallery(label="candidates (dense score; re-ranking scores when re-ranked)", columns=5, height=260,
                         allow_preview=False, elem_id="ka-candidates")
    state = gr.State(None)
    with gr.Row():
      choice = gr.Dropdown(label="reference", choices=[], value=None, interactive=True, elem_id="ka-choice")
      mask_source = gr.Radio(list(MASK_SOURCES), value="auto", label="concept mask", info=MASK_HELP)
      seed = gr.Number(0, label="seed", precision=0, elem_id="ka-seed")
      steps = gr.Number(50, label="steps", precision=0, elem_id="ka-steps")
    with gr.Row():
      editor = gr.ImageEditor(label="chosen reference (draw over the concept for mask 'drawn')", type="numpy",
                              sources=(), height=320, elem_id="ka-reference")
      mask_file = gr.Image(label="mask file (for 'uploaded')", type="filepath", height=320)
    generate = gr.Button("Generate", variant="primary", elem_id="ka-generate")
    results = _result_panel("ka")

    @page_errors
    def do_retrieve(query_text, concept_text, k_value, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
      progress(0, desc="retrieving")
      s = service.retrieve(_session(request), query_text, concept_text, int(k_value))
      labels = [(candidate_label(i, c), i) for i, c in enumerate(s["candidates"])]
      pics = [(c["picture"], label) for c, (label, _) in zip(s["candidates"], labels)]
      line = s["line"] if s["chosen"] is not None else f"**{s['line']}**: pick a candidate to use one anyway"
      if s["rerank"]:
        j = s["rerank"]["top1_judgement"]
        line += (f"  \nre-ranked ({s['rerank']['rule']}): the top-1 judged "
                 f"{'a match' if j.get('is_match') else 'no match'}"
                 + (f" (p = {j['p_match']:.2f})" if j.get("p_match") is not None else "")
                 + (f": {j['reason']}" if j.get("reason") else ""))
      chosen = s["chosen"]
      shown = s["candidates"][0 if chosen is None else chosen]["picture"]
      return (s, line, pics, gr.Dropdown(choices=labels, value=chosen),
              {"background": shown, "layers": [], "composite": shown})

    retrieve.click(do_retrieve, [query, concept, k], [state, decision, gallery, choice, editor], api_name="retrieve")

    def pick(s, index):
      if not s or index is None:
        return gr.update()
      shown = s["candidates"][int(index)]["picture"]
      return {"background": shown, "layers": [], "composite": shown}

    choice.input(pick, [state, choice], editor, api_visibility="private")

    def select(evt: gr.SelectData):
      return evt.index

    gallery.select(select, None, choice, api_visibility="private").then(pick, [state, choice], editor,
                                                                        api_visibility="private")

    @page_errors
    def do_generate(s, index, prompt, mask_kind, drawn, mask_path, seed_value, steps_value, request: gr.Request,
                    progress=gr.Progress(track_tqdm=True)):
      progress(0, desc="KA-Diff")
      _, layers = _editor_parts(drawn)
      r = service.generate_retrieved(_session(request), s, None if index is None else int(index), prompt,
                                     seed=_number(seed_value, "seed") or 0, mask_source=mask_kind, drawn=layers,
                                     mask_file=mask_path, **_kadiff_options(steps_value))
      return _run_outputs(r)

    generate.click(do_generate, [state, choice, query, mask_source, editor, mask_file, seed, steps],
                   results, api_name="generate_retrieved")


def _reference_tab(service: AppService) -> None:
  with gr.Tab("From your reference", id="reference"):
    gr.Markdown("Upload a reference, say what it shows and what to make; KA-Diff carries the concept's look into "
                "the new image. The baseline is the plain IP-Adapter image from the same noise.")
    with gr.Row():
      editor = gr.ImageEditor(label="reference (draw over the concept for mask 'drawn')", type="numpy",
                              sources=("upload", "clipboard"), height=360, elem_id="ref-reference")
      with gr.Column():
        ref_prompt = gr.Textbox(label="ref_prompt: what the reference shows", placeholder="a dog",
                                elem_id="ref-ref-prompt")
        prompt = gr.Textbox(label="prompt", placeholder="a dog in the snow", elem_id="ref-prompt")
        mask_source = gr.Radio(list(MASK_SOURCES), value="auto", label="concept mask", info=MASK_HELP)
        mask_file = gr.Image(label="mask file (for 'uploaded')", type="filepath", height=160)
        seed = gr.Number(0, label="seed", precision=0)
    with gr.Accordion("KA-Diff options", open=False):
      with gr.Row():
        steps = gr.Number(50, label="steps", precision=0, elem_id="ref-steps")
        threshold = gr.Number(0.7, label="threshold (cosine distance)")
        layers = gr.Textbox(label="inject layers (empty: the release's for this model)",
                            placeholder=service.pipe.options().inject_layers)
        inject_steps = gr.Textbox(label="inject steps START-END (empty: 19-49 of 50, scaled)")
        init = gr.Checkbox(False, label="init latents from the inverted reference (spec 5)")
    generate = gr.Button("Generate", variant="primary", elem_id="ref-generate")
    results = _result_panel("ref")
    correspond = gr.Button("Draw the correspondence of this run", elem_id="ref-correspondence")
    figures = gr.Gallery(label="correspondence (matches, distances, injected positions, cross-attention)",
                         columns=2, height=420, elem_id="ref-figures")
    summary = gr.Code(label="correspondence summary", language="json")

    @page_errors
    def do_generate(value, ref_text, prompt_text, mask_kind, mask_path, seed_value, steps_value, threshold_value,
                    layers_text, steps_text, init_value, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
      progress(0, desc="KA-Diff")
      reference, drawn = _editor_parts(value)
      r = service.generate(_session(request), prompt_text, reference, ref_text, seed=_number(seed_value, "seed") or 0,
                           mask_source=mask_kind, drawn=drawn, mask_file=mask_path,
                           **_kadiff_options(steps_value, threshold_value, layers_text, steps_text, init_value))
      return _run_outputs(r)

    generate.click(do_generate, [editor, ref_prompt, prompt, mask_source, mask_file, seed, steps, threshold, layers,
                                 inject_steps, init],
                   results, api_name="generate")

    @page_errors
    def do_correspondence(folder, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
      progress(0, desc="correspondence")
      paths, found = service.correspondence(_session(request), folder)
      return [(str(p), p.stem.replace("_", " ")) for p in paths], as_json(found)

    correspond.click(do_correspondence, [results[-1]], [figures, summary], api_name="correspondence")


def _interpolation_tab(service: AppService) -> None:
  from kadiff_jax.interpolation.attention import VARIANTS
  with gr.Tab("Attention interpolation", id="interpolation"):
    gr.Markdown("Frames between two prompts by interpolating attention (AID; PAID with a guide prompt); morph "
                "between two images or walk toward one with the IP-Adapter.")
    with gr.Row():
      prompt_a = gr.Textbox(label="prompt A (first frame)", placeholder="a photo of a cat", elem_id="int-a")
      prompt_b = gr.Textbox(label="prompt B (last frame)", placeholder="a photo of a dog", elem_id="int-b")
      guide = gr.Textbox(label="guide prompt (PAID, optional)")
    with gr.Row():
      frames = gr.Slider(3, 9, value=5, step=1, label="frames")
      seed = gr.Number(0, label="seed", precision=0)
      steps = gr.Number(50, label="steps", precision=0, elem_id="int-steps")
      variant = gr.Dropdown(list(VARIANTS), value="fused_outer", label="variant")
      mode = gr.Radio(["text", "morph", "scale-control"], value="text", label="mode")
    with gr.Row():
      image_a = gr.Image(label="image A (morph)", type="filepath", height=200)
      image_b = gr.Image(label="image B (morph, scale-control)", type="filepath", height=200)
    go = gr.Button("Interpolate", variant="primary", elem_id="int-go")
    gallery = gr.Gallery(label="frames", columns=9, object_fit="contain", elem_id="int-frames")
    with gr.Row():
      strip = gr.Image(label="strip")
      gif = gr.Image(label="animation (GIF)", elem_id="int-gif", elem_classes="kadiff-out")
    with gr.Accordion("record", open=False):
      record = gr.Code(label="interpolation.json", language="json")
      record_file = gr.File(label="interpolation.json")

    @page_errors
    def do_interpolate(a, b, guide_text, n, seed_value, steps_value, variant_name, mode_name, img_a, img_b,
                       request: gr.Request, progress=gr.Progress(track_tqdm=True)):
      progress(0, desc="interpolating")
      paths, strip_path, gif_path, rec = service.interpolate(
          _session(request), a, b, frames=int(n), seed=_number(seed_value, "seed") or 0, guide_prompt=guide_text,
          mode=mode_name, image_a=img_a, image_b=img_b, steps=_number(steps_value, "steps"), variant=variant_name)
      pics = [(str(p), f"t = {c:.3f}") for p, c in zip(paths, rec["coefficients"])]
      return pics, str(strip_path), str(gif_path), as_json(rec), str(strip_path.parent / "interpolation.json")

    go.click(do_interpolate, [prompt_a, prompt_b, guide, frames, seed, steps, variant, mode, image_a, image_b],
             [gallery, strip, gif, record, record_file], api_name="interpolate")


def _rag_turbo_tab(service: AppService) -> None:
  with gr.Tab("RAG-Turbo (one step)", id="rag-turbo"):
    gr.Markdown("One-step generation with the retrieved entry's H-space features blended into the UNet's "
                "(ImageRAGTurbo): the prompt finds its neighbours in the H-space database by the model's own text "
                "encoder; slerp is training-free (w weights the prompt's own map; 1 = no injection).")
    with gr.Row():
      prompt = gr.Textbox(label="prompt", placeholder="a boat on the water with a lighthouse", elem_id="rt-prompt")
      seed = gr.Number(0, label="seed", precision=0)
    with gr.Row():
      k = gr.Slider(1, min(8, len(service.database)), value=1, step=1, label="neighbours (k)")
      w = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="w (slerp)")
      injection = gr.Radio(["slerp"] + (["adapter"] if service.hspace_adapter else []), value="slerp",
                           label="injection")
      steps = gr.Number(service.pipe.models.family.steps, label="steps (the model family's default)", precision=0,
                        elem_id="rt-steps")
    go = gr.Button("Generate", variant="primary", elem_id="rt-go")
    with gr.Row():
      plain = gr.Image(label="plain (same noise, no retrieval)", height=320, elem_classes="kadiff-out")
      ours = gr.Image(label="RAG-Turbo", height=320, elem_id="rt-ours", elem_classes="kadiff-out")
    neighbours = gr.Gallery(label="retrieved (λ: text-key cosine)", columns=4, height=260, object_fit="contain",
                            allow_preview=False, elem_id="rt-neighbours")
    with gr.Accordion("record", open=False):
      record = gr.Code(label="image.json", language="json")
      record_file = gr.File(label="image.json")

    @page_errors
    def do_generate(prompt_text, seed_value, k_value, w_value, injection_name, steps_value, request: gr.Request,
                    progress=gr.Progress(track_tqdm=True)):
      progress(0, desc="retrieving and generating")
      ours_path, plain_path, pictures, rec = service.rag_turbo(
          _session(request), prompt_text, seed=_number(seed_value, "seed") or 0, k=int(k_value), w=float(w_value),
          injection=injection_name, steps=_number(steps_value, "steps"))
      return (str(plain_path), str(ours_path), [(str(p), c) for p, c in pictures], as_json(rec),
              str(ours_path.with_suffix(".json")))

    go.click(do_generate, [prompt, seed, k, w, injection, steps], [plain, ours, neighbours, record, record_file],
             api_name="rag_turbo")


def build(service: AppService) -> gr.Blocks:
  """The page: what is loaded, then one tab per method that can run with it."""
  with gr.Blocks(title="kadiff app") as page:
    gr.Markdown("## kadiff: knowledge-augmented and attention-level generation\n" + service.describe(),
                elem_id="loaded")
    with gr.Tabs():
      if service.retriever is not None:
        _knowledge_tab(service)
      _reference_tab(service)
      _interpolation_tab(service)
      if service.database is not None:
        _rag_turbo_tab(service)
  page.queue(default_concurrency_limit=1)
  return page
