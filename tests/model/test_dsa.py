"""DSA: fast path == dense-mask oracle, causality (outputs and selection), limits, memory."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model import dsa, dsa_reference

Spec = dsa.DSASpec


def qkv(b, t, n, kh, h, seed=0):
  rng = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rng.randn(b, t, heads, h), jnp.float32) for heads in (n, kh, kh))
  return q, k, v


def loss_of(fn, spec, scores=None):
  def loss(q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v, spec, scores=scores)) * jnp.arange(q.shape[1])[:, None, None])
  return loss


def assert_fast_matches_reference(spec, b, t, n, kh, h, use_scores, seed=0):
  q, k, v = qkv(b, t, n, kh, h, seed)
  scores = (jnp.asarray(np.random.RandomState(seed + 1).rand(b, t), jnp.float32)
            if use_scores else None)
  fast = jax.jit(functools.partial(dsa.dsa_attention, spec=spec, scores=scores))(q, k, v)
  ref = jax.jit(functools.partial(dsa_reference.dsa_reference, spec=spec, scores=scores))(q, k, v)
  np.testing.assert_allclose(fast, ref, atol=2e-5, rtol=2e-5)
  g_fast = jax.jit(jax.grad(loss_of(dsa.dsa_attention, spec, scores), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss_of(dsa_reference.dsa_reference, spec, scores),
                           argnums=(0, 1, 2)))(q, k, v)
  for name, a, r in zip("qkv", g_fast, g_ref):
    np.testing.assert_allclose(a, r, atol=5e-4, rtol=5e-4, err_msg=f"d{name}")


CASES = [
    # (window, block, budget, value, b, t, n, kh, h)
    (8, 8, "fraction", 0.15, 2, 100, 4, 2, 8),  # T not a multiple of the block, GQA.
    (8, 8, "fraction", 0.5, 1, 64, 2, 2, 16),
    (16, 8, "log", 2.0, 2, 77, 4, 4, 8),
    (5, 6, "fixed", 3, 1, 41, 2, 1, 8),  # block = window + 1.
    (32, 32, "fraction", 0.15, 1, 20, 2, 2, 8),  # T < window: no global token at all.
    (4, 1, "fixed", 2, 1, 19, 2, 2, 8),  # One query per block: per-query selection.
    (8, 8, "fixed", 10_000, 1, 50, 2, 2, 8),  # Budget = everything eligible.
    (8, 8, "fixed", 0, 2, 30, 2, 2, 8),  # Budget 0: sliding window.
]


@pytest.mark.parametrize("case", CASES, ids=[f"W{c[0]}P{c[1]}{c[2]}{c[3]}T{c[5]}" for c in CASES])
def test_fast_equals_reference_outputs_and_gradients(case):
  w, p, budget, value, *shape = case
  spec = Spec(window=w, block=p, budget=budget, budget_value=value)
  assert_fast_matches_reference(spec, *shape, use_scores=True)


@pytest.mark.parametrize("score", dsa.SCORES)
def test_fast_equals_reference_with_each_built_in_score(score):
  spec = Spec(window=8, block=8, budget="fraction", budget_value=0.25, score=score)
  assert_fast_matches_reference(spec, 2, 72, 4, 2, 8, use_scores=False)


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(
    window=st.integers(1, 12), block_offset=st.integers(0, 12), t=st.integers(1, 70),
    budget=st.sampled_from(dsa.BUDGETS), value=st.floats(0.0, 1.0), group=st.sampled_from([1, 2]))
def test_random_cases_match_reference(window, block_offset, t, budget, value, group):
  block = max(1, window + 1 - block_offset)
  value = {"fraction": value, "log": 4 * value, "fixed": int(20 * value)}[budget]
  spec = Spec(window=window, block=block, budget=budget, budget_value=value)
  assert_fast_matches_reference(spec, 1, t, 2 * group, 2, 4, use_scores=True, seed=t)


def test_budget_zero_is_xla_sliding_window():
  q, k, v = qkv(2, 90, 4, 2, 16)
  spec = Spec(window=16, block=16, budget="fixed", budget_value=0)
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(15, 0))
  np.testing.assert_allclose(dsa.dsa_attention(q, k, v, spec), expected, atol=2e-6)


def test_selecting_everything_is_dense_causal():
  q, k, v = qkv(1, 75, 4, 4, 8)
  spec = Spec(window=6, block=7, budget="fraction", budget_value=1.0)
  expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(dsa.dsa_attention(q, k, v, spec), expected, atol=2e-6)


def test_mask_matches_a_hand_written_example():
  spec = Spec(window=2, block=2, budget="fixed", budget_value=1)
  scores = jnp.asarray([[0.1, 0.9, 0.5, 0.95, 0.2, 0.3, 0.7, 0.4]])
  expected = np.array([
      [1, 0, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0, 0],
      [0, 1, 1, 0, 0, 0, 0, 0],  # Block 1 selects 1 (eligible: 0, 1); too close for t=2.
      [0, 1, 1, 1, 0, 0, 0, 0],
      [0, 0, 0, 1, 1, 0, 0, 0],  # Block 2 selects 3 (eligible: 0..3); in t=4's window.
      [0, 0, 0, 1, 1, 1, 0, 0],
      [0, 0, 0, 1, 0, 1, 1, 0],  # Block 3 selects 3 again (eligible: 0..5).
      [0, 0, 0, 1, 0, 0, 1, 1],
  ], bool)
  np.testing.assert_array_equal(dsa_reference.dsa_mask(spec, scores)[0], expected)


@pytest.mark.parametrize("budget,value", [("fraction", 0.15), ("log", 3.0), ("fixed", 7)])
def test_running_selection_equals_direct_top_k(budget, value):
  spec = Spec(window=16, block=16, budget=budget, budget_value=value)
  scores = jnp.asarray(np.random.RandomState(3).rand(2, 320), jnp.float32)
  slots = dsa.max_budget(spec, 320)
  sel = dsa.select_global(spec, scores, slots)
  ref = dsa_reference.select_global_reference(spec, scores, slots)
  idx, valid, ref_idx, ref_valid = sel.idx, sel.valid(), ref.idx, ref.valid()
  np.testing.assert_array_equal(valid, ref_valid)
  np.testing.assert_array_equal(np.where(valid, idx, -1), np.where(ref_valid, ref_idx, -1))
  counts = valid.sum(-1)[0]  # Budgets grow with the block's end position.
  assert counts[0] == 0 and counts[-1] == slots and np.all(np.diff(counts) >= 0)


def test_selection_of_a_block_reads_no_score_at_or_after_the_block():
  spec = Spec(window=8, block=8, budget="fraction", budget_value=0.3)
  rng = np.random.RandomState(0)
  scores = rng.rand(1, 128).astype(np.float32)
  slots = dsa.max_budget(spec, 128)
  sel = dsa.select_global(spec, jnp.asarray(scores), slots)
  idx, valid = sel.idx, sel.valid()
  for u in (3, 7, 12):
    changed = scores.copy()
    changed[:, u * spec.block:] = rng.rand(1, 128 - u * spec.block) * 10  # Future scores.
    sel2 = dsa.select_global(spec, jnp.asarray(changed), slots)
    idx2, valid2 = sel2.idx, sel2.valid()
    np.testing.assert_array_equal(idx[:, :u + 1], idx2[:, :u + 1])
    np.testing.assert_array_equal(valid[:, :u + 1], valid2[:, :u + 1])
    assert not np.array_equal(idx[:, u + 1:], idx2[:, u + 1:])  # Later blocks do change.


@pytest.mark.parametrize("score", dsa.SCORES)
def test_changing_later_tokens_leaves_earlier_outputs_unchanged(score):
  spec = Spec(window=8, block=8, budget="fraction", budget_value=0.3, score=score)
  q, k, v = qkv(1, 96, 4, 2, 8)
  attend = jax.jit(functools.partial(dsa.dsa_attention, spec=spec))
  out = attend(q, k, v)
  t = 50
  noise = qkv(1, 96, 4, 2, 8, seed=9)
  q2, k2, v2 = (x.at[:, t + 1:].set(y[:, t + 1:] * 3) for x, y in zip((q, k, v), noise))
  out2 = attend(q2, k2, v2)
  np.testing.assert_array_equal(out[:, :t + 1], out2[:, :t + 1])
  assert np.abs(np.asarray(out[:, t + 1:] - out2[:, t + 1:])).max() > 1e-3


def test_fast_entropy_equals_dense_entropy():
  q, k, v = qkv(2, 70, 4, 2, 8)
  spec = Spec(window=8, block=8, score="entropy")
  _, scores = dsa.dsa_attention(q, k, v, spec, return_scores=True)
  np.testing.assert_allclose(scores, dsa_reference.reference_local_entropy(q, k, 8), atol=1e-5)
  assert float(scores[0, 0]) == pytest.approx(0.0, abs=1e-6)  # One key: zero entropy.


def test_compiled_memory_grows_linearly_not_quadratically():
  spec = Spec(window=32, block=32, budget="fraction", budget_value=0.15)
  temps = {}
  for t in (1024, 2048):
    q, k, v = (jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32) for _ in range(3))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(dsa.dsa_attention(q, k, v, spec)),
                            argnums=(0, 1, 2)))
    temps[t] = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temps[2048] / temps[1024] < 2.3, temps  # n x n buffers would give ~4.
  assert temps[2048] < 2048 * 2048 * 4 * 4 / 2  # Below half of one f32 [N, n, n] tensor.
