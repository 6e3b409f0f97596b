"""Device mesh, shardings and global batch assembly for data-parallel training.

One mesh axis, ``data``. Parameters and the rest of the train state are replicated; the
leading (example) axis of every batch is sharded. Under ``jax.jit`` the gradient mean
over the global batch is computed by XLA's collectives, so no explicit ``pmean`` appears
anywhere. Multi-host: every process builds its local slice of the global batch and
``make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f'parallel.num_devices={n} but only {len(devices)} devices are visible.')
  # Auto axis types: classic sharding propagation (Explicit mode rejects some reshapes
  # of sharded dimensions that the models do).
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, leading_axes: int = 0) -> NamedSharding:
  """Sharding of a batch whose example axis comes after ``leading_axes`` other axes
  (1 for the stacked batches of a multi-step call)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def check_batch_size(batch_size: int, mesh, what: str = 'batch size'):
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f'{what} {batch_size} is not divisible by the {n} devices of the mesh; '
                     f'choose a multiple of {n}.')


def put_batch(batch, mesh, leading_axes: int = 0):
  """Host-local numpy batch (this process's slice) -> global sharded jax arrays."""
  sharding = batch_sharding(mesh, leading_axes)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def put_replicated(tree, mesh):
  return jax.device_put(tree, replicated(mesh))


def to_host(tree):
  """Fully replicated or addressable arrays -> numpy (all processes get the same)."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
