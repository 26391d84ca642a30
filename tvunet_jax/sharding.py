"""Device mesh and shardings: where every array of the training state and the batch lives.

One `jax.sharding.Mesh` spans all devices of all processes with a single named data axis. Batches
are split along it (rows of the global batch per device); parameters, BatchNorm statistics and
optimizer state are replicated, or, with `fsdp=True`, large kernels are split along their output
channels over the same axis (ZeRO-3 style: XLA all-gathers them where a layer needs them). Nothing
else in the project constructs a sharding. `under_mesh` makes the mesh the context mesh of a
jitted step, which the oneDNN convolution kernels need to run per shard (`kernels/conv.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
# Leaves smaller than this stay replicated under fsdp: splitting a bias or a 3x3x1x64 kernel saves
# nothing and adds a collective per use.
FSDP_MIN_SIZE = 2**16


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1D mesh over the first `num_devices` devices (all devices of all processes by default).

  `AxisType.Auto` keeps jit's classic sharding propagation: we state shardings at the step's
  boundary and let XLA place everything inside.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None or num_devices <= 0 else num_devices
  if n > len(devices):
    raise ValueError(f"mesh asks for {n} devices but only {len(devices)} are visible")
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError("multi-process runs must use every device (mesh.num_devices = -1)")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """(B, ...) arrays: rows split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(leaf: Any, n: int, fsdp: bool) -> P:
  shape = getattr(leaf, "shape", ())
  if fsdp and len(shape) >= 2 and int(np.prod(shape)) >= FSDP_MIN_SIZE and shape[-1] % n == 0:
    return P(*([None] * (len(shape) - 1)), DATA_AXIS)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any, fsdp: bool = False) -> Any:
  """A pytree of `NamedSharding`s matching `abstract_state` (e.g. from `jax.eval_shape`)."""
  n = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(x, n, fsdp)), abstract_state)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows of the global batch this process feeds: its share of the mesh's devices."""
  n = mesh.shape[DATA_AXIS]
  if global_batch_size % n:
    raise ValueError(
      f"global batch {global_batch_size} is not divisible by the {n} devices of the data axis"
    )
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  return global_batch_size // n * local


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in global order, as numpy (no transfer
  between hosts: each device's shard is read where it lives; replicated shards once)."""
  shards = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0 if shard.index else 0
    shards.setdefault(start, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def under_mesh(mesh: Mesh, fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` (typically a `jax.jit` function) called, and so traced, with `mesh` as context mesh.

  Custom calls (the oneDNN convolutions) are opaque to XLA's partitioner; with a context mesh they
  run per shard under `jax.shard_map` instead of on a gathered batch. Shardings are unchanged.
  A jit function's `.lower` is kept, also under the mesh (for HLO dumps and exports).
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  if hasattr(fn, "lower"):  # a jit function: `.lower` traces under the mesh too

    def lower(*args, **kwargs):
      with jax.set_mesh(mesh):
        return fn.lower(*args, **kwargs)

    wrapped.lower = lower
  return wrapped
