"""Expert parallelism: experts split over a mesh axis, tokens exchanged with all-to-all.

The MoE layer calls `mesh_routed_ffn` with logical shapes only. When the logical
`expert` axis maps to a mesh axis of size ep > 1 (under `sharding.activation_rules`), each
device holds E / ep experts and, inside `shard_map`:

  1. routes its own tokens: each (token, choice) pair goes to the shard owning its expert,
     into a fixed send buffer [ep, X A, D] (X A: the device's own pairs; one shard may
     receive all of them, so no pair is ever dropped: the exchange is exact, dropless,
     like the single-device layer);
  2. `all_to_all` over the expert axis: every shard receives the rows for its experts;
  3. runs its local experts with the same grouped FFN as one device
     (`moe_dispatch.routed_ffn`); empty slots are marked and never executed;
  4. `all_to_all` back, then each token sums its A outputs with the routing weights.

Without an expert axis, but with tokens split over data axes, each shard dispatches its
own tokens to the (replicated) experts: no exchange, and no global sort. A tensor split
of the expert hidden width (`expert_mlp`) stays inside `shard_map`: each tensor rank runs
its slice of every expert and the outputs are summed (Megatron column -> row). On one
device it is `moe_dispatch.routed_ffn` unchanged: the oracle the tests compare against.
An FSDP split of the expert weights is gathered before `shard_map`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv2_jax.model import moe_dispatch
from dsv2_jax.parallel import sharding


class DispatchStats(NamedTuple):
  """What the MoE layer logs about one dispatch (global over all devices).

  Attributes:
    group_sizes: int [E] kept pairs per expert.
    dropped: int [] pairs dropped by the capacity limit.
    executed_rows: int [] rows the expert FFNs ran on (kept pairs + tile padding).
  """

  group_sizes: jax.Array
  dropped: jax.Array
  executed_rows: jax.Array


def mesh_routed_ffn(x: jax.Array, expert_idx: jax.Array, weights: jax.Array, w_in: jax.Array,
                    w_out: jax.Array, *, capacity_factor: float = 0.0, **ffn_kwargs
                    ) -> tuple[jax.Array, DispatchStats]:
  """Routed experts on tokens, expert-parallel when the mesh splits experts.

  Args:
    x: [X, D] tokens; expert_idx, weights: [X, A].
    w_in: [E, D, 2, F] (gated) or [E, D, F]; w_out: [E, F, D].
    capacity_factor: > 0 limits each expert to capacity_factor x (pairs / E) rows, counted
      over the pairs of one data shard (with ep > 1: of the ep shards that exchange).
    ffn_kwargs: act, gated, dtype, path, tile, max_tile (see `moe_dispatch.routed_ffn`).

  Returns:
    ([X, D] outputs, stats).
  """
  num_experts = w_out.shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  token_axes = sharding.active_mesh_axes("tokens")
  expert_axes = sharding.active_mesh_axes("expert")
  # A tensor split of the expert hidden width stays inside shard_map: partial sums.
  hidden_axes = sharding.active_mesh_axes("expert_mlp")
  if w_out.shape[1] % math.prod(mesh.shape[a] for a in hidden_axes):
    hidden_axes = ()  # Not divisible: the parameters are whole on those axes too.
  if not (token_axes or expert_axes or hidden_axes):
    return _dispatch_here(x, expert_idx, weights, w_in, w_out, capacity_factor, ffn_kwargs)
  if len(expert_axes) > 1:
    raise ValueError(f"experts may be split over one mesh axis, got {expert_axes}.")
  axis = expert_axes[0] if expert_axes else None
  if axis is not None and axis not in token_axes:
    raise ValueError(f"expert parallelism needs tokens split over {axis!r} too: add it to "
                     "the 'tokens' rule in sharding.LOGICAL_AXIS_RULES.")
  ep = mesh.shape[axis] if axis else 1
  if num_experts % ep:
    raise ValueError(f"{num_experts} experts do not split over {ep} shards of {axis!r}: "
                     "make model.moe.num_experts a multiple of mesh.expert.")
  tokens = P(token_axes or None)
  hidden = hidden_axes or None
  in_spec = P(axis, None, None, hidden) if w_in.ndim == 4 else P(axis, None, hidden)
  out_spec = P(axis, hidden, None)

  def local(x, expert_idx, weights, w_in, w_out):
    if ep > 1:
      y, sizes, dropped, executed = _exchange_and_run(
          x, expert_idx, weights, w_in, w_out, axis=axis, ep=ep,
          capacity_factor=capacity_factor, ffn_kwargs=ffn_kwargs)
      sizes = jax.lax.all_gather(sizes, axis, tiled=True)  # [E]: each shard's experts.
    else:  # Experts replicated: each data shard dispatches its own tokens, no exchange.
      y, (sizes, dropped, executed) = _dispatch_here(x, expert_idx, weights, w_in, w_out,
                                                     capacity_factor, ffn_kwargs)
    if hidden_axes:
      y = jax.lax.psum(y, hidden_axes)
    others = tuple(a for a in token_axes if a != axis)
    if others:  # Totals over the token shards (tensor ranks ran the same rows).
      sizes = jax.lax.psum(sizes, others)
    if token_axes:
      dropped, executed = jax.lax.psum((dropped, executed), token_axes)
    return y, sizes, dropped, executed

  y, sizes, dropped, executed = jax.shard_map(
      local, mesh=mesh,
      in_specs=(tokens, tokens, tokens, in_spec, out_spec),
      out_specs=(tokens, P(), P(), P()), check_vma=False,
  )(x, expert_idx, weights, w_in, w_out)
  return y, DispatchStats(sizes, dropped, executed)


def _dispatch_here(x, expert_idx, weights, w_in, w_out, capacity_factor, ffn_kwargs
                   ) -> tuple[jax.Array, DispatchStats]:
  """The single-device layer on the tokens and experts at hand (the oracle's path)."""
  limit = moe_dispatch.capacity(expert_idx.size, w_out.shape[0], capacity_factor)
  y, plan = moe_dispatch.routed_ffn(x, expert_idx, weights, w_in, w_out,
                                    capacity_limit=limit, **ffn_kwargs)
  return y, DispatchStats(plan.group_sizes, plan.dropped, plan.executed_rows)


def _exchange_and_run(x, expert_idx, weights, w_in, w_out, *, axis, ep, capacity_factor,
                      ffn_kwargs):
  """One device's part: send pairs to their experts' shards, run local experts, return."""
  x_local, k = expert_idx.shape
  e_local = w_out.shape[0]
  pairs = x_local * k
  slots = pairs  # Per destination shard: one shard may receive every pair of this device.
  shard = (expert_idx // e_local).reshape(pairs)  # [X A] destination shard of each pair.
  # Slot of each pair in the send buffer: shard-major, token order within a shard.
  order = jnp.argsort(shard, stable=True)
  counts = jnp.bincount(shard, length=ep)
  rank = jnp.arange(pairs) - (jnp.cumsum(counts) - counts)[shard[order]]
  slot = jnp.zeros((pairs,), jnp.int32).at[order].set(
      (shard[order] * slots + rank).astype(jnp.int32))  # [X A]
  slot_pair = jnp.full((ep * slots,), pairs, jnp.int32).at[slot].set(
      jnp.arange(pairs, dtype=jnp.int32))  # [ep X A] pair in each slot (X A: empty).
  send = moe_dispatch.take_rows(x, slot_pair // k, slot.reshape(x_local, k))  # [ep X A, D]
  local_expert = jnp.append(expert_idx.reshape(pairs) % e_local, e_local)[slot_pair]

  exchange = lambda a: jax.lax.all_to_all(  # noqa: E731  [ep, X A, ...] by shard, both ways.
      a.reshape(ep, slots, *a.shape[1:]), axis, 0, 0).reshape(a.shape)
  rows, row_expert = exchange(send), exchange(local_expert)  # From every source shard.
  limit = moe_dispatch.capacity(ep * pairs, e_local * ep, capacity_factor)
  ones = jnp.ones((ep * slots, 1), weights.dtype)
  out, plan = moe_dispatch.routed_ffn(rows, row_expert[:, None], ones, w_in, w_out,
                                      capacity_limit=limit, **ffn_kwargs)
  back = exchange(out)  # [ep X A, D] in this device's send layout.
  picked = moe_dispatch.take_rows(back, slot, slot_pair[:, None]).reshape(x_local, k, -1)
  y = jnp.einsum("XAD,XA->XD", picked, weights.astype(picked.dtype))
  return y, plan.group_sizes, plan.dropped, plan.executed_rows
