"""Pipeline parallelism: layer stages on a mesh axis, a microbatched GPipe schedule.

The decoder's scanned stack keeps its parameters as one [L, ...] tree on every layout,
so checkpoints move freely between meshes. When the logical `layers` axis maps to a
mesh axis of size Z > 1 (under `sharding.activation_rules`), `run_stack` runs that stack
as Z stages of ceil(L / Z) layers each (Z stages and Y microbatches are letters of the
repo's shape alphabet, written down in `dsv2_jax.model`):

  params [L, ...] -> padded to [Z, ceil(L / Z), ...]; padded layers are skipped
  batch  -> Y microbatches of strided rows (`microbatch.split`)
  for tick t in 0 .. Y + Z - 2:            (one `lax.scan`)
    stage 0 takes microbatch t, stage s > 0 takes stage s - 1's last output
    (`jnp.roll` over the stage axis: a collective-permute between neighbours);
    all stages run at once: `vmap` over the stage axis, sharded on the mesh axis
  the last stage's outputs from ticks Z - 1 .. Y + Z - 2 are the Y results.

The backward pass is the autodiff of that scan, so activations flow back through the
same permutes. Every stage is busy for Y of the Y + Z - 1 ticks: the bubble fraction is
(Z - 1) / (Y + Z - 1) (`bubble_fraction`). The layer count need not divide by Z: the
padded layers run on zero weights and their result is discarded, which costs
Z ceil(L / Z) - L layer slots per tick.

Statistics a layer sows (MoE load, auxiliary-loss means) come back per layer, combined
over microbatches by `microbatch.reduce_stats`, as the unpipelined scan stacks them.
Generation pipelines the same way: each layer's KV-cache rows travel with the schedule
(`layer_state`), so stage s updates the cache of its layers for the microbatch it runs.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv2_jax.parallel import microbatch, sharding

# layer_fn(layer_params, x [X', D], positions [B', T], key id, layer state or None)
#   -> (x, sown stats, new layer state or None). The key id (layer x Y + microbatch) is
#   unique per call, for dropout keys; the state is this layer's rows of the decode cache.
LayerFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any, Any]]


def num_stages() -> int:
  """Z: how many ways the active mesh splits the layer stack (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in sharding.active_mesh_axes("layers"))


def bubble_fraction(stages: int, microbatches: int) -> float:
  """Idle share of each stage's ticks in the GPipe schedule: (Z - 1) / (Y + Z - 1)."""
  return (stages - 1) / (microbatches + stages - 1)


def default_microbatches(stages: int, batch: int, data_ways: int = 1,
                         requested: int = 0) -> int:
  """`requested` if > 0, else the largest divisor of the rows per data shard up to 4 Z.

  Dividing each data shard's rows keeps every microbatch split over the data axes (no
  resharding); up to 4 Z microbatches keeps the bubble at or below 20%.
  """
  if requested:
    return requested
  rows = max(batch // data_ways, 1)
  return max(m for m in range(1, min(rows, 4 * stages) + 1) if rows % m == 0)


def run_stack(layer_fn: LayerFn, params: Any, x: jax.Array, positions: jax.Array, *,
              num_layers: int, microbatches: int, layer_state: Any = None
              ) -> tuple[jax.Array, Any, Any]:
  """The stack of `num_layers` layers on x, pipelined over the active mesh's stages.

  Args:
    layer_fn: one layer (see `LayerFn`).
    params: the stack's parameters, every leaf [L, ...].
    x: [X, D] tokens, X = B T batch-major; positions: [B, T].
    num_layers: L.
    microbatches: Y, must divide B; 0 picks `default_microbatches`.
    layer_state: None, or per-layer state with leaves [L, B, ...] (the decode KV cache):
      each layer reads and rewrites its microbatch's rows.

  Returns:
    (x [X, D], stats with every leaf [L, ...], layer_state updated or None).
  """
  (stage_axis,) = sharding.active_mesh_axes("layers")
  token_axes = sharding.active_mesh_axes("tokens")
  mesh = jax.sharding.get_abstract_mesh()
  b, t = positions.shape
  stages = mesh.shape[stage_axis]
  m = default_microbatches(stages, b, math.prod(mesh.shape[a] for a in token_axes),
                           microbatches)
  if b % m:
    raise ValueError(f"{m} pipeline microbatches do not divide the batch of {b} rows: set "
                     "model.pipeline_microbatches to a divisor of the per-step batch.")
  per_stage = -(-num_layers // stages)
  slots = stages * per_stage

  def to_stages(leaf):  # [L, ...] -> [Z, L / Z, ...], stage axis on the mesh.
    pad = jnp.zeros((slots - num_layers, *leaf.shape[1:]), leaf.dtype)
    staged = jnp.concatenate([leaf, pad]).reshape(stages, per_stage, *leaf.shape[1:])
    # Other dimensions keep their own (tensor, fsdp) sharding: no gather here.
    free = (P.UNCONSTRAINED,) * (staged.ndim - 1)
    return jax.lax.with_sharding_constraint(staged, P(stage_axis, *free))

  def state_to_stages(leaf):  # [L, B, ...] -> [Z, L / Z, Y, B / Y, ...] (strided rows).
    return to_stages(jnp.moveaxis(microbatch.split(jnp.moveaxis(leaf, 1, 0), m), (0, 1),
                                  (1, 2)))

  def state_from_stages(leaf):  # The inverse of state_to_stages.
    leaf = leaf.reshape(slots, *leaf.shape[2:])[:num_layers]
    return jnp.moveaxis(microbatch.merge(jnp.moveaxis(leaf, (1, 2), (0, 1))), 0, 1)

  staged = jax.tree.map(to_stages, params)
  layer_ids = jnp.arange(slots).reshape(stages, per_stage)
  d = x.shape[-1]
  x_mb = microbatch.split(x.reshape(b, t, d), m).reshape(m, -1, d)  # [Y, X / Y, D]
  pos_mb = microbatch.split(positions, m)  # [Y, B / Y, T]
  # Stage 0's input per tick; the last Z - 1 ticks feed nothing new (zeros).
  feed = jnp.concatenate([x_mb, jnp.zeros((stages - 1, *x_mb.shape[1:]), x.dtype)])
  carry_spec = P(stage_axis, token_axes or None)

  def stage_fn(stage_params, h, pos, ids, mb, active, stage_state):
    rows = None if stage_state is None else jax.tree.map(lambda s: s[:, mb], stage_state)

    def one_layer(h, xs):
      p, i, row_state = xs
      out, stats, new_state = layer_fn(p, h, pos, i * m + mb, row_state)
      return jnp.where(i < num_layers, out, h), (stats, new_state)  # Padding: h through.

    h, (stats, rows) = jax.lax.scan(one_layer, h, (stage_params, ids, rows))
    if stage_state is not None:  # Only a stage inside the schedule writes its rows.
      stage_state = jax.tree.map(
          lambda s, r: jnp.where(active, s.at[:, mb].set(r), s), stage_state, rows)
    return h, stats, stage_state

  stages_fn = jax.vmap(stage_fn, spmd_axis_name=stage_axis)

  def tick(carry, xs):
    state, stage_state = carry
    feed_t, tick_index = xs
    inputs = jnp.roll(state, 1, axis=0).at[0].set(feed_t)  # [Z, X / Y, D]
    inputs = jax.lax.with_sharding_constraint(inputs, carry_spec)
    # Stage s works on microbatch tick - s (clipped outside the schedule: discarded).
    mb = tick_index - jnp.arange(stages)
    active = (mb >= 0) & (mb < m)
    mb = jnp.clip(mb, 0, m - 1)
    state, stats, stage_state = stages_fn(staged, inputs, pos_mb[mb], layer_ids, mb, active,
                                          stage_state)
    return (state, stage_state), (state[-1], stats)

  state = jax.lax.with_sharding_constraint(
      jnp.zeros((stages, *x_mb.shape[1:]), x.dtype), carry_spec)
  stage_state = None if layer_state is None else jax.tree.map(state_to_stages, layer_state)
  ticks = m + stages - 1
  (_, stage_state), (outputs, stats) = jax.lax.scan(
      tick, (state, stage_state), (feed, jnp.arange(ticks)))
  y = microbatch.merge(outputs[stages - 1:].reshape(m, b // m, t, d)).reshape(b * t, d)

  # stats leaves [ticks, Z, L / Z, ...]: stage s ran microbatch j at tick j + s.
  when = jnp.arange(m)[:, None] + jnp.arange(stages)[None, :]  # [Y, Z]

  def per_layer(leaf):
    picked = leaf[when, jnp.arange(stages)[None, :]]  # [Y, Z, L / Z, ...]
    return picked.reshape(m, slots, *leaf.shape[3:])[:, :num_layers]

  new_state = None if stage_state is None else jax.tree.map(state_from_stages, stage_state)
  return y, microbatch.reduce_stats(jax.tree.map(per_layer, stats)), new_state
