"""Meshes and the one table that maps logical axis names to mesh axes.

The model only names axes (see `dsv2_jax.model`); this module alone knows the mesh
axes `data`, `fsdp`, `tensor`, `expert`, `stage`. A config swaps layouts by sizing
`config.mesh`; the rules below decide what each size shards.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert", "stage")

# (logical name, mesh axis or axes or None). First match wins; a mesh axis of size 1
# shards nothing, so one table serves every layout.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations. 'tokens' is the flattened [B * T] axis, batch-major.
    ("tokens", ("data", "fsdp")),
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # Parameters (and, through optax, their optimizer state).
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("gate_mlp", None),
    ("layers", "stage"),
    ("norm", None),
)


class MeshError(ValueError):
  """The configured mesh does not fit the available devices."""


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves a single -1 entry so that the axis sizes multiply to `num_devices`."""
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  unknown = [a for a in mesh_config.keys() if a not in MESH_AXES]
  if unknown:
    raise MeshError(f"mesh axes {unknown} are unknown; use {list(MESH_AXES)}.")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise MeshError(f"only one mesh axis may be -1, got {fill}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise MeshError(f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not "
                      f"divide the {num_devices} devices; change config.mesh.")
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} devices but "
                    f"{num_devices} are available; set one axis of config.mesh to -1.")
  return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with all five named axes (size-1 axes are free) and Auto axis types."""
  devices = list(devices) if devices is not None else jax.devices()
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 5,
                         devices=devices)
  return Mesh(np.array(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 5)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical axis names."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
                   ) -> NamedSharding:
  """Sharding of [B, T] input arrays: batch over the data-parallel axes."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
  return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this process's rows of a host batch as global arrays sharded over batch."""
  spec = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(spec, v) for k, v in batch.items()}
