"""Reading diffusers/transformers config dicts strictly."""

from __future__ import annotations

from typing import Any


# Fields every transformers config carries that do not change a model's forward pass.
TRANSFORMERS_GENERIC_FIELDS = frozenset({
    "attention_dropout", "dropout", "initializer_factor", "initializer_range", "architectures", "model_type",
    "torch_dtype", "dtype", "transformers_version", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "is_encoder_decoder", "tie_word_embeddings", "chunk_size_feed_forward", "problem_type",
    "add_cross_attention", "tie_encoder_decoder", "use_cache"})


class ConfigError(ValueError):
  """A model config holds a field or value that kadiff-jax does not implement."""


def read_fields(component: str, cfg: dict[str, Any], *, supported: set[str],
                fixed: dict[str, Any], ignored: set[str] = frozenset()) -> dict[str, Any]:
  """Returns the `supported` fields of `cfg`.

  Fields in `fixed` must equal the given value (the only behaviour we
  implement); `ignored` and private (`_`-prefixed) fields are skipped; any
  other field is rejected, naming it, rather than silently dropped.
  """
  out = {}
  for key, val in cfg.items():
    if key.startswith("_") or key in ignored:
      continue
    if key in fixed:
      want = fixed[key]
      if val != want and not (want in (None, False) and val in (None, False)):
        raise ConfigError(f"{component} config field {key!r} = {val!r} is not supported (only {want!r} is)")
    elif key in supported:
      out[key] = val
    else:
      raise ConfigError(f"{component} config field {key!r} = {val!r} is not known to kadiff-jax; "
                        "refusing to guess its meaning")
  return out
