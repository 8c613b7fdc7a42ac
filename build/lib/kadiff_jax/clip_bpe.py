"""Builds a small CLIP byte-level BPE vocabulary locally (no download).

The files written (`vocab.json`, `merges.txt`, tokenizer configs) have the
layout of openai/clip-vit-large-patch14's tokenizer, so transformers'
`CLIPTokenizer` loads them; only the vocabulary is smaller: the 256 byte
symbols, the same with the end-of-word mark `</w>`, merges learned from a
built-in word list, then `<|startoftext|>` and `<|endoftext|>` last (so the
end-of-text id is the highest, as in CLIP).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

_CORPUS = """a photo of a cat dog backpack bear plushie berry bowl can candle clock colorful sneaker
duck toy fancy boot grey sloth monster toy pink sunglasses poop emoji rc car red cartoon robot shiny
sneaker teapot vase wolf plushie in the snow on the beach jungle with city background mountain blue
house wearing santa hat rainbow scarf black top purple wizard outfit best quality high quality
monochrome lowres bad anatomy worst low sitting floating water cube shaped an astronaut riding horse
painting style of van gogh under eiffel tower rare concept flower bird reference generated image"""


def bytes_to_unicode() -> dict[int, str]:
  """CLIP/GPT-2's reversible byte -> printable unicode map."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE on words split into byte symbols with `</w>` on the last one."""
  enc = bytes_to_unicode()
  counts = collections.Counter(words)
  seqs = {w: [enc[b] for b in w.encode()] for w in counts}
  for s in seqs.values():
    s[-1] += "</w>"
  merges = []
  for _ in range(num_merges):
    pairs: collections.Counter = collections.Counter()
    for w, s in seqs.items():
      for a, b in zip(s, s[1:]):
        pairs[(a, b)] += counts[w]
    if not pairs:
      break
    best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
    merges.append(best)
    for w, s in seqs.items():
      i, out = 0, []
      while i < len(s):
        if i + 1 < len(s) and (s[i], s[i + 1]) == best:
          out.append(s[i] + s[i + 1])
          i += 2
        else:
          out.append(s[i])
          i += 1
      seqs[w] = out
  return merges


def write_tokenizer(folder: Path, vocab_size: int, pad_token: str = "<|endoftext|>", max_length: int = 77) -> None:
  """Writes a CLIPTokenizer folder with exactly `vocab_size` tokens."""
  enc = bytes_to_unicode()
  base = list(enc.values()) + [c + "</w>" for c in enc.values()]
  n_merges = vocab_size - len(base) - 2
  if n_merges < 0:
    raise ValueError(f"vocab_size={vocab_size} is below the {len(base) + 2} byte and special tokens")
  merges = learn_merges(_CORPUS.split(), n_merges)
  tokens = base + ["".join(m) for m in merges]
  tokens += [f"<pad{i}>" for i in range(vocab_size - 2 - len(tokens))]  # only if the corpus ran out of pairs
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != vocab_size:
    raise AssertionError(f"built {len(vocab)} distinct tokens, expected {vocab_size}")
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": pad_token}
  (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
       "errors": "replace", "add_prefix_space": False, **special}, indent=2))
