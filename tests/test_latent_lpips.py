"""E-LatentLPIPS in JAX against the elatentlpips package (its latent VGG16-BN construction, normalisation, heads and
L1 term) on random weights, and the shared augmentation.

As in test_lpips.py, torchvision cannot be loaded beside this CPU torch, and elatentlpips imports it only for
`vgg16_bn`'s layer list: the test declares torchvision's VGG16-BN `features` (the same 44 layers) as a stand-in.
(And `pkg_resources`, gone from recent setuptools, gets its one used function.) The package's own
`LatentVGG16BN` turns it into the latent trunk (4-channel first conv, first three max-pools
removed), which the test puts into the package's `ELatentLPIPS` in place of its randomly built RGB trunk.
"""

from __future__ import annotations

import sys
import types

import jax
import numpy as np
import pytest
import torch

from conftest import torchvision_standin
from kadiff_jax.metrics import latent_lpips
from kadiff_jax.weights.convert import WeightsError


def _vgg16_bn_features():
  nn = torch.nn
  layers, cin = [], 3
  for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
    if v == "M":
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
      cin = v
  return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torchvision_standin(vgg16_bn=_vgg16_bn_features)
  if "pkg_resources" not in sys.modules:  # removed from recent setuptools; the package's ADA ops import one function
    from packaging.version import parse
    sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse)
  elatentlpips = pytest.importorskip("elatentlpips")
  from elatentlpips.vgg16 import LatentVGG16BN
  torch.manual_seed(0)
  model = elatentlpips.ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd21", augment=None,
                                    verbose=False).eval()
  trunk = LatentVGG16BN(4).model.features
  for n, (lo, hi) in enumerate(latent_lpips.SLICES, 1):
    setattr(model.net, f"slice{n}", torch.nn.Sequential())
    for x in range(lo, hi + 1):
      getattr(model.net, f"slice{n}").add_module(str(x), trunk[x])
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, buf in model.named_buffers():  # BN statistics away from (0, 1), as trained ones are
      if name.endswith("running_mean"):
        buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
      elif name.endswith("running_var"):
        buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    for name, p in model.named_parameters():
      if name.startswith("lin"):
        p.copy_(torch.rand(p.shape, generator=g))  # calibrated heads are non-negative
  path = tmp_path_factory.mktemp("elpips") / "sd21_latest_vgg16_tuned.pth"
  torch.save(model.state_dict(), path)
  return model.eval(), path


def test_latent_lpips_matches_the_package(reference):
  model, path = reference
  params = latent_lpips.load(path)
  rng = np.random.default_rng(0)
  z0 = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
  z1 = (z0 + 0.5 * rng.standard_normal(z0.shape)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.tensor(z0), torch.tensor(z1), ensembling=False, add_l1_loss=True).reshape(-1).numpy()
  got = np.asarray(latent_lpips.distance(params, z0.transpose(0, 2, 3, 1), z1.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert float(latent_lpips.distance(params, z0.transpose(0, 2, 3, 1), z0.transpose(0, 2, 3, 1))[0]) == 0.0


def test_latent_lpips_refuses_other_weights(reference, tmp_path):
  _, path = reference
  state = torch.load(path, weights_only=True)
  state.pop("lin4.model.1.weight")
  torch.save(state, tmp_path / "bad.pth")
  with pytest.raises(WeightsError, match="lin4"):
    latent_lpips.load(tmp_path / "bad.pth")
  with pytest.raises(WeightsError, match="net.slice1.0.weight"):
    latent_lpips.load(path, latent_channels=16)


def test_augmentation_is_shared_by_the_pair():
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 4))
  a, b = latent_lpips.augment(jax.random.PRNGKey(1), z, z)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same transform for both inputs
  assert not np.allclose(np.asarray(a), np.asarray(z))
  cut = (np.asarray(a) == 0).all(axis=-1).sum(axis=(1, 2))
  assert (cut >= 16).all()  # a half-side cutout in every sample (at least its 4 x 4 corner inside)
