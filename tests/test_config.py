"""Options as the single source of truth: flags derived from dataclasses, YAML configs, key=value overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kadiff_jax import cli, cli_args, config
from kadiff_jax.kadiff.options import KADiffOptions
from kadiff_jax.pipelines.text_to_image import GenerationOptions
from kadiff_jax.sharding import DistributedOptions
from kadiff_jax.weights.options import ModelOptions

CONFIGS = Path(__file__).parents[1] / "configs"


def _parse(*argv):
  return cli_args.parse(cli.build_parser(), [str(a) for a in argv])


def test_every_option_field_has_exactly_one_flag_and_no_argparse_default():
  parser = cli.build_parser()
  gen = parser._subparsers._group_actions[0].choices["generate"]
  by_dest = {a.dest: a for a in gen._actions}
  for cls in (ModelOptions, GenerationOptions, KADiffOptions, DistributedOptions):
    for f in dataclasses.fields(cls):
      action = by_dest[f.name]
      assert action.default is None, f.name  # the default lives in the dataclass only
      assert f.metadata["help"], f.name
  assert by_dest["inject_layers"].option_strings == ["--inject-layers"]
  assert by_dest["use_init_latents"].option_strings == ["--use-init-latents", "--no-use-init-latents"]


def test_precedence_file_then_key_value_then_flag(tmp_path):
  cfg = tmp_path / "c.yaml"
  cfg.write_text("steps: 7\nthreshold: 0.5\ninject_steps: 2-5\nmode: masactrl\ninject: [k]\n"
                 "mask_threshold: 0.25\nmask_words: [dog, puppy]\n")
  args = _parse("generate", "--config", cfg, "--out", tmp_path / "o")
  opts = config.build(KADiffOptions, args)
  assert (opts.steps, opts.threshold, opts.inject_steps, opts.mode, opts.inject) == (7, 0.5, (2, 5), "masactrl",
                                                                                      ("k",))
  assert opts.mask_threshold == 0.25 and opts.mask_words == ("dog", "puppy")  # YAML values keep their types
  flags = config.build(KADiffOptions, _parse("generate", "--mask-threshold", "otsu", "--inject-steps", "3-4",
                                             "--mask-words", "dog, puppy", "--out", "o"))
  assert (flags.mask_threshold, flags.inject_steps, flags.mask_words) == ("otsu", (3, 4), ("dog", "puppy"))
  args = _parse("generate", "--config", cfg, "steps=9", "threshold=0.25", "--out", tmp_path / "o")
  assert (config.build(KADiffOptions, args).steps, config.build(KADiffOptions, args).threshold) == (9, 0.25)
  args = _parse("generate", "steps=9", "--config", cfg, "--steps", "11", "--out", tmp_path / "o")
  assert config.build(KADiffOptions, args).steps == 11  # a flag beats both, wherever it stands
  # nothing given: the dataclass default
  assert config.build(KADiffOptions, _parse("generate", "--out", tmp_path / "o")) == KADiffOptions()
  # a config file may supply required arguments too
  cfg.write_text(f"out: {tmp_path / 'from_file'}\n")
  assert _parse("generate", "--config", cfg).out == str(tmp_path / "from_file")
  with pytest.raises(cli_args.UsageError, match=r"needs --out \(or config key 'out'\)"):
    _parse("generate", "--prompt", "x")


def test_unknown_keys_name_the_nearest_valid_one(tmp_path, capsys):
  cfg = tmp_path / "c.yaml"
  cfg.write_text("stpes: 7\n")
  with pytest.raises(config.ConfigKeyError, match="unknown config .* key 'stpes'; did you mean 'steps'"):
    _parse("generate", "--config", cfg, "--out", "o")
  with pytest.raises(config.ConfigKeyError, match="key 'treshold'; did you mean 'threshold'"):
    _parse("generate", "treshold=0.5", "--out", "o")
  assert cli.main(["generate", "inject_layer=44-70", "--out", "o"]) == 2
  assert "did you mean 'inject_layers'" in capsys.readouterr().err
  cfg.write_text("kadiff:\n  steps: 7\n")
  with pytest.raises(ValueError, match="flat mapping"):
    _parse("generate", "--config", cfg, "--out", "o")
  with pytest.raises(ValueError, match=r"threshold='high': could not convert"):
    config.build(KADiffOptions, {"threshold": "high"})
  # a bad value is one line naming the field, from the dataclass, before any model loads
  assert cli.main(["generate", "mode=kadiff", "--mode", "paint", "--reference", "x.png", "--out", "o"]) == 2
  assert "mode='paint': expected one of" in capsys.readouterr().err


@pytest.mark.parametrize("name,command,extra", [
    ("kadiff_sdxl_release.yaml", ["generate"], ["--out", "o"]),
    ("sdxl_base.yaml", ["generate"], ["--out", "o"]),
    ("dreambooth_eval.yaml", ["evaluate", "dreambooth"], ["--out", "o"]),
    ("retrieval_wit.yaml", ["retrieve", "build"], []),
    ("tpu_pod_batch.yaml", ["generate"], ["--out", "o"]),
])
def test_shipped_configs_load_for_their_command(name, command, extra):
  args = _parse(*command, "--config", CONFIGS / name, *extra)
  keys = yaml.safe_load((CONFIGS / name).read_text())
  for key, value in keys.items():
    got = getattr(args, key)
    assert got == value or str(got) == str(value), (key, got, value)
  if "mode" in keys or "threshold" in keys:
    opts = config.build(KADiffOptions, args)
    assert opts.threshold == 0.7 and opts.inject_steps in (None, (19, 49)) and opts.inject == ("k", "v")
  if name == "sdxl_base.yaml":
    assert config.build(GenerationOptions, args) == GenerationOptions(50, 5.0, "euler", height=1024, width=1024)
  if "model" in keys:
    assert config.build(ModelOptions, args).model == "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_release_config_runs_on_the_tiny_model_and_writes_what_it_resolved(tmp_path, tiny_dir):
  """kadiff generate --config configs/kadiff_sdxl_release.yaml model=... steps=10: the overrides win, the
  model-dependent defaults (size, layers) resolve for the tiny UNet, and config.yaml reproduces the run."""
  ref = tmp_path / "ref.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(ref)
  out = tmp_path / "out"
  argv = ["generate", "--config", str(CONFIGS / "kadiff_sdxl_release.yaml"), f"model={tiny_dir}", "steps=10",
          "variant=null", "dtype=fp32", "ip_adapter=null", "image_encoder=null", "--reference", str(ref),
          "--ref-prompt", "a photo of a thing", "--prompt", "a thing in the snow", "--baseline", "--out", str(out),
          "--cache-dir", str(tmp_path / "c")]
  assert cli.main(argv) == 0
  written = yaml.safe_load((out / "config.yaml").read_text())
  assert written["steps"] == 10 and written["size"] == 64 and written["inject_layers"] == "up_blocks.*"
  assert written["inject_steps"] == [4, 9] and written["threshold"] == 0.7 and written["model"] == str(tiny_dir)
  again = tmp_path / "again"
  assert cli.main(["generate", "--config", str(out / "config.yaml"), "--out", str(again)]) == 0
  for name in ("seed0_0000.png", "seed0_0000_baseline.png"):
    np.testing.assert_array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(again / name)))
