"""LPIPS in JAX against the lpips package (its own scaling, normalisation and v0.1 linear heads, shipped in the
wheel) on a random AlexNet backbone, and the interpolation metrics.

torchvision cannot be installed beside this CPU torch (its operators fail to load), and lpips imports it only for
the backbone's layer list, so the test declares torchvision's AlexNet `features` (the same layers) as a stand-in
module before importing lpips; everything LPIPS computes on top of the backbone is the package's code.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import torchvision_standin
from kadiff_jax.metrics import interpolation as metrics
from kadiff_jax.metrics import lpips as jlpips


def _alexnet_features():
  nn = torch.nn
  return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                       nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                       nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(384, 256, 3, padding=1),
                       nn.ReLU(inplace=True), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
                       nn.MaxPool2d(3, 2))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torchvision_standin(alexnet=_alexnet_features)
  lpips = pytest.importorskip("lpips")
  torch.manual_seed(0)
  model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
  folder = tmp_path_factory.mktemp("lpips")
  backbone = {}
  for name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
    for key, value in getattr(model.net, name).state_dict().items():  # "3.weight": torchvision's index
      backbone[f"features.{key}"] = value
  torch.save(backbone, folder / "alexnet.pth")
  lin = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
  return model, jlpips.load(folder / "alexnet.pth", lin)


def test_lpips_matches_the_package(reference):
  model, params = reference
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
  t = lambda x: torch.tensor(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    ref = model(t(a), t(b)).numpy().reshape(-1)
  ours = np.asarray(jlpips.distance(params, a, b))
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
  assert np.all(ours > 0) and np.allclose(np.asarray(jlpips.distance(params, a, a)), 0, atol=1e-7)


def test_lpips_refuses_other_weights(tmp_path, reference):
  torch.save({"features.0.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "bad.pth")
  with pytest.raises(Exception, match=r"features.0 should be a 64x3x11x11 convolution"):
    jlpips.load(tmp_path / "bad.pth", tmp_path / "bad.pth")


def test_smoothness_and_consistency(reference):
  _, params = reference
  assert metrics.gini([1, 1, 1]) == 0 and metrics.gini([0, 0, 3]) == pytest.approx(4 * 3 / (2 * 9 * 1))
  s = metrics.summary([0.1, 0.1, 0.4])
  assert s["consistency"] == pytest.approx(0.2) and s["max_lpips"] == 0.4
  assert s["smoothness"] == pytest.approx(1 - (0.3 * 4) / (2 * 9 * 0.2))
  rng = np.random.default_rng(1)
  frames = rng.integers(0, 256, (4, 64, 64, 3)).astype(np.uint8)
  d = metrics.frame_distances(params, frames)
  assert d.shape == (3,) and np.all(d > 0)
  x = (frames / 255.0 - metrics.IMAGENET_MEAN) / metrics.IMAGENET_STD  # the release's input
  np.testing.assert_allclose(d[1], float(jlpips.distance(params, x[1:2].astype(np.float32),
                                                         x[2:3].astype(np.float32))[0]), rtol=1e-5)
