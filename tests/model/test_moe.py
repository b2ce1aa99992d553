"""GMoE: dropless dispatch == the article's all-experts loop (outputs and gradients),
capacity dropping, routing, balancing losses and statistics."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model import moe, moe_dispatch
from dsv2_jax.model.moe_reference import gated_routing

ACTS = {"swiglu": (jax.nn.silu, True), "gelu": (jax.nn.gelu, False)}


def problem(x_tokens, d, f, e, k, gated, seed=0, skew=0.0):
  """Random tokens, expert weights and a top-k routing; `skew` > 0 makes loads uneven."""
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(x_tokens, d), jnp.float32)
  w_in = jnp.asarray(rng.randn(e, d, *((2,) if gated else ()), f) / np.sqrt(d), jnp.float32)
  w_out = jnp.asarray(rng.randn(e, f, d) / np.sqrt(f), jnp.float32)
  logits = rng.randn(x_tokens, e) - skew * np.arange(e)  # Skew: low ids are popular.
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32))
  weights, idx = jax.lax.top_k(probs, k)
  return x, w_in, w_out, idx, weights


def check_against_oracle(x, w_in, w_out, idx, weights, act_name, path, tile=0, factor=0.0,
                         max_tile=0):
  act, gated = ACTS[act_name]
  e = w_out.shape[0]
  limit = moe_dispatch.capacity(idx.size, e, factor)

  def ours(x, w_in, w_out, weights):
    return moe_dispatch.routed_ffn(x, idx, weights, w_in, w_out, act=act, gated=gated,
                                   dtype=jnp.float32, path=path, tile=tile,
                                   max_tile=max_tile or tile, capacity_limit=limit)

  y, plan = jax.jit(ours)(x, w_in, w_out, weights)
  keep = np.asarray(plan.dest) < plan.source.shape[0]
  oracle = functools.partial(gated_routing, act=act, gated=gated, keep=jnp.asarray(keep))
  ref = oracle(x, idx, weights, w_in, w_out)
  np.testing.assert_allclose(y, ref, atol=2e-5, rtol=2e-5)

  probe = jnp.asarray(np.random.RandomState(7).randn(*x.shape), jnp.float32)
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a)[0] * probe), argnums=(0, 1, 2, 3))(
      x, w_in, w_out, weights)
  g_ref = jax.grad(lambda x, a, b, w: jnp.sum(oracle(x, idx, w, a, b) * probe),
                   argnums=(0, 1, 2, 3))(x, w_in, w_out, weights)
  for name, a, r in zip(("x", "w_in", "w_out", "weights"), g_ours, g_ref):
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=5e-5, err_msg=name)
  return plan, keep


@pytest.mark.parametrize("path", ["tiled", "ragged_dot"])
@pytest.mark.parametrize("e,k,act_name,tile,max_tile,skew", [
    (8, 2, "swiglu", 4, 4, 0.0),
    (4, 4, "swiglu", 8, 8, 0.0),      # E = k: every token uses every expert.
    (16, 4, "gelu", 8, 8, 1.5),       # Uneven loads; some experts get nothing.
    (6, 1, "swiglu", 1, 1, 0.5),      # Tile of one row.
    (5, 3, "gelu", 16, 16, 0.0),      # Tiles larger than most groups.
    (3, 2, "swiglu", 2, 16, 0.5),     # Tile classes 16, 8, 4, 2 per group.
    (4, 2, "gelu", 4, 512, 1.0),      # Largest class above the buffer: clamped.
])
def test_dropless_dispatch_equals_the_article_loop(path, e, k, act_name, tile, max_tile, skew):
  x, w_in, w_out, idx, weights = problem(37, 12, 20, e, k, ACTS[act_name][1], skew=skew)
  plan, keep = check_against_oracle(x, w_in, w_out, idx, weights, act_name, path, tile,
                                    max_tile=max_tile)
  assert keep.all() and int(plan.dropped) == 0
  np.testing.assert_array_equal(plan.group_sizes, np.bincount(np.asarray(idx).ravel(),
                                                              minlength=e))


@pytest.mark.parametrize("path", ["tiled", "ragged_dot"])
def test_capacity_drops_overflow_in_token_order_and_dropped_pairs_contribute_zero(path):
  e, k = 4, 2
  x, w_in, w_out, idx, weights = problem(40, 8, 16, e, k, True, skew=2.0)
  factor = 0.5  # Capacity 10 rows per expert for 80 pairs: the popular experts overflow.
  plan, keep = check_against_oracle(x, w_in, w_out, idx, weights, "swiglu", path, 4, factor)
  limit = moe_dispatch.capacity(idx.size, e, factor)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=e)
  np.testing.assert_array_equal(plan.group_sizes, np.minimum(counts, limit))
  assert int(plan.dropped) == (counts - np.minimum(counts, limit)).sum() > 0
  # The earliest tokens keep their slot: pair (t, j) of expert e is kept iff fewer than
  # `limit` pairs of e come before it in token order.
  flat = np.asarray(idx).ravel()
  expected = np.array([np.sum(flat[:i] == flat[i]) < limit for i in range(flat.size)])
  np.testing.assert_array_equal(keep.ravel(), expected)
  # A token whose every pair is dropped gets exactly zero output.
  y, _ = moe_dispatch.routed_ffn(x, idx, weights, w_in, w_out, act=jax.nn.silu, gated=True,
                                 dtype=jnp.float32, path=path, tile=4, capacity_limit=limit)
  all_dropped = ~keep.any(axis=1)
  assert all_dropped.any()
  assert np.all(np.asarray(y)[all_dropped] == 0.0)


@hypothesis.settings(max_examples=4, deadline=None)
@hypothesis.given(tokens=st.integers(1, 40), e=st.integers(1, 10), data=st.data(),
                  tile=st.sampled_from([1, 2, 4, 8, 32]), seed=st.integers(0, 1000),
                  skew=st.floats(0.0, 3.0), gated=st.booleans())
def test_random_routings_match_the_oracle(tokens, e, data, tile, seed, skew, gated):
  k = data.draw(st.integers(1, e))
  factor = data.draw(st.sampled_from([0.0, 0.0, 0.7, 1.25]))
  act_name = "swiglu" if gated else "gelu"
  x, w_in, w_out, idx, weights = problem(tokens, 6, 10, e, k, gated, seed, skew)
  max_tile = tile * data.draw(st.sampled_from([1, 2, 8]))
  check_against_oracle(x, w_in, w_out, idx, weights, act_name, "tiled", tile, factor, max_tile)


@pytest.mark.parametrize("tile,max_tile,factor", [(8, 8, 0.0), (2, 16, 0.0), (4, 32, 0.8)])
def test_tiles_cover_each_group_once_with_the_largest_tiles_first(tile, max_tile, factor):
  """Executed rows = kept pairs + per-expert padding < E x tile, not the buffer size; each
  padded group is covered exactly once by its own expert's tiles, largest first."""
  e, k, x_tokens = 16, 2, 200
  *_, idx, _ = problem(x_tokens, 4, 4, e, k, True, skew=0.3)
  limit = moe_dispatch.capacity(idx.size, e, factor)
  plan = moe_dispatch.plan_dispatch(idx, e, tile, limit, max_tile)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=e)
  kept = counts if limit is None else np.minimum(counts, limit)
  padded = -(-kept // tile) * tile
  assert int(plan.executed_rows) == padded.sum()
  assert kept.sum() <= padded.sum() < kept.sum() + e * tile
  sizes = [tc.size for tc in plan.tiles]
  assert sizes == [max_tile // 2 ** i for i in range(len(sizes))] and sizes[-1] == tile
  owner = np.full(plan.source.shape[0], -1)
  for tc in plan.tiles:
    for j in range(int(tc.count)):
      start, expert = int(tc.start[j]), int(tc.expert[j])
      assert (owner[start:start + tc.size] == -1).all(), "tiles overlap"
      owner[start:start + tc.size] = expert
  offsets = np.cumsum(padded) - padded
  for expert in range(e):  # Exactly the group's rows, owned by the group's expert.
    np.testing.assert_array_equal(owner[offsets[expert]:offsets[expert] + padded[expert]], expert)
  assert (owner[padded.sum():] == -1).all()
  # Largest first: a group of n padded rows uses n // max_tile large tiles, then the bits.
  large = plan.tiles[0]
  np.testing.assert_array_equal(np.bincount(np.asarray(large.expert[:int(large.count)]),
                                            minlength=e), padded // max_tile)
  # Every used row holds a token routed to the tile's expert (or padding).
  source = np.asarray(plan.source)
  flat_expert = np.asarray(idx)
  for row in np.flatnonzero(owner >= 0):
    if source[row] < x_tokens:
      assert owner[row] in flat_expert[source[row]]


def test_auto_tile_keeps_padding_within_ten_percent():
  for pairs, e in ((16384, 128), (4096, 8), (64, 64), (1_000_000, 128)):
    tile = moe_dispatch.auto_tile(pairs, e)
    assert 8 <= tile <= 128 and (e * tile / 2 <= 0.1 * pairs or tile == 8)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_skewed():
  e, k, x = 8, 2, 64
  probs = jnp.full((x, e), 1.0 / e)
  idx = jnp.asarray(np.arange(x * k).reshape(x, k) % e)
  np.testing.assert_allclose(moe.load_balancing_loss(probs, idx, e), 1.0, rtol=1e-6)
  skewed = jax.nn.softmax(jnp.asarray(np.random.RandomState(0).randn(x, e) - np.arange(e)))
  _, idx2 = jax.lax.top_k(skewed, k)
  assert float(moe.load_balancing_loss(skewed, idx2, e)) > 1.5
  # The gradient flows through the probabilities only.
  g = jax.grad(lambda p: moe.load_balancing_loss(p, idx2, e))(skewed)
  assert np.abs(np.asarray(g)).max() > 0


def test_router_z_loss_matches_its_formula():
  logits = jnp.asarray(np.random.RandomState(1).randn(5, 7), jnp.float32)
  expected = np.mean(np.log(np.sum(np.exp(np.asarray(logits)), axis=-1)) ** 2)
  np.testing.assert_allclose(moe.router_z_loss(logits), expected, rtol=1e-5)
