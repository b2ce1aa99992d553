"""Packed rows (explicit positions): every example sees only itself, and the scalar head.

A row of first-fit packing holds whole examples back to back, each with positions
restarting at 0, then padding. The oracle is each example run alone in its own row:
its logits must be the same whatever shares the row. Learned positions make a wrong
position index visible too (RoPE alone only sees relative offsets).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import init, small_model_config

LENGTHS = (5, 7, 4)  # Examples a, b, c; a row of T = 20 ends with 4 padding tokens.
T = 20
PAD = 257


def packed_row(examples: list[np.ndarray], pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, positions) int32 [T] of `examples` back to back, then padding at position 0
  (as grain's first-fit packing pads)."""
  tokens = np.concatenate(examples + [np.full(T - sum(map(len, examples)), pad)])
  positions = np.concatenate([np.arange(len(e)) for e in examples]
                             + [np.zeros(T - sum(map(len, examples)), np.int64)])
  return tokens.astype(np.int32), positions.astype(np.int32)


def examples(seed: int = 0) -> list[np.ndarray]:
  rng = np.random.RandomState(seed)
  return [rng.randint(0, 256, n).astype(np.int32) for n in LENGTHS]


@pytest.mark.parametrize("kw", [dict(), dict(position="learned", num_kv_heads=2),
                                dict(scan_layers=False, head="scalar")],
                         ids=["rope", "learned_gqa", "unscanned_scalar"])
def test_each_packed_example_equals_the_example_alone(kw):
  model, params, _ = init(small_model_config(**kw), t=T)
  a, b, c = examples()
  # Two rows in different orders: an example's output depends neither on its neighbours
  # nor on where in the row it sits.
  rows = [packed_row([a, b, c]), packed_row([c, a, b])]
  tokens = jnp.asarray(np.stack([r[0] for r in rows]))
  positions = jnp.asarray(np.stack([r[1] for r in rows]))
  out = np.asarray(model.apply({"params": params}, tokens, positions))
  alone = {i: np.asarray(model.apply({"params": params}, jnp.asarray(e[None])))[0]
           for i, e in enumerate((a, b, c))}
  for row, order in enumerate([(0, 1, 2), (2, 0, 1)]):
    start = 0
    for i in order:
      n = LENGTHS[i]
      np.testing.assert_allclose(out[row, start:start + n], alone[i], rtol=1e-5, atol=1e-5)
      start += n
  assert np.isfinite(out).all()  # Padding (each its own one-token example) too.
  # Without positions the same row is one long sequence: b sees a (the test can fail).
  whole = np.asarray(model.apply({"params": params}, tokens))
  assert np.abs(whole[0, 5:12] - alone[1]).max() > 1e-3


def test_padding_tokens_do_not_change_real_tokens():
  model, params, _ = init(small_model_config(position="learned"), t=T)
  row = [packed_row(examples(), pad=p) for p in (PAD, 3, 256)]
  tokens = jnp.asarray(np.stack([r[0] for r in row]))
  positions = jnp.asarray(np.stack([r[1] for r in row]))
  out = np.asarray(model.apply({"params": params}, tokens, positions))
  real = sum(LENGTHS)
  np.testing.assert_array_equal(out[1, :real], out[0, :real])
  np.testing.assert_array_equal(out[2, :real], out[0, :real])
  assert np.abs(out[1, real:] - out[0, real:]).max() > 1e-3  # The padding itself differs.


@pytest.mark.parametrize("attention", ["dsa", "sliding_window"])
def test_packed_rows_need_dense_attention(attention):
  model, params, _ = init(small_model_config(attention=attention, dsa=dict(window=4, block=4)),
                          t=T)
  tokens, positions = packed_row(examples())
  with pytest.raises(ValueError, match="does not take packed rows"):
    model.apply({"params": params}, jnp.asarray(tokens[None]), jnp.asarray(positions[None]))


def test_packed_rows_are_not_for_decoding():
  model, params, _ = init(small_model_config(), t=T)
  tokens, positions = packed_row(examples())
  with pytest.raises(ValueError, match="not decoding"):
    model.apply({"params": params}, jnp.asarray(tokens[None]), jnp.asarray(positions[None]),
                decode=True, mutable=["cache"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scalar_head_scores_are_the_lm_trunk_projected(dtype):
  """Scores [B, T] f32 = final hidden state . score_head; oracle: an LM whose vocabulary
  head has the score weights in column 0 (same trunk parameters)."""
  scalar, params, tokens = init(small_model_config(head="scalar", dtype=dtype), t=T, b=3)
  scores = scalar.apply({"params": params}, tokens)
  assert scores.shape == (3, T) and scores.dtype == jnp.float32
  lm, lm_params, _ = init(small_model_config(dtype=dtype), t=T, b=3)
  assert set(lm_params) - {"head"} == set(params) - {"score_head"}
  w = params["score_head"]["w"]  # [D]
  head = jnp.zeros_like(lm_params["head"]["w"]).at[:, 0].set(w)  # [D, V]
  trunk = {k: v for k, v in params.items() if k != "score_head"}
  logits = lm.apply({"params": {**trunk, "head": {"w": head}}}, tokens)
  tol = 1e-2 if dtype == "bfloat16" else 1e-6
  np.testing.assert_allclose(np.asarray(scores), np.asarray(logits[..., 0], np.float32),
                             rtol=tol, atol=tol)
  assert np.asarray(scores).std() > 1e-3  # Not a constant.
