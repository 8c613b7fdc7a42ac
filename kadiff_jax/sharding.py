"""The one place that knows about devices: a data-parallel mesh and batch placement.

The batch axis is split over a ("data",) mesh of all devices (all hosts'
devices under `jax.distributed`); params are replicated. Models never see it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def padded_size(n: int, mesh: Mesh) -> int:
  """Smallest multiple of the mesh size that holds n rows."""
  d = mesh.size
  return -(-n // d) * d


def shard_batch(tree, mesh: Mesh):
  """Places every leaf's leading (batch) axis across the mesh."""
  return jax.device_put(tree, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
