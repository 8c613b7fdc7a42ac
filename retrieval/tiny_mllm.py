"""A tiny random LLaVA-OneVision (Qwen2 + SigLIP) saved in the Hugging Face format.

For tests and demos of the re-ranker without the 7B weights: the folder loads
with `AutoProcessor` / `AutoModelForImageTextToText` like the real one. Its
tokenizer is a byte-level BPE trained here on a few sentences, with the Qwen2
chat markers and the `<image>` / `<video>` tokens; its answers are random.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_TRAINING_TEXT = [
    "Does the description and image faithfully represent the query? Answer yes or no.",
    "Rate how well the text matches from 0 to 9. Rate how well the image matches from 0 to 9.",
    '{"is_match": true, "reason": "the image shows it"} {"is_match": false}',
    '{"textual_match_score": 87, "visual_match_score": 42} 0 1 2 3 4 5 6 7 8 9 yes no true false',
    "a corgi dog with its tongue out, a red backpack, a teapot made of clay, a rubber duck",
]


def make_tiny_mllm(folder: str | os.PathLike, seed: int = 0) -> Path:
  """Writes the tiny model + processor to `folder` and returns it."""
  import torch
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                            LlavaOnevisionImageProcessor, PreTrainedTokenizerFast,
                            Qwen2Config, SiglipVisionConfig)

  folder = Path(folder)
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # Repeated so that the answer words become single tokens, as they are in Qwen2's vocabulary.
  tok.train_from_iterator(_TRAINING_TEXT + ["true false yes no"] * 20, trainers.BpeTrainer(
      vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      additional_special_tokens=specials[1:], chat_template=CHAT_TEMPLATE)
  image_token, video_token = tok.token_to_id("<image>"), tok.token_to_id("<video>")

  size, patch = 32, 16
  pinpoints = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
  config = LlavaOnevisionConfig(
      text_config=Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=2048, eos_token_id=tok.token_to_id("<|im_end|>"),
                              pad_token_id=tok.token_to_id("<|endoftext|>"), tie_word_embeddings=False),
      vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=size, patch_size=patch),
      image_token_index=image_token, video_token_index=video_token, image_grid_pinpoints=pinpoints,
      vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
  torch.manual_seed(seed)
  model = LlavaOnevisionForConditionalGeneration(config).eval()
  image_processor = LlavaOnevisionImageProcessor(size={"height": size, "width": size},
                                                 image_grid_pinpoints=pinpoints, crop_size=size)
  folder.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  image_processor.save_pretrained(folder)
  # What LlavaOnevisionProcessor.save_pretrained writes (the class itself needs torchvision to be built).
  (folder / "processor_config.json").write_text(json.dumps({
      "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (size // patch) ** 2,
      "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
      "image_token": "<image>", "video_token": "<video>"}, indent=1))
  (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
  return folder
