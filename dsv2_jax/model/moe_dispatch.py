"""Dropless MoE dispatch: sort token-expert pairs by expert, run each expert on its rows only.

Routing gives every token A (expert, weight) pairs. `plan_dispatch` sorts the X A pairs
by expert (stable, so earlier tokens come first within an expert), applies an optional
per-expert capacity (pairs past it are dropped: weight 0, counted), and lays the kept
pairs out in expert-contiguous groups. Two grouped-FFN paths consume that layout:

  tiled       (CPU default) every group is padded to a multiple of `tile` rows and
              covered by tiles of max_tile, max_tile / 2, ..., tile rows (the largest
              first, so most rows run in large matmuls); one while-loop per tile size
              runs one expert FFN per tile, for the tiles in use only, so the executed
              FLOPs are (kept pairs + padding) x the FFN's per-row FLOPs, with
              padding < E x tile. A custom VJP loops over the same tiles backwards; the
              expert-weight gradients are accumulated in place, one expert slice per
              tile (autodiff of the loop would add a full [E, D, F] zero-padded
              gradient per tile).
  ragged_dot  (GPU/TPU default) `jax.lax.ragged_dot` over the unpadded groups. On CPU,
              XLA expands it to a dense matmul per group over all rows (E x the FLOPs).

`combine` gathers each pair's expert output back to its token and sums with the
routing weights. Both paths equal the article's loop over all experts
(`moe_reference.gated_routing`) up to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv2_jax.model.ffn import gated as gated_activation

Activation = Callable[[jax.Array], jax.Array]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["start", "expert", "count"],
                   meta_fields=["size"])
@dataclasses.dataclass(frozen=True)
class TileClass:
  """The tiles of one size: a while-loop runs `count` of them, each over `size` rows.

  Attributes:
    start: int [max tiles] first buffer row of each tile.
    expert: int [max tiles] expert of each tile.
    count: int [] tiles in use (the first `count` entries).
    size: rows per tile (static).
  """

  start: jax.Array
  expert: jax.Array
  count: jax.Array
  size: int


class DispatchPlan(NamedTuple):
  """Where each (token, choice) pair goes. X tokens, A choices, E experts, R buffer rows.

  Attributes:
    row_pair: int [R] flat pair (token x A + choice) held by each row (X A for padding).
    dest: int [X, A] buffer row of each pair (R for a dropped pair: a zero row).
    tiles: the tile classes covering the groups, largest first (the tiled path's loops).
    executed_rows: int [] rows the tiles cover: kept pairs + padding.
    group_sizes: int [E] kept pairs per expert.
    dropped: int [] pairs dropped by the capacity limit.
    tile: the padding unit: groups are padded to a multiple of it (static; 1 = unpadded).
  """

  row_pair: jax.Array
  dest: jax.Array
  tiles: tuple[TileClass, ...]
  executed_rows: jax.Array
  group_sizes: jax.Array
  dropped: jax.Array
  tile: int

  @property
  def source(self) -> jax.Array:
    """int [R] token feeding each buffer row (X for padding: a zero row)."""
    return self.row_pair // self.dest.shape[1]


MAX_TILE = 128  # Default largest tile of the tiled path (rows per expert matmul).


def auto_tile(num_pairs: int, num_experts: int) -> int:
  """Largest power of two in [8, 128] whose expected padding (E tile / 2) stays <= 10%
  of the pairs: the padding unit, small enough for the FLOP bound."""
  tile = 128
  while tile > 8 and num_experts * tile / 2 > 0.1 * num_pairs:
    tile //= 2
  return tile


def tile_sizes(tile: int, max_tile: int) -> tuple[int, ...]:
  """Tile classes, largest first: max_tile, max_tile / 2, ..., tile (powers-of-two steps).

  A group padded to a multiple of `tile` is covered by as many max_tile tiles as fit,
  then by the binary decomposition of the rest, so most rows run in large matmuls while
  the padding stays below one `tile` per expert.
  """
  if max_tile < tile:
    raise ValueError(f"max_tile={max_tile} must be >= tile={tile}.")
  sizes = [tile]
  while sizes[-1] * 2 <= max_tile:
    sizes.append(sizes[-1] * 2)
  return tuple(reversed(sizes))


def capacity(num_pairs: int, num_experts: int, capacity_factor: float) -> int | None:
  """Per-expert row limit C, or None (dropless) when capacity_factor <= 0."""
  if capacity_factor <= 0:
    return None
  return max(1, math.ceil(capacity_factor * num_pairs / num_experts))


def plan_dispatch(expert_idx: jax.Array, num_experts: int, tile: int,
                  capacity_limit: int | None = None, max_tile: int = 0) -> DispatchPlan:
  """Sorts the pairs of `expert_idx` [X, A] into expert-contiguous groups.

  With tile > 1 each group is padded to a multiple of `tile` rows and covered by tiles
  of the sizes `tile_sizes(tile, max_tile)` (max_tile 0: tile only); with tile = 1 the
  groups are packed with no gaps (ragged_dot path).

  An entry equal to `num_experts` marks an empty slot (expert parallelism's receive
  buffer): it is never executed, nor counted as kept or dropped.
  """
  x, k = expert_idx.shape
  pairs = x * k
  flat = expert_idx.reshape(pairs)
  order = jnp.argsort(flat, stable=True)  # Pair ids, grouped by expert, token order kept.
  sorted_expert = flat[order]
  valid = sorted_expert < num_experts  # Empty slots sort last.
  sorted_expert = jnp.minimum(sorted_expert, num_experts - 1)
  counts = jnp.bincount(flat, length=num_experts)  # Drops the empty-slot marker.
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(pairs) - starts[sorted_expert]  # Position within its expert's group.
  kept_counts = counts if capacity_limit is None else jnp.minimum(counts, capacity_limit)
  keep = valid & (rank < kept_counts[sorted_expert])
  padded = (kept_counts + tile - 1) // tile * tile
  padded_starts = jnp.cumsum(padded) - padded
  rows = buffer_rows(pairs, num_experts, tile, capacity_limit)
  dest_sorted = jnp.where(keep, padded_starts[sorted_expert] + rank, rows)
  dest = jnp.full((pairs,), rows, jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
  row_pair = jnp.full((rows + 1,), pairs, jnp.int32).at[dest_sorted].set(
      order.astype(jnp.int32))[:rows]  # Row `rows` absorbs the dropped pairs.
  sizes = tile_sizes(tile, max(tile, min(max_tile or tile, rows)))
  tiles = tile_classes(padded, padded_starts, rows, sizes)
  return DispatchPlan(row_pair=row_pair, dest=dest.reshape(x, k), tiles=tiles,
                      executed_rows=jnp.sum(padded).astype(jnp.int32),
                      group_sizes=kept_counts.astype(jnp.int32),
                      dropped=(jnp.sum(counts) - jnp.sum(kept_counts)).astype(jnp.int32),
                      tile=tile)


def tile_classes(padded: jax.Array, padded_starts: jax.Array, rows: int,
                 sizes: tuple[int, ...]) -> tuple[TileClass, ...]:
  """Covers each group (padded [E] rows from padded_starts [E]) with tiles of `sizes`.

  Within a group: first the largest tiles, as many as fit, then one tile of each
  smaller size whose bit is set in the remainder (sizes are successive halvings).
  """
  num_experts = padded.shape[0]
  classes = []
  for c, size in enumerate(sizes):
    if c == 0:
      per_expert, offset = padded // size, jnp.zeros_like(padded)
    else:  # At most one tile of this size: the `size` bit of the group's row count.
      per_expert, offset = (padded // size) % 2, padded - padded % (2 * size)
    max_tiles = rows // size if c == 0 else min(num_experts, rows // size)
    ends = jnp.cumsum(per_expert)
    j = jnp.arange(max_tiles)
    expert = jnp.minimum(jnp.searchsorted(ends, j, side="right"), num_experts - 1)
    within = j - (ends[expert] - per_expert[expert])
    start = jnp.clip(padded_starts[expert] + offset[expert] + within * size, 0, rows - size)
    classes.append(TileClass(start=start.astype(jnp.int32), expert=expert.astype(jnp.int32),
                             count=ends[-1].astype(jnp.int32), size=size))
  return tuple(classes)


def buffer_rows(num_pairs: int, num_experts: int, tile: int, capacity_limit: int | None) -> int:
  """Static row count that holds every kept pair plus each group's padding."""
  if tile == 1:
    return num_pairs
  worst = num_pairs + num_experts * (tile - 1)
  if capacity_limit is not None:
    worst = min(worst, num_experts * (-(-capacity_limit // tile) * tile))
  return -(-worst // tile) * tile


@jax.custom_vjp
def take_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """out[i] = x[index[i]] (index len(x): a zero row), with a gather as its transpose.

  `inverse` [len(x), m] lists, for each row of x, every i with index[i] == that row
  (padded with len(index)), so the gradient d_x[t] = sum_m d_out[inverse[t, m]] is a
  gather and a sum rather than XLA's scatter-add, which runs row by row on CPU.
  """
  return _take_with_zero_row(x, index)


def _take_with_zero_row(x: jax.Array, index: jax.Array) -> jax.Array:
  x_pad = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)
  return jnp.take(x_pad, index, axis=0)


def _take_rows_fwd(x, index, inverse):
  return _take_with_zero_row(x, index), (index, inverse)


def _take_rows_bwd(residuals, d_out):
  index, inverse = residuals
  d_x = jnp.sum(_take_with_zero_row(d_out, inverse), axis=1)
  return d_x, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def gather_rows(x: jax.Array, plan: DispatchPlan) -> jax.Array:
  """[X, D] tokens -> [R, D] expert-sorted buffer (padding rows are zero)."""
  return take_rows(x, plan.source, plan.dest)


def combine(y: jax.Array, plan: DispatchPlan, weights: jax.Array) -> jax.Array:
  """[R, D] expert outputs -> [X, D]: sum over each token's A pairs of weight x output."""
  x, k = plan.dest.shape
  picked = take_rows(y, plan.dest.reshape(x * k), plan.row_pair[:, None])
  picked = picked.reshape(x, k, y.shape[1])  # Dropped pairs read the zero row.
  return jnp.einsum("XAD,XA->XD", picked, weights.astype(picked.dtype))


# --- expert FFN on one group of rows -------------------------------------------------------

def _dot(a: jax.Array, b: jax.Array, dtype: jnp.dtype) -> jax.Array:
  return jnp.dot(a.astype(dtype), b.astype(dtype),
                 preferred_element_type=jnp.float32).astype(dtype)


def flat_in(w_in: jax.Array) -> jax.Array:
  """[E, D, 2, F] (gated: gate, up) or [E, D, F] -> [E, D, 2F or F]: one input matmul per expert."""
  return w_in.reshape(*w_in.shape[:2], -1)


def expert_pre(x: jax.Array, w_in: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Input projection of one expert: x [rows, D], w_in [D, 2F or F] -> [rows, 2F or F]
  (gated: gate | up)."""
  return _dot(x, w_in, dtype)


def expert_post(pre: jax.Array, w_out: jax.Array, act: Activation, gated: bool,
                dtype: jnp.dtype) -> jax.Array:
  """Activation and output projection: pre [rows, 2F or F], w_out [F, D] -> [rows, D]."""
  f = w_out.shape[0]
  hidden = gated_activation(act, pre[:, :f], pre[:, f:]) if gated else act(pre)
  return _dot(hidden, w_out, dtype)


def expert_ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, act: Activation,
               gated: bool, dtype: jnp.dtype) -> jax.Array:
  """One expert on rows x [rows, D]; w_in [D, 2F or F] (see `flat_in`); w_out [F, D]."""
  return expert_post(expert_pre(x, w_in, dtype), w_out, act, gated, dtype)


# --- tiled path ----------------------------------------------------------------------------

def _for_each_tile(tiles: tuple[TileClass, ...], body, carry):
  """Runs body(start, expert, size, carry) over the used tiles of every class."""
  for tc in tiles:
    def step(j, carry, tc=tc):
      return body(tc.start[j], tc.expert[j], tc.size, carry)
    carry = jax.lax.fori_loop(0, tc.count, step, carry)
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def tiled_ffn(rows: jax.Array, w_in: jax.Array, w_out: jax.Array,
              tiles: tuple[TileClass, ...], act: Activation, gated: bool,
              dtype: jnp.dtype) -> jax.Array:
  """Expert FFNs over a tiled buffer: rows [R, D] -> [R, D]; rows no tile covers are zero.

  w_in: [E, D, 2F or F] (`flat_in`), w_out: [E, F, D]. The forward keeps the input
  projections [R, 2F or F] for the backward, so forward + backward execute 3x the
  forward's matmul FLOPs, as plain autodiff would, over the used tiles only.
  """
  return _tiled_forward(rows, w_in, w_out, tiles, act, gated, dtype)[0]


def _tiled_forward(rows, w_in, w_out, tiles, act, gated, dtype):
  def body(start, e, size, carry):
    out, pre_all = carry
    x = jax.lax.dynamic_slice_in_dim(rows, start, size, axis=0)
    pre = expert_pre(x, w_in[e], dtype)
    y = expert_post(pre, w_out[e], act, gated, dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, y, start, axis=0)
    pre_all = jax.lax.dynamic_update_slice_in_dim(pre_all, pre, start, axis=0)
    return out, pre_all

  init = (jnp.zeros(rows.shape, dtype), jnp.zeros((rows.shape[0], w_in.shape[-1]), dtype))
  out, pre_all = _for_each_tile(tiles, body, init)
  pre_all = checkpoint_name(pre_all, "moe_expert_pre")  # The backward's main residual.
  return out, (rows, w_in, w_out, tiles, pre_all)


def _tiled_backward(act, gated, dtype, residuals, d_out):
  rows, w_in, w_out, tiles, pre_all = residuals

  def body(start, e, size, carry):
    d_rows, d_in, d_w_out = carry
    x = jax.lax.dynamic_slice_in_dim(rows, start, size, axis=0)
    pre = jax.lax.dynamic_slice_in_dim(pre_all, start, size, axis=0)
    dy = jax.lax.dynamic_slice_in_dim(d_out, start, size, axis=0).astype(dtype)
    _, post_vjp = jax.vjp(lambda p, w: expert_post(p, w, act, gated, dtype), pre, w_out[e])
    d_pre, dwo = post_vjp(dy)
    dx = _dot(d_pre, w_in[e].T, dtype)
    dwi = jnp.dot(x.T.astype(dtype), d_pre.astype(dtype), preferred_element_type=jnp.float32)
    d_rows = jax.lax.dynamic_update_slice_in_dim(d_rows, dx.astype(d_rows.dtype), start, 0)
    d_in = d_in.at[e].add(dwi.astype(d_in.dtype))  # In place: one expert's slice.
    d_w_out = d_w_out.at[e].add(dwo.astype(d_w_out.dtype))
    return d_rows, d_in, d_w_out

  init = (jnp.zeros_like(rows), jnp.zeros_like(w_in), jnp.zeros_like(w_out))
  d_rows, d_in, d_w_out = _for_each_tile(tiles, body, init)
  return d_rows, d_in, d_w_out, None


tiled_ffn.defvjp(_tiled_forward, _tiled_backward)


# --- ragged_dot path -----------------------------------------------------------------------

def ragged_ffn(rows: jax.Array, w_in: jax.Array, w_out: jax.Array, group_sizes: jax.Array,
               act: Activation, gated: bool, dtype: jnp.dtype) -> jax.Array:
  """Expert FFNs with `jax.lax.ragged_dot` over packed groups: rows [R, D] -> [R, D];
  w_in [E, D, 2F or F] (`flat_in`)."""
  dot = lambda a, b: jax.lax.ragged_dot(a.astype(dtype), b.astype(dtype), group_sizes,  # noqa: E731
                                        preferred_element_type=jnp.float32).astype(dtype)
  f = w_out.shape[1]
  pre = checkpoint_name(dot(rows, w_in), "moe_expert_pre")
  hidden = gated_activation(act, pre[:, :f], pre[:, f:]) if gated else act(pre)
  return dot(hidden, w_out)


DISPATCH_PATHS = ("auto", "tiled", "ragged_dot")  # `model.moe.dispatch`; auto: `default_path`.


def default_path() -> str:
  """'tiled' on CPU (ragged_dot runs every group densely there), else 'ragged_dot'."""
  return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"


def routed_ffn(x: jax.Array, expert_idx: jax.Array, weights: jax.Array, w_in: jax.Array,
               w_out: jax.Array, *, act: Activation, gated: bool, dtype: jnp.dtype,
               path: str = "auto", tile: int = 0, max_tile: int = MAX_TILE,
               capacity_limit: int | None = None) -> tuple[jax.Array, DispatchPlan]:
  """Routed experts on the tokens and experts at hand (one device, or inside `shard_map`):
  x [X, D], expert_idx / weights [X, A] -> ([X, D], plan).

  w_in: [E, D, 2, F] (gate, up) if gated else [E, D, F]; w_out: [E, F, D].

  Only the chosen experts run on each token; `plan` carries the load statistics.
  """
  num_experts = w_out.shape[0]
  w_in = flat_in(w_in)
  path = default_path() if path == "auto" else path
  pairs = expert_idx.size
  if path == "tiled":
    tile = tile or auto_tile(pairs, num_experts)
    plan = plan_dispatch(expert_idx, num_experts, tile, capacity_limit, max_tile)
    rows = checkpoint_name(gather_rows(x, plan), "moe_rows")
    y = tiled_ffn(rows, w_in, w_out, plan.tiles, act, gated, dtype)  # [R, D]
  elif path == "ragged_dot":
    plan = plan_dispatch(expert_idx, num_experts, 1, capacity_limit)
    rows = checkpoint_name(gather_rows(x, plan), "moe_rows")
    y = ragged_ffn(rows, w_in, w_out, plan.group_sizes, act, gated, dtype)
  else:
    raise ValueError(f"unknown MoE dispatch path {path!r}; use 'auto', 'tiled' or 'ragged_dot'.")
  y = checkpoint_name(y, "moe_expert_out")  # Read by the combine's weight gradient.
  return combine(y, plan, weights), plan
