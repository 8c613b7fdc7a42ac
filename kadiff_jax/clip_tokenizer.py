"""CLIP's BPE tokenizer on the `tokenizers` library alone, so a command need not import transformers.

It reads a CLIPTokenizer folder (`vocab.json`, `merges.txt`,
`tokenizer_config.json` / `special_tokens_map.json`: the layout of the SDXL
repositories' `tokenizer/` and `tokenizer_2/`) and builds the same pipeline
transformers 5's CLIPTokenizer builds from those files: NFC, whitespace runs
to one space, lower case; CLIP's split pattern; byte-level BPE with the
`</w>` word suffix; start and end tokens around the ids; truncation to
`model_max_length` keeping both, padding with the folder's pad token.
`tests/test_clip_text.py` checks it id for id against transformers.
Importing transformers costs over a second per process; `tokenizers`, 20 ms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
  """`tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]`,
  and `tokenizer(text, add_special_tokens=False)["input_ids"]`, as the transformers tokenizer is called."""

  def __init__(self, folder: str | Path):
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    folder = Path(folder)
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
      if (folder / name).is_file():
        config.update(json.loads((folder / name).read_text()))
    self.bos_token = _token(config.get("bos_token")) or "<|startoftext|>"
    self.eos_token = _token(config.get("eos_token")) or "<|endoftext|>"
    self.unk_token = _token(config.get("unk_token")) or "<|endoftext|>"
    self.pad_token = _token(config.get("pad_token")) or "<|endoftext|>"
    self.model_max_length = int(config.get("model_max_length") or 77)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=self.unk_token))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in dict.fromkeys((self.bos_token, self.eos_token, self.unk_token, self.pad_token))
                if t in vocab]
    tok.add_special_tokens(specials)
    self.bos_token_id, self.eos_token_id = vocab[self.bos_token], vocab[self.eos_token]
    self.pad_token_id = vocab.get(self.pad_token, self.eos_token_id)
    tok.post_processor = processors.RobertaProcessing((self.eos_token, self.eos_token_id),
                                                      (self.bos_token, self.bos_token_id), False, False)
    self._tok = tok

  def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, max_length: int | None = None,
               truncation: bool = False, return_tensors: str | None = None, add_special_tokens: bool = True) -> dict:
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    ids = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
    limit = max_length or self.model_max_length
    if truncation:
      ids = [i if len(i) <= limit else (i[:limit - 1] + [self.eos_token_id] if add_special_tokens else i[:limit])
             for i in ids]
    if padding == "max_length":
      ids = [i + [self.pad_token_id] * (limit - len(i)) for i in ids]
    if return_tensors == "np":
      return {"input_ids": np.asarray(ids, np.int64)}
    return {"input_ids": ids[0] if single else ids}

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(ids)).replace("</w>", " ").strip()
