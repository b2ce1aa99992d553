"""Cached generation == repeated full forward passes (greedy), rolling windows, top-p."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.infer.generate import filter_logits, generate, sample_token, unstacked
from dsv2_jax.model.transformer import build_model
from tests.helpers import MOE, init, small_model_config


def test_greedy_generation_matches_full_forward_argmax():
  cfg = small_model_config()
  model = build_model(cfg)
  prompt = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 5)), jnp.int32)
  params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), prompt)))()["params"]
  new = generate(model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=6,
                 temperature=0.0, top_k=0)
  # Oracle: no cache, the whole prefix re-run each step. Right-padded to one length so it
  # compiles once: causal attention keeps the padding from the real positions.
  forward = jax.jit(lambda seq: model.apply({"params": params}, seq))
  seq = np.zeros((2, 11), np.int32)
  seq[:, :5] = prompt
  for i in range(5, 11):
    seq[:, i] = np.argmax(forward(jnp.asarray(seq))[:, i - 1], axis=-1)
  np.testing.assert_array_equal(new, seq[:, 5:])


def test_top_k_one_is_greedy_and_top_k_restricts_support():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0]])
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  assert all(int(sample_token(logits, k, 1.0, 1)[0]) == 1 for k in keys[:20])
  drawn = {int(sample_token(logits, k, 1.0, 2)[0]) for k in keys}
  assert drawn == {1, 3}


def _oracle_start(i: int, window: int, stride: int) -> int:
  """s(i) by simulation: slide by `stride` until tokens[s:i] fits in `window`."""
  start = 0
  while i - start > window:
    start += stride
  return start


@pytest.mark.parametrize("attention", ["dense", "sliding_window", "dsa"])
def test_rolling_greedy_generation_matches_windowed_full_forward(attention):
  # Small DSA window/block so that the local window, blocks and global picks all matter.
  cfg = small_model_config(attention=attention,
                           dsa=dict(window=4, block=4, budget="fixed", budget_value=2))
  window, new = 12, 24
  model = build_model(cfg)
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 17)), jnp.int32)
  # Jitted init: an eager DSA forward dispatches op by op and takes many seconds.
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens))["params"]

  @jax.jit
  def last_logits(context, length):
    # The model is causal, so right-padding a context to one shape (one compile) leaves
    # the logits at its last real token unchanged.
    return jnp.take(model.apply({"params": params}, context), length - 1, axis=1)

  for p, stride in ((5, 4), (17, 5)):  # Prompt shorter and longer than the window.
    out = generate(model, params, tokens[:, :p], jax.random.PRNGKey(0), max_new_tokens=new,
                   temperature=0.0, top_k=0, window=window, stride=stride)
    seq = np.asarray(tokens[:, :p])
    for i in range(p, p + new):  # Oracle: no cache, full forward of each token's window.
      context = seq[:, _oracle_start(i, window, stride):i]
      assert context.shape[1] <= window
      padded = np.pad(context, ((0, 0), (0, window - context.shape[1])))
      nxt = np.argmax(np.asarray(last_logits(padded, context.shape[1])), axis=-1)
      seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], axis=1)
    np.testing.assert_array_equal(out, seq[:, p:], err_msg=f"prompt {p}, stride {stride}")


def test_rolling_window_that_holds_everything_equals_plain_generation():
  model, params, prompt = init(small_model_config(), t=5, b=2, seed=2)
  rng = jax.random.PRNGKey(3)
  kwargs = dict(max_new_tokens=7, temperature=1.0, top_k=0)  # Sampled: keys must agree.
  plain = generate(model, params, prompt, rng, **kwargs)
  # W = p + new - 1, the tightest case: the last token sees all W before it, no slide.
  np.testing.assert_array_equal(
      generate(model, params, prompt, rng, window=11, stride=3, **kwargs), plain)


_PROBS = np.asarray([0.5, 0.3, 0.15, 0.05])


def _kept(top_p, temperature=1.0, top_k=0):
  logits = filter_logits(jnp.log(jnp.asarray(_PROBS))[None], temperature, top_k, top_p)
  return set(np.flatnonzero(np.isfinite(np.asarray(logits[0]))).tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
  assert _kept(0.45) == {0}
  assert _kept(0.55) == {0, 1}
  assert _kept(0.75) == {0, 1}
  assert _kept(0.83) == {0, 1, 2}
  assert _kept(0.99) == {0, 1, 2, 3}
  assert _kept(0.83, top_k=3) == {0, 1}  # After top-k: [.526, .316, .158] renormalised.
  assert _kept(0.6, temperature=0.5) == {0}  # After temperature: p^2 / sum, top .685.
  # Kept tokens keep their logits (renormalised by the softmax of sampling).
  logits = filter_logits(jnp.log(jnp.asarray(_PROBS))[None], 1.0, 0, 0.75)[0]
  np.testing.assert_allclose(jax.nn.softmax(logits), [0.625, 0.375, 0, 0], atol=1e-6)


def test_top_p_sampling_support_and_frequencies():
  logits = jnp.log(jnp.asarray(_PROBS))[None]
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)

  def freq(top_p):  # Empirical distribution of 4000 draws.
    drawn = jax.vmap(lambda k: sample_token(logits, k, 1.0, 0, top_p)[0])(keys)
    return np.bincount(np.asarray(drawn), minlength=4) / len(keys)

  np.testing.assert_allclose(freq(0.8 - 1e-3), [0.625, 0.375, 0, 0], atol=0.03)
  np.testing.assert_allclose(freq(1.0), _PROBS, atol=0.03)  # 1 = off.
  rows = jax.random.normal(jax.random.PRNGKey(1), (3, 10))  # Tiny p: only the argmax.
  tiny = jax.vmap(lambda k: sample_token(rows, k, 1.0, 0, 1e-3))(keys[:50])
  assert (np.asarray(tiny) == np.argmax(np.asarray(rows), axis=-1)).all()
  np.testing.assert_array_equal(filter_logits(rows, 1.0, 0, 1.0), rows)


@pytest.mark.parametrize("fields", [{}, {"moe": MOE}, {"attention": "dsa"}])
def test_unstacked_decoding_equals_the_scanned_stack(fields):
  """`unstacked` splits the scanned parameters per layer: the same logits, and the same
  sampled tokens as decoding with the stack (unstack=False)."""
  model, params, tokens = init(small_model_config(**fields), t=12, b=2)
  flat, per_layer = unstacked(model, params)
  assert not flat.cfg.scan_layers and "layers" not in per_layer
  np.testing.assert_allclose(np.asarray(flat.apply({"params": per_layer}, tokens)),
                             np.asarray(model.apply({"params": params}, tokens)),
                             rtol=1e-5, atol=1e-5)
  kwargs = dict(max_new_tokens=6, temperature=0.7, top_k=5)
  a = generate(model, params, tokens, jax.random.PRNGKey(1), **kwargs)
  b = generate(model, params, tokens, jax.random.PRNGKey(1), unstack=False, **kwargs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unstacked_keeps_unscanned_and_wrapped_models():
  import qwix  # pylint: disable=g-import-not-at-top
  model, params, _ = init(small_model_config(scan_layers=False))
  assert unstacked(model, params)[0] is model
  model, params, _ = init(small_model_config())
  wrapped = qwix.quantize_model(model, qwix.QtProvider([]))
  assert unstacked(wrapped, params)[0] is wrapped
