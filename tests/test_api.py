"""The Python API (`KADiffPipeline`): the CLI's job, in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("api")
  rng = np.random.default_rng(11)
  yy, xx = np.mgrid[0:72, 0:64]
  Image.fromarray((np.stack([yy * 3, xx * 2, yy + xx], -1) % 256 + rng.integers(0, 30, (72, 64, 3))).clip(0, 255)
                  .astype(np.uint8)).save(d / "ref.png")
  m = np.zeros((60, 40), np.uint8)
  m[10:50, 5:35] = 255
  Image.fromarray(m).save(d / "mask.png")
  return d


@pytest.mark.slow  # a long end-to-end run (CI runs the slow suite too)
def test_api_images_equal_the_cli_for_the_same_job(tmp_path, tiny_dir, files):
  import kadiff_jax
  from kadiff_jax import KADiffPipeline, cli
  assert kadiff_jax.KADiffOptions().steps == 50  # exported from the package
  out = tmp_path / "cli"
  common = ["--steps", "4", "--cache-dir", str(tmp_path / "c")]
  assert cli.main(["generate", "--model", str(tiny_dir), "--mode", "kadiff", "--reference", str(files / "ref.png"),
                   "--ref-prompt", "a dog", "--prompt", "a dog in the snow", "--mask", str(files / "mask.png"),
                   "--seed", "3", "--out", str(out), *common]) == 0
  cli_image = np.asarray(Image.open(out / "seed3_0000.png"))

  pipe = KADiffPipeline.from_pretrained(str(tiny_dir), cache_dir=str(tmp_path / "c"))
  res = pipe("a dog in the snow", reference=str(files / "ref.png"), ref_prompt="a dog", mask=str(files / "mask.png"),
             seed=3, steps=4)
  assert isinstance(res.images[0], Image.Image)
  np.testing.assert_array_equal(np.asarray(res.images[0]), cli_image)
  rec = res.records[0]
  assert rec["seed"] == 3 and rec["ref_prompt"] == "a dog" and rec["inputs"]["options"]["mode"] == "kadiff"
  assert rec["inputs"]["options"]["steps"] == 4 and rec["inputs"]["options"]["inject_layers"] == "up_blocks.*"
  assert rec["mask"]["source"] == "user"
  # the same job: the same fingerprint as the record the CLI wrote beside its image
  assert rec["fingerprint"] == json.loads((out / "seed3_0000.json").read_text())["fingerprint"]

  # a reference prepared once serves later calls; several prompts; a mask given as an array
  prepared = pipe.invert(str(files / "ref.png"), "a dog", steps=4)
  mask = np.asarray(Image.open(files / "mask.png")) > 127
  two = pipe(["a dog in the snow", "a dog on the beach"], reference=prepared, mask=mask, seed=3, steps=4)
  # a batch of two is another program (one reference group of 2): equal up to float rounding
  assert np.abs(np.asarray(two.images[0]).astype(int) - cli_image.astype(int)).max() <= 1
  assert np.abs(two.latents[0] - res.latents[0]).max() <= 1e-5 * np.abs(res.latents[0]).max()
  assert np.abs(np.asarray(two.images[1]).astype(int) - cli_image.astype(int)).max() > 10
  assert two.latents.shape == (2, 8, 8, 4)

  with pytest.raises(ValueError, match="needs reference="):
    pipe("a dog")
  with pytest.raises(ValueError, match="auto_mask=True"):
    pipe("a dog", reference=prepared, mask="auto", steps=4)
