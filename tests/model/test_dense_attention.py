"""The dense causal kernel (query chunks + hand-written VJP) against XLA's attention.

Oracle: `jax.nn.dot_product_attention(..., is_causal=True, implementation='xla')`, with a
segment mask for packed rows. Outputs and all three gradients must agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model import dense_attention


def oracle(q, k, v, segments=None):
  mask = None
  if segments is not None:
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                      implementation="xla")


def sample(b, t, n, kv, h, dtype=jnp.float32, seed=0):
  rng = np.random.RandomState(seed)
  q, g = (jnp.asarray(rng.randn(b, t, n, h), dtype) for _ in range(2))
  k, v = (jnp.asarray(rng.randn(b, t, kv, h), dtype) for _ in range(2))
  return q, k, v, g


def value_and_grads(fn, q, k, v, g):
  out, pull = jax.vjp(fn, q, k, v)
  return (out, *pull(g))


@pytest.mark.parametrize("t,n,kv,chunk", [
    (64, 4, 4, None),   # one chunk (T = MIN_CHUNK)
    (256, 4, 4, 64),    # four chunks
    (130, 4, 2, 64),    # grouped-query heads; the last chunk is 2 queries long
    (96, 4, 1, 32),     # one key/value head (multi-query)
])
def test_matches_xla_attention_and_its_gradients(t, n, kv, chunk):
  q, k, v, g = sample(2, t, n, kv, 16)
  ours = value_and_grads(
      lambda *a: dense_attention.causal_attention(*a, chunk=chunk), q, k, v, g)
  ref = value_and_grads(oracle, q, k, v, g)
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_packed_segments_stay_within_their_example():
  q, k, v, g = sample(2, 100, 4, 2, 8, seed=1)
  segments = jnp.asarray(np.sort(np.random.RandomState(2).randint(0, 4, (2, 100)), axis=1))
  ours = value_and_grads(
      lambda *a: dense_attention.causal_attention(*a, segments, chunk=32), q, k, v, g)
  ref = value_and_grads(lambda *a: oracle(*a, segments), q, k, v, g)
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.isfinite(np.asarray(a)).all(), name


def test_bfloat16_agrees_with_the_f32_kernel_to_bf16_rounding():
  q, k, v, g = sample(1, 128, 4, 4, 32)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v, g)]
  ours = value_and_grads(dense_attention.causal_attention, *low)
  ref = value_and_grads(dense_attention.causal_attention, *(x.astype(jnp.float32)
                                                             for x in low))
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
    assert a.dtype == jnp.bfloat16, name
    scale = float(jnp.abs(b).max())
    assert float(jnp.abs(a.astype(jnp.float32) - b).max()) < 0.02 * scale, name


def test_query_chunk_keeps_chunks_wide_and_few():
  assert dense_attention.query_chunk(32) == dense_attention.MIN_CHUNK
  assert dense_attention.query_chunk(256) == 64
  assert dense_attention.query_chunk(1024) == 128
  assert dense_attention.query_chunk(16384) == 2048
  assert -(-1000 // dense_attention.query_chunk(1000)) <= dense_attention.MAX_CHUNKS
