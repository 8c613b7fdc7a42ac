"""Re-ranking retrieved candidates with a multimodal LLM (spec section 7), hosted in PyTorch.

The policy (`choose`) is the reference's: ask whether the top-1 entry (its
text and image) faithfully represents the query; if yes, take it. Otherwise
score every candidate's textual and visual match and take the best mean; if
no candidate could be scored, fall back to the top-1.

`MLLMReranker` asks those questions to LLaVA-OneVision (or any
`AutoModelForImageTextToText` model). Its default `scoring="logprob"` reads
the answers from next-token probabilities of a prefilled JSON answer:
p(is_match) = p(true) / (p(true) + p(false)) after `{"is_match": `, and each
score is the expected value of a single-digit grade (0-9, rescaled to 0-100).
`scoring="generate"` generates the reference's JSON instead and parses it
leniently. Images go in as PIL images; scores come out as Python floats.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


class RerankError(ValueError):
  """The re-ranker cannot be used as configured, or an answer could not be read."""


MATCH_PROMPT = (
    "Query: \"{query}\"\n"
    "Candidate description: {description}\n"
    "Look at the image and the description. Do they faithfully represent the query (the same specific entity, "
    "not just the same category)? Answer in JSON: {{\"is_match\": true or false, \"reason\": \"...\"}}")

SCORE_PROMPT = (
    "Query: \"{query}\"\n"
    "Candidate description: {description}\n"
    "Rate how well the description matches the query (textual_match_score) and how well the image matches "
    "the query (visual_match_score), each from {lo} to {hi}. Answer in JSON: "
    "{{\"textual_match_score\": <int>, \"visual_match_score\": <int>}}")


@dataclasses.dataclass
class Judgement:
  is_match: bool | None      # None: the answer could not be read
  p_match: float | None      # logprob scoring only
  reason: str | None = None
  raw: str | None = None     # generated text (generate scoring)


@dataclasses.dataclass
class Scores:
  textual: float | None      # 0-100; None: could not be read
  visual: float | None
  raw: str | None = None

  @property
  def mean(self) -> float | None:
    if self.textual is None or self.visual is None:
      return None
    return (self.textual + self.visual) / 2


class Reranker(Protocol):
  id: str

  def judge(self, query: str, description: str, image) -> Judgement:
    ...

  def score(self, query: str, description: str, image) -> Scores:
    ...


@dataclasses.dataclass
class Decision:
  chosen: str                   # docid
  rule: str                     # "is_match" | "scores" | "fallback_top1"
  judgement: dict[str, Any]     # of the top-1
  scores: dict[str, dict]       # docid -> textual/visual/mean (when scored)


def choose(query: str, candidates: Sequence[tuple[str, str, Any]], reranker: Reranker) -> Decision:
  """candidates: (docid, description, PIL image) best first -> the reference's choice."""
  if not candidates:
    raise RerankError("nothing to re-rank: the candidate list is empty")
  top, desc, image = candidates[0]
  j = reranker.judge(query, desc, image)
  judgement = {"is_match": j.is_match, "p_match": j.p_match, "reason": j.reason}
  if j.is_match:
    return Decision(top, "is_match", judgement, {})
  scored: dict[str, dict] = {}
  best, best_mean = None, -math.inf
  for docid, desc, image in candidates:
    s = reranker.score(query, desc, image)
    scored[docid] = {"textual": s.textual, "visual": s.visual, "mean": s.mean}
    if s.mean is None:
      log.warning("re-ranking %r: no usable scores for %s (%r)", query, docid, (s.raw or "")[:200])
    elif s.mean > best_mean:
      best, best_mean = docid, s.mean
  if best is None:
    log.warning("re-ranking %r: no candidate could be scored; keeping the top-1 %s", query, top)
    return Decision(top, "fallback_top1", judgement, scored)
  return Decision(best, "scores", judgement, scored)


# --- reading generated JSON ------------------------------------------------------------------------

def parse_json_answer(text: str) -> dict[str, Any] | None:
  """The first JSON-like object in a model's answer, leniently (code fences, single quotes,
  Python booleans, trailing commas); None when there is none."""
  if not text:
    return None
  for m in re.finditer(r"\{[^{}]*\}", text, re.S):
    block = m.group(0)
    for attempt in (block, re.sub(r",\s*}", "}", block)):
      try:
        v = json.loads(attempt)
        if isinstance(v, dict):
          return v
      except json.JSONDecodeError:
        pass
      try:
        v = ast.literal_eval(re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", attempt)))
        if isinstance(v, dict):
          return v
      except (ValueError, SyntaxError):
        pass
  # Last resort: "key": value pairs anywhere in the text.
  pairs = dict(re.findall(r"[\"']?(\w+)[\"']?\s*:\s*(true|false|True|False|-?\d+(?:\.\d+)?)", text))
  if not pairs:
    return None
  return {k: (v.lower() == "true") if v.lower() in ("true", "false") else float(v) for k, v in pairs.items()}


def _as_bool(v) -> bool | None:
  if isinstance(v, bool):
    return v
  if isinstance(v, str) and v.strip().lower() in ("true", "yes", "false", "no"):
    return v.strip().lower() in ("true", "yes")
  return None


def _as_score(v, hi: float) -> float | None:
  try:
    x = float(v)
  except (TypeError, ValueError):
    return None
  if not math.isfinite(x) or x < 0 or x > hi:
    return None
  return x * 100.0 / hi


# --- LLaVA-OneVision input building -------------------------------------------------------------------

def onevision_image_tokens(orig_hw: tuple[int, int], *, base_size: int, grid_pinpoints, patches: int,
                           max_crops: int, feature_strategy: str = "full") -> int:
  """How many <image> tokens LLaVA-OneVision's vision side yields for an image of `orig_hw`.

  The base view gives patches^2 features; the anyres crops give a grid of
  patches x (rows, cols) with the letterbox padding removed, one newline token
  per row, and the grid is shrunk when it exceeds `max_crops` crops' worth.
  """
  from transformers.image_processing_utils import select_best_resolution
  h, w = orig_hw
  best_h, best_w = select_best_resolution((h, w), grid_pinpoints)
  rows, cols = patches * (best_h // base_size), patches * (best_w // base_size)
  if w / h > cols / rows:   # wider than the grid: bands of padding at top and bottom
    rows -= 2 * ((rows - int(round(h * (cols / w), 7))) // 2)
  else:
    cols -= 2 * ((cols - int(round(w * (rows / h), 7))) // 2)
  grid, newlines = rows * cols, rows
  shrink = math.sqrt(rows * cols / (max_crops * patches ** 2))
  if shrink > 1.1:
    grid, newlines = int(rows // shrink) * int(cols // shrink), int(rows // shrink)
  n = grid + newlines + patches ** 2
  return n - 1 if feature_strategy == "default" else n


def to_numpy(t) -> np.ndarray:
  """The one torch -> numpy crossing: detached, fp32, on the host."""
  return t.detach().float().cpu().numpy()


class MLLMReranker:
  """LLaVA-OneVision (default) or any AutoModelForImageTextToText, in PyTorch (bf16 on GPU)."""

  def __init__(self, model: str, *, scoring: str = "logprob", device: str | None = None, dtype: str | None = None,
               max_new_tokens: int = 96):
    if scoring not in ("logprob", "generate"):
      raise RerankError(f"scoring = {scoring!r}; expected 'logprob' or 'generate'")
    try:
      import torch
      from transformers import AutoConfig, AutoModelForImageTextToText
    except ImportError:
      raise RerankError("the MLLM re-ranker needs torch and transformers (pip install 'kadiff-jax[rerank]')") \
          from None
    self.id, self.scoring, self.max_new_tokens = model, scoring, max_new_tokens
    from kadiff_jax.weights.files import CheckpointNotFound, resolve_model
    try:
      if model == "tiny":  # a random LLaVA-OneVision in the cache, made on first use (answers are noise)
        from kadiff_jax.tiny_model import tiny_part
        folder = tiny_part("mllm")
      else:
        folder = resolve_model(model)
    except CheckpointNotFound as e:
      raise RerankError(f"re-ranker {model!r}: {e}") from None
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[dtype]
    if torch_dtype is None:
      torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
    try:
      self.config = AutoConfig.from_pretrained(folder)
      self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype).to(self.device).eval()
    except (OSError, ValueError) as e:
      raise RerankError(f"could not load re-ranker model {model!r}: {e}") from None
    self._onevision = self.config.model_type == "llava_onevision"
    if self._onevision:
      # Built from the tokenizer and image processor: transformers' LlavaOnevisionProcessor cannot be
      # constructed without torchvision, and the token count below is all it adds.
      from transformers import AutoImageProcessor, AutoTokenizer
      self.tokenizer = AutoTokenizer.from_pretrained(folder)
      self.image_processor = AutoImageProcessor.from_pretrained(folder)
      # The processor's template (it knows image content items) before the tokenizer's text-only one.
      self.chat_template = _read_chat_template(folder) or self.tokenizer.chat_template
      vc = self.config.vision_config
      self._patches = vc.image_size // vc.patch_size
    else:
      from transformers import AutoProcessor
      self.processor = AutoProcessor.from_pretrained(folder)
      self.tokenizer = self.processor.tokenizer
      self.chat_template = getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template
    if not self.chat_template:
      raise RerankError(f"re-ranker {model!r} has no chat template")
    if scoring == "logprob":
      self._bool = self._answer_tokens('{"is_match":', ["true", "false"])
      self._text_digits = self._answer_tokens('{"textual_match_score":', [str(d) for d in range(10)])
      self._visual_digits = self._answer_tokens('{"visual_match_score":', [str(d) for d in range(10)])

  def _answer_tokens(self, prefix: str, answers: list[str]) -> tuple[str, list[int]]:
    """(prompt prefix, token ids) such that prefix + answer tokenises as prefix's tokens + one token.

    Tokenisers differ in whether the space before an answer belongs to the
    answer (" true" in Qwen2) or stands alone (" ", "8" for Qwen2 digits),
    so both placements are tried.
    """
    enc = lambda t: self.tokenizer.encode(t, add_special_tokens=False)
    for pre, sep in ((prefix, " "), (prefix + " ", "")):
      base = enc(pre)
      ids = []
      for a in answers:
        full = enc(pre + sep + a)
        if full[:len(base)] != base or len(full) != len(base) + 1:
          break
        ids.append(full[-1])
      else:
        if len(set(ids)) == len(ids):
          return pre, ids
    raise RerankError(f"logprob scoring needs each of {answers} to be one token after {prefix!r} for "
                      f"{self.id!r}; use scoring='generate'")

  # --- inputs ---------------------------------------------------------------------------------------
  def _inputs(self, prompt: str, image, answer_prefix: str) -> dict:
    import torch
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if self._onevision:
      text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                add_generation_prompt=True) + answer_prefix
      pix = self.image_processor(images=[image], return_tensors="pt")
      h, w = image.height, image.width
      cfg = self.config
      size = self.image_processor.size
      base = min(size["height"], size["width"]) if "height" in size else size["shortest_edge"]
      n = onevision_image_tokens(
          (h, w), base_size=base, grid_pinpoints=cfg.image_grid_pinpoints, patches=self._patches,
          max_crops=int(cfg.vision_aspect_ratio.removeprefix("anyres_max_")),
          feature_strategy=cfg.vision_feature_select_strategy)
      image_token = self.tokenizer.convert_ids_to_tokens(cfg.image_token_index)
      if text.count(image_token) != 1:
        raise RerankError(f"the chat template rendered {text.count(image_token)} {image_token} tokens; expected 1")
      ids = self.tokenizer(text.replace(image_token, image_token * n), add_special_tokens=False,
                           return_tensors="pt")
      inputs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
                "pixel_values": pix["pixel_values"], "image_sizes": pix["image_sizes"]}
      if "batch_num_images" in pix:
        inputs["batch_num_images"] = pix["batch_num_images"]
    else:
      text = self.processor.apply_chat_template(messages, add_generation_prompt=True) + answer_prefix
      inputs = dict(self.processor(images=[image], text=text, return_tensors="pt"))
    out = {}
    for k, v in inputs.items():
      if isinstance(v, torch.Tensor):
        v = v.to(self.device)
        if v.is_floating_point():
          v = v.to(self.model.dtype)
      out[k] = v
    return out

  def _next_token_logprobs(self, prompt: str, image, answer_prefix: str) -> np.ndarray:
    import torch
    with torch.no_grad():
      logits = self.model(**self._inputs(prompt, image, answer_prefix)).logits[0, -1]
    return to_numpy(torch.log_softmax(logits.float(), -1))

  def _generate(self, prompt: str, image) -> str:
    import torch
    inputs = self._inputs(prompt, image, "")
    with torch.no_grad():
      out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
    return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

  # --- the two questions -----------------------------------------------------------------------------
  def judge(self, query: str, description: str, image) -> Judgement:
    prompt = MATCH_PROMPT.format(query=query, description=description)
    if self.scoring == "logprob":
      prefix, ids = self._bool
      lp = self._next_token_logprobs(prompt, image, prefix)[ids]
      p = float(np.exp(lp[0] - np.logaddexp(lp[0], lp[1])))
      return Judgement(p > 0.5, p)
    raw = self._generate(prompt, image)
    ans = parse_json_answer(raw) or {}
    reason = ans.get("reason")
    return Judgement(_as_bool(ans.get("is_match")), None, str(reason) if reason is not None else None, raw)

  def score(self, query: str, description: str, image) -> Scores:
    if self.scoring == "logprob":
      prompt = SCORE_PROMPT.format(query=query, description=description, lo=0, hi=9)
      values = []
      for prefix, ids in (self._text_digits, self._visual_digits):
        lp = self._next_token_logprobs(prompt, image, prefix)[ids]
        p = np.exp(lp - lp.max())
        values.append(float((p / p.sum()) @ np.arange(10)) * 100.0 / 9.0)
      return Scores(values[0], values[1])
    raw = self._generate(SCORE_PROMPT.format(query=query, description=description, lo=0, hi=100), image)
    ans = parse_json_answer(raw) or {}
    return Scores(_as_score(ans.get("textual_match_score"), 100), _as_score(ans.get("visual_match_score"), 100),
                  raw)


def _read_chat_template(folder: Path) -> str | None:
  for name in ("chat_template.jinja", "chat_template.json"):
    p = folder / name
    if p.is_file():
      return json.loads(p.read_text())["chat_template"] if name.endswith(".json") else p.read_text()
  return None
