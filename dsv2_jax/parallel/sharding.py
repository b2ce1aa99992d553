"""Meshes and the one table that maps logical axis names to mesh axes.

The model only names axes (see `dsv2_jax.model`); this module alone knows the mesh
axes `data`, `fsdp`, `tensor`, `expert`, `stage`. A config swaps layouts by sizing
`config.mesh`; the rules below decide what each size shards.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert", "stage")

# (logical name, mesh axis or axes or None). First match wins; a mesh axis of size 1
# shards nothing, so one table serves every layout.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations. 'tokens' is the flattened [B * T] axis, batch-major. Outside the MoE
    # layers the `expert` axis is one more data-parallel axis.
    ("tokens", ("data", "fsdp", "expert")),
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_kv", None),
    ("act_kv_lora", None),  # MLA's KV latent [X, c]: small, kept whole.
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # Parameters (and, through optax, their optimizer state).
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    # MLA's latent widths: ZeRO-3 shards the up-projections over them (the down
    # projections take fsdp on 'embed' first; a mesh axis serves one dimension).
    ("q_lora", "fsdp"),
    ("kv_lora", "fsdp"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("gate_mlp", "tensor"),  # The gate MLP: column- then row-parallel, like the FFN.
    ("layers", "stage"),
    ("norm", "fsdp"),  # ZeRO-3 shards every parameter, norm scales too.
)


# Named layouts for `--mesh PRESET` (-1 fills the remaining devices).
PRESETS: dict[str, dict[str, int]] = {
    "dp": dict(data=-1),  # Pure data parallel: parameters replicated.
    "fsdp": dict(fsdp=-1),  # ZeRO-3: parameters, gradients and optimizer state sharded.
    "tp": dict(tensor=-1),  # Megatron tensor parallel only.
    "dp_tp2": dict(data=-1, tensor=2),
    "fsdp_tp4": dict(fsdp=-1, tensor=4),
    "dp_ep4": dict(data=-1, expert=4),
    "pp4_dp": dict(data=-1, stage=4),
    "pp2_tp2_dp": dict(data=-1, tensor=2, stage=2),
}


class MeshError(ValueError):
  """The configured mesh does not fit the available devices."""


def parse_mesh(text: str) -> dict[str, int]:
  """A preset name or `axis=size,...` (e.g. `data=2,tensor=4`) -> axis sizes.

  Axes left out have size 1, so the result replaces the whole `config.mesh`.
  """
  text = text.strip()
  if text in PRESETS:
    sizes = dict(PRESETS[text])
  else:
    sizes = {}
    for item in filter(None, text.split(",")):
      axis, sep, size = item.partition("=")
      axis = axis.strip()
      if not sep or axis not in MESH_AXES or not size.strip().lstrip("-").isdigit():
        raise MeshError(f"--mesh {text!r}: {item!r} is not AXIS=SIZE with AXIS in "
                        f"{list(MESH_AXES)}; or use a preset: {sorted(PRESETS)}.")
      sizes[axis] = int(size)
  return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


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


def check_layout(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> None:
  """Raises MeshError, naming the fields to change, if `config` cannot run on `sizes`."""
  ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  rows = config.data.batch_size // config.train.grad_accum_steps
  if rows % ways:
    raise MeshError(
        f"{rows} rows per microbatch (data.batch_size / train.grad_accum_steps) do not split "
        f"over mesh data x fsdp x expert = {ways} devices: change data.batch_size or the mesh.")
  if config.eval.batch_size % ways:
    raise MeshError(f"eval.batch_size={config.eval.batch_size} does not split over mesh "
                    f"data x fsdp x expert = {ways} devices: change eval.batch_size.")
  experts = config.model.moe.num_experts
  if experts and experts % sizes["expert"]:
    raise MeshError(f"model.moe.num_experts={experts} does not split over mesh.expert="
                    f"{sizes['expert']}: pick a mesh.expert that divides it.")
  if sizes["stage"] > 1:
    if not config.model.scan_layers:
      raise MeshError("mesh.stage > 1 pipelines the scanned layer stack: set "
                      "model.scan_layers=True.")
    micro = config.model.pipeline_microbatches
    if micro and rows % micro:
      raise MeshError(f"model.pipeline_microbatches={micro} does not divide the {rows} rows "
                      "per microbatch (data.batch_size / train.grad_accum_steps).")


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


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops, per dimension, the trailing mesh axes whose sizes do not divide it.

  E.g. 2 kv heads on tensor=4 stay replicated rather than fail; the rule table can
  then be shared by every model size.
  """
  dims = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for axis in axes:
      if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
        kept.append(axis)
    dims.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*dims)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical axis names.

  Mesh axes that do not divide a dimension are dropped for that dimension (`fit_spec`).
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(abstract_tree)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda v: isinstance(v, PartitionSpec))


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
  """Within it, the model's `nn.with_logical_constraint`s shard activations on `mesh`.

  Outside it they are no-ops (a single device, or tracing without a mesh).
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
      nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def active_mesh_axes(logical: str) -> tuple[str, ...]:
  """Mesh axes of size > 1 that `logical` maps to under `activation_rules`, else ()."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not nn.get_logical_axis_rules():
    return ()
  axes = nn.logical_to_mesh_axes((logical,))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if mesh.shape[a] > 1)


def with_activation_rules(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """`fn` traced under `activation_rules(mesh)`: wrap a step before `jax.jit`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_rules(mesh):
      return fn(*args, **kwargs)
  return wrapped


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
