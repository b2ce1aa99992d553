"""Per-device training memory of a config on a mesh of any size, without its devices.

  python -m dsv2_jax plan --config configs/paper_175b.py --mesh data=-1,tensor=8,stage=4 \
      --devices 2048 --device_memory_gib 80

Per device, for one train step:
  params       parameter shards (exact: abstract shapes + the logical rules + the mesh)
  optimizer    optimizer-state shards (exact, the same way)
  batch        this device's rows of the input arrays
  temp         everything else XLA keeps live: activations, gradients, gathered FSDP
               weights, pipeline buffers. Compiled, on simulated CPU devices, for a
               stand-in mesh with the same tensor, expert and stage sizes and the same
               rows per device, with data = 1 and fsdp capped (`max_fsdp`), at two
               reduced layer counts (2 and 3 scan iterations); temp is affine in depth
               under `nn.scan` from 2 iterations on, so the two points extrapolate to
               the full depth (a stack no deeper than the second point is compiled
               at its real depth).
  total        params + optimizer + batch + temp; `fits` compares it with the device.

`check_against_compile` (tests, docs/results.md) compiles a small layout whole and
compares its `memory_analysis` total with the plan's.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, PartitionSpec

from dsv2_jax import config as config_lib
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import pipeline, sharding
from dsv2_jax.train import state as state_lib
from dsv2_jax.train.optimizer import build_optimizer
from dsv2_jax.train.step import jit_train_step

GIB = 2.0**30
MAX_FSDP = 4  # The stand-in mesh's fsdp size at most (gathered weights are per layer).


def lower_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                     ) -> jax.stages.Lowered:
  """The jitted train step of `config` lowered on abstract shapes: nothing is allocated."""
  model, tx = build_model(config.model), build_optimizer(config.train)
  abstract = state_lib.abstract_state(model, tx, config.data.seq_len)
  shardings = sharding.logical_shardings(abstract, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       nn.meta.unbox(abstract), shardings)
  spec, shape = sharding.batch_sharding(mesh), (config.data.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=spec) for k, dt in
           (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))}
  step = jit_train_step(model, tx, mesh, shardings, config.train.grad_accum_steps)
  return step.lower(state, batch)


def state_bytes_per_device(config: ml_collections.ConfigDict, sizes: dict[str, int]
                           ) -> dict[str, int]:
  """Bytes of one device's parameter and optimizer-state shards on a mesh of `sizes`."""
  mesh = AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  model, tx = build_model(config.model), build_optimizer(config.train)
  boxed = state_lib.abstract_state(model, tx, config.data.seq_len)
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), sharding.LOGICAL_AXIS_RULES)
  shapes = nn.meta.unbox(boxed)

  def shard_bytes(spec: PartitionSpec, leaf: jax.ShapeDtypeStruct) -> int:
    spec = sharding.fit_spec(spec, leaf.shape, mesh)
    dims = list(spec) + [None] * (len(leaf.shape) - len(spec))
    shard = [math.ceil(n / _ways(axes, sizes)) for n, axes in zip(leaf.shape, dims)]
    return math.prod(shard) * jnp.dtype(leaf.dtype).itemsize

  per_leaf = jax.tree.map(shard_bytes, specs, shapes,
                          is_leaf=lambda v: isinstance(v, PartitionSpec))
  return {"params": int(sum(jax.tree.leaves(per_leaf.params))),
          "optimizer": int(sum(jax.tree.leaves(per_leaf.opt_state)))}


def _ways(axes: Any, sizes: dict[str, int]) -> int:
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(sizes[a] for a in axes)


def data_ways(sizes: dict[str, int]) -> int:
  """Devices the batch rows are split over (data x fsdp x expert)."""
  return sizes["data"] * sizes["fsdp"] * sizes["expert"]


def stand_in(config: ml_collections.ConfigDict, sizes: dict[str, int], num_layers: int,
             max_fsdp: int) -> tuple[ml_collections.ConfigDict, dict[str, int]]:
  """A config and mesh small enough to compile with the same per-device activations."""
  small = {**sizes, "data": 1, "fsdp": min(sizes["fsdp"], max_fsdp)}
  rows = config.data.batch_size // data_ways(sizes)  # This device's rows per step.
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.num_layers = num_layers
  c.data.batch_size = rows * data_ways(small)
  if sizes["stage"] > 1:  # The full run's microbatch count, if the stand-in's rows allow.
    full = pipeline.default_microbatches(
        sizes["stage"], config.data.batch_size // config.train.grad_accum_steps,
        data_ways(sizes), config.model.pipeline_microbatches)
    micro_rows = c.data.batch_size // c.train.grad_accum_steps
    c.model.pipeline_microbatches = max(m for m in range(1, min(full, micro_rows) + 1)
                                        if micro_rows % m == 0)
  c.mesh = ml_collections.ConfigDict(small)
  return c, small


def stand_in_devices(sizes: dict[str, int], max_fsdp: int = MAX_FSDP) -> int:
  """Devices the stand-in mesh of `stand_in` needs."""
  return sizes["tensor"] * sizes["expert"] * sizes["stage"] * min(sizes["fsdp"], max_fsdp)


def depth_points(config: ml_collections.ConfigDict, stages: int) -> tuple[int, int]:
  """Two reduced layer counts with the full config's layer pattern (MoE groups, stages)."""
  moe = config.model.moe
  unit = (moe.every_n_layers if moe.num_experts else 1) * stages
  base = moe.first_dense_layers if moe.num_experts else 0
  # Not 1 unit: XLA drops the loop of a one-iteration scan, which breaks the line.
  return base + 2 * unit, base + 3 * unit


def compiled_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
          "aliased": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}


def plan(config: ml_collections.ConfigDict, sizes: dict[str, int],
         device_memory_gib: float = 0.0, max_fsdp: int = MAX_FSDP) -> dict[str, Any]:
  """Per-device memory of `config`'s train step on a mesh of `sizes` (see module doc).

  Needs the stand-in mesh's devices: tensor x expert x stage x min(fsdp, max_fsdp)
  (simulated CPU devices are fine).
  """
  config_lib.validate(config)
  sharding.check_layout(config, sizes)
  state = state_bytes_per_device(config, sizes)
  rows = config.data.batch_size // data_ways(sizes)
  batch = rows * config.data.seq_len * (4 + 4 + 4)  # inputs, targets (int32), weights (f32).
  points = {}
  depths = depth_points(config, sizes["stage"])
  if config.model.num_layers <= depths[-1]:  # Shallow enough: compile the real depth.
    depths = (config.model.num_layers,)
  for layers in depths:
    c, small = stand_in(config, sizes, layers, max_fsdp)
    devices = jax.devices()[:stand_in_devices(sizes, max_fsdp)]
    if len(devices) < stand_in_devices(sizes, max_fsdp):
      raise sharding.MeshError(
          f"the stand-in mesh {small} needs {stand_in_devices(sizes, max_fsdp)} devices, "
          f"{len(jax.devices())} exist: run `plan` from a fresh process (it simulates them).")
    points[layers] = compiled_bytes(
        lower_train_step(c, sharding.make_mesh(c.mesh, devices)).compile())
  (l1, p1), (l2, p2) = (list(points.items()) * 2)[:2]
  per_layer = (p2["temp"] - p1["temp"]) / (l2 - l1) if l2 != l1 else 0.0
  temp = p1["temp"] + per_layer * (config.model.num_layers - l1)
  total = state["params"] + state["optimizer"] + batch + temp
  stages = sizes["stage"]
  micro = pipeline.default_microbatches(
      stages, config.data.batch_size // config.train.grad_accum_steps, data_ways(sizes),
      config.model.pipeline_microbatches) if stages > 1 else 1
  report = {
      "mesh": sizes, "devices": math.prod(sizes.values()),
      "pipeline_microbatches": micro,
      "bubble_fraction": pipeline.bubble_fraction(stages, micro) if stages > 1 else 0.0,
      "rows_per_device": rows, "seq_len": config.data.seq_len,
      "params_gib": state["params"] / GIB, "optimizer_gib": state["optimizer"] / GIB,
      "batch_gib": batch / GIB, "temp_gib": temp / GIB,
      "temp_per_layer_gib": per_layer / GIB, "total_gib": total / GIB,
      "compiled_at_layers": {str(k): v for k, v in points.items()},
      "stand_in_mesh": small,
  }
  if device_memory_gib:
    report.update(device_memory_gib=device_memory_gib,
                  fits=total / GIB <= device_memory_gib)
  return report


def check_against_compile(config: ml_collections.ConfigDict, sizes: dict[str, int],
                          max_fsdp: int = MAX_FSDP) -> dict[str, float]:
  """The plan's total next to `memory_analysis` of the whole step compiled on `sizes`."""
  planned = plan(config, sizes, max_fsdp=max_fsdp)
  devices = jax.devices()[:math.prod(sizes.values())]
  c = ml_collections.ConfigDict(config.to_dict())
  c.mesh = ml_collections.ConfigDict(sizes)
  m = compiled_bytes(lower_train_step(c, sharding.make_mesh(c.mesh, devices)).compile())
  actual = m["arguments"] + m["outputs"] - m["aliased"] + m["temp"]
  return {"planned_gib": planned["total_gib"], "compiled_gib": actual / GIB,
          "ratio": planned["total_gib"] * GIB / actual, "compiled": m, "plan": planned}


def format_plan(report: dict[str, Any]) -> str:
  lines = [f"mesh {report['mesh']} ({report['devices']:,} devices), "
           f"{report['rows_per_device']} rows x {report['seq_len']} tokens per device",
           "per device:"]
  for key in ("params", "optimizer", "batch", "temp", "total"):
    lines.append(f"  {key:<10} {report[key + '_gib']:10.2f} GiB")
  lines.append(f"  (temp {report['temp_per_layer_gib']:.3f} GiB per layer, compiled at "
               f"{', '.join(report['compiled_at_layers'])} layers on the stand-in mesh "
               f"{report['stand_in_mesh']})")
  if report["bubble_fraction"]:
    lines.append(f"pipeline: {report['pipeline_microbatches']} microbatches, bubble "
                 f"{report['bubble_fraction']:.1%} of each stage's time")
  if "fits" in report:
    lines.append(f"{'fits' if report['fits'] else 'does NOT fit'} in "
                 f"{report['device_memory_gib']:g} GiB per device")
  return "\n".join(lines)
