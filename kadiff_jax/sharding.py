"""The one place that knows about devices: a data-parallel mesh and batch placement.

The batch axis is split over a ("data",) mesh of all devices (all hosts'
devices under `jax.distributed`); params are replicated. Models never see it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kadiff_jax.config import option


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
  """A multi-process run: start the same command on every host (TPU pods and SLURM need only num_processes)."""

  coordinator: str | None = option(None, "multi-process run: coordinator HOST:PORT (jax.distributed)")
  num_processes: int | None = option(None, "multi-process run: number of processes")
  process_id: int | None = option(None, "multi-process run: this process's index")

  @property
  def enabled(self) -> bool:
    return bool(self.coordinator or self.num_processes)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def attention_implementation(dtype) -> str:
  """Which `jax.nn.dot_product_attention` the UNet's attention uses: cuDNN's fused kernel on GPUs for 16-bit
  dtypes, XLA's otherwise. `KADIFF_ATTENTION=xla|cudnn` overrides (read when a program is traced). Layers the
  kernel cannot take (fp32, upcast, head dims over 128 or not a multiple of 8) use XLA's whatever this says."""
  forced = os.environ.get("KADIFF_ATTENTION")
  if forced:
    if forced not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"KADIFF_ATTENTION={forced!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    return forced
  sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if jax.default_backend() == "gpu" and sixteen_bit else "xla"


def device_memory() -> int | None:
  """Bytes one device can hold: its allocator's limit (GPU, TPU), else the host's RAM (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


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


def pad_rows(rows, n: int, padded: int, per_item: int = 1):
  """Pads a batch of n items (per_item consecutive rows each) to `padded` items by repeating the last."""
  if padded == n:
    return rows
  xp = jnp if isinstance(rows, jax.Array) else np  # host rows stay on the host until placed
  return xp.concatenate([rows] + [rows[-per_item:]] * (padded - n))


def shard_jobs(tree, mesh: Mesh, n: int, rows_per_job: int = 1):
  """Pads every leaf (leading axis: n jobs of `rows_per_job` rows each) to whole jobs for the mesh, placed."""
  padded = padded_size(n, mesh)
  as_array = lambda a: a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a)
  return shard_batch(jax.tree_util.tree_map(lambda a: pad_rows(as_array(a), n, padded, rows_per_job), tree), mesh)


def place_hook_inputs(hook_args: dict, mesh: Mesh, n: int, rows_per_job: int) -> dict:
  """Hook inputs on the mesh: `HookInputs.params` replicated, `.rows` padded and split with the batch."""
  from kadiff_jax.models.attention import HookInputs
  out = {}
  for name, value in hook_args.items():
    if not isinstance(value, HookInputs):
      raise TypeError(f"hook_args[{name!r}] is a {type(value).__name__}; inputs placed with the batch must be "
                      "HookInputs(params, rows)")
    out[name] = HookInputs(replicate(value.params, mesh), shard_jobs(value.rows, mesh, n, rows_per_job))
  return out


def _place(tree, target: NamedSharding):
  """device_put, skipping leaves already placed with `target` (so placing twice costs nothing)."""
  multi = jax.process_count() > 1

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == target:
      return x
    # Across processes every host passes the same host value and keeps its own shards; a
    # committed single-device array cannot be placed that way, so go through numpy.
    return jax.device_put(np.asarray(x) if multi else x, target)

  return jax.tree_util.tree_map(put, tree)


def shard_batch(tree, mesh: Mesh):
  """Places every leaf's leading (batch) axis across the mesh."""
  return _place(tree, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
  """Places every leaf whole on every device of the mesh (params); a no-op for leaves already there."""
  return _place(tree, replicated(mesh))


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) array as one numpy array on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def barrier(name: str) -> None:
  """Waits until every process gets here (a no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def is_writer() -> bool:
  """Whether this process writes the run's shared files (config, records: process 0; every process computes
  and writes the images its own devices made)."""
  return jax.process_index() == 0


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run. With no arguments JAX detects TPU pods / SLURM / MPI itself;
  on CPU the collectives go through gloo (works over loopback)."""
  # Must run before anything touches a backend; the option only affects CPU collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)
