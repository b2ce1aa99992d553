"""PPO math (`rlhf/ppo.py`): masks, shaped rewards, GAE, whitening, losses, KL control.

Oracles are independent of the code under test: hand-computed literals (with the
arithmetic in comments), plain Python loops over the time steps, and the formulas
written out in numpy. Everything is a pure function on [B, R] arrays of a few elements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.rlhf import ppo

EOS = 2


def prefix_mask(ends, length):
  """float32 [B, R]: 1 on t <= ends[b] (the response's last token), 0 after."""
  return (np.arange(length)[None, :] <= np.asarray(ends)[:, None]).astype(np.float32)


# --- response_mask -------------------------------------------------------------------


@pytest.mark.parametrize("row, want", [
    ([5, 7, EOS, 9, 4], [1, 1, 1, 0, 0]),      # eos in the middle: kept, rest dropped
    ([EOS, 7, 8, 9, 4], [1, 0, 0, 0, 0]),      # eos first: a one-token response
    ([5, 7, 8, 9, 4], [1, 1, 1, 1, 1]),        # no eos: the whole budget
    ([5, EOS, 8, EOS, 4], [1, 1, 0, 0, 0]),    # twice: the first one ends it
    ([5, 7, 8, 9, EOS], [1, 1, 1, 1, 1]),      # eos last
])
def test_response_mask_hand_examples(row, want):
  got = ppo.response_mask(jnp.asarray([row], jnp.int32), EOS)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray([want], np.float32))


def test_response_mask_rows_are_independent():
  rows = [[5, EOS, 8], [5, 7, 8], [EOS, EOS, EOS]]
  got = np.asarray(ppo.response_mask(jnp.asarray(rows, jnp.int32), EOS))
  np.testing.assert_array_equal(got, [[1, 1, 0], [1, 1, 1], [1, 0, 0]])


# --- token_logprobs / entropy --------------------------------------------------------


def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_and_entropy_match_numpy(dtype):
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(3, 4, 11) * 3, dtype)  # [B, R, V]
  tokens = rng.randint(0, 11, size=(3, 4))
  ref = np_log_softmax(np.asarray(logits.astype(jnp.float32)))  # same rounded inputs
  want_logp = np.take_along_axis(ref, tokens[..., None], -1)[..., 0]
  want_ent = -(np.exp(ref) * ref).sum(-1)
  got_logp = ppo.token_logprobs(logits, jnp.asarray(tokens))
  got_ent = ppo.entropy(logits)
  assert got_logp.dtype == got_ent.dtype == jnp.float32
  assert got_logp.shape == got_ent.shape == (3, 4)
  np.testing.assert_allclose(np.asarray(got_logp), want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_ent), want_ent, rtol=1e-5, atol=1e-5)


def test_entropy_extremes():
  v = 8
  uniform = jnp.zeros((1, 1, v))
  peaked = jnp.asarray([[[0.0] * (v - 1) + [1e4]]])
  np.testing.assert_allclose(float(ppo.entropy(uniform)[0, 0]), np.log(v), rtol=1e-6)
  assert abs(float(ppo.entropy(peaked)[0, 0])) < 1e-6


# --- masked_mean / whiten ------------------------------------------------------------


def test_masked_mean_ignores_masked_entries_and_empty_mask():
  x = jnp.asarray([[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]])
  mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  np.testing.assert_allclose(float(ppo.masked_mean(x, mask)), (1 + 2 + 3) / 3, rtol=1e-6)
  assert float(ppo.masked_mean(x, jnp.zeros_like(mask))) == 0.0


def test_whiten_masked_mean_zero_std_one_and_ignores_masked_entries():
  rng = np.random.RandomState(1)
  mask = prefix_mask([1, 4, 2, 5], 6)
  x = rng.randn(4, 6) * 3 + 5
  got = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(mask)))
  on = mask.astype(bool)
  np.testing.assert_allclose(got[on].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(got[on].std(), 1.0, rtol=1e-4)  # population std
  np.testing.assert_allclose(got[on], (x[on] - x[on].mean()) / x[on].std(), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(got[~on], 0.0)
  # Garbage past the response's end must not leak into the statistics.
  x2 = np.where(on, x, rng.randn(4, 6) * 1e3)
  got2 = np.asarray(ppo.whiten(jnp.asarray(x2), jnp.asarray(mask)))
  np.testing.assert_allclose(got2, got, rtol=1e-6, atol=1e-6)


# --- shaped_rewards ------------------------------------------------------------------


def test_shaped_rewards_against_loop():
  rng = np.random.RandomState(2)
  b, r, beta = 4, 6, 0.05
  ends = [0, 3, 5, 2]
  mask = prefix_mask(ends, r)
  logp, ref = rng.randn(b, r), rng.randn(b, r)
  score = rng.randn(b) * 2
  rewards, kl = ppo.shaped_rewards(jnp.asarray(score), jnp.asarray(logp), jnp.asarray(ref),
                                   jnp.asarray(mask), jnp.asarray(beta))
  want_r, want_kl = np.zeros((b, r)), np.zeros((b, r))
  for i in range(b):
    for t in range(ends[i] + 1):
      want_kl[i, t] = logp[i, t] - ref[i, t]
      want_r[i, t] = -beta * want_kl[i, t] + (score[i] if t == ends[i] else 0.0)
  np.testing.assert_allclose(np.asarray(kl), want_kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rewards), want_r, rtol=1e-5, atol=1e-6)


def test_shaped_rewards_score_lands_on_last_valid_token_only():
  mask = jnp.asarray(prefix_mask([2, 0, 3], 4))
  zeros = jnp.zeros((3, 4))
  rewards, kl = ppo.shaped_rewards(jnp.asarray([1.0, 2.0, 3.0]), zeros, zeros, mask,
                                   jnp.asarray(0.1))
  np.testing.assert_array_equal(np.asarray(kl), 0.0)
  np.testing.assert_allclose(np.asarray(rewards), [[0, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 3]])


# --- gae -----------------------------------------------------------------------------


def test_gae_hand_computed():
  # gamma = 0.9, lambda = 0.8, so gamma * lambda = 0.72; r = [1, 0, 2], V = [0.5, 1, 1.5].
  # Row 0, full response (3 tokens):
  #   delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4
  #   delta_1 = 0 + 0.9 * 1.5 - 1.0 = 0.35
  #   delta_2 = 2 + 0.9 * 0   - 1.5 = 0.5      (last token bootstraps from 0)
  #   A_2 = 0.5;  A_1 = 0.35 + 0.72 * 0.5 = 0.71;  A_0 = 1.4 + 0.72 * 0.71 = 1.9112
  #   G = A + V = [2.4112, 1.71, 2.0]
  # Row 1, response ends at t = 1 (r_2 = 2 and V_2 = 1.5 lie past the end, ignored):
  #   delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4;  delta_1 = 0 + 0.9 * 0 - 1.0 = -1.0
  #   A_1 = -1.0;  A_0 = 1.4 + 0.72 * -1.0 = 0.68;  G = [1.18, 0.0, 0]
  rewards = jnp.asarray([[1.0, 0.0, 2.0]] * 2)
  values = jnp.asarray([[0.5, 1.0, 1.5]] * 2)
  mask = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  adv, ret = ppo.gae(rewards, values, mask, 0.9, 0.8)
  np.testing.assert_allclose(np.asarray(adv), [[1.9112, 0.71, 0.5], [0.68, -1.0, 0.0]],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), [[2.4112, 1.71, 2.0], [1.18, 0.0, 0.0]],
                             rtol=1e-6, atol=1e-6)


def gae_loop(rewards, values, ends, gamma, lam):
  """Textbook GAE, one row at a time over its valid tokens only."""
  adv = np.zeros_like(rewards)
  for i, end in enumerate(ends):
    running = 0.0
    for t in reversed(range(end + 1)):
      next_v = values[i, t + 1] if t < end else 0.0
      delta = rewards[i, t] + gamma * next_v - values[i, t]
      running = delta + gamma * lam * running
      adv[i, t] = running
  ret = np.where(prefix_mask(ends, rewards.shape[1]) > 0, adv + values, 0.0)
  return adv, ret


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (0.9, 0.0), (0.5, 1.0), (1.0, 1.0)])
def test_gae_against_loop_with_ragged_masks(gamma, lam):
  rng = np.random.RandomState(3)
  b, r = 5, 7
  ends = [0, 6, 3, 1, 4]
  rewards, values = rng.randn(b, r), rng.randn(b, r)  # garbage past the ends too
  adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values),
                     jnp.asarray(prefix_mask(ends, r)), gamma, lam)
  want_adv, want_ret = gae_loop(rewards, values, ends, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
  off = prefix_mask(ends, r) == 0
  assert np.all(np.asarray(adv)[off] == 0) and np.all(np.asarray(ret)[off] == 0)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
  rng = np.random.RandomState(4)
  ends = [2, 5, 0]
  mask = prefix_mask(ends, 6)
  rewards, values = rng.randn(3, 6), rng.randn(3, 6)
  adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0)
  to_go = np.flip(np.cumsum(np.flip(rewards * mask, 1), 1), 1)  # sum_{s >= t} r_s
  np.testing.assert_allclose(np.asarray(adv), (to_go - values) * mask, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), to_go * mask, rtol=1e-5, atol=1e-5)


# --- policy_loss ---------------------------------------------------------------------


def test_policy_loss_matches_numpy_on_random_data():
  rng = np.random.RandomState(5)
  eps = 0.2
  old = rng.randn(4, 6)
  new = old + rng.randn(4, 6) * 0.4  # ratios on both sides of the clip range
  adv = rng.randn(4, 6)
  mask = prefix_mask([5, 2, 0, 3], 6)
  loss, stats = ppo.policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv),
                                jnp.asarray(mask), eps)
  ratio = np.exp(new - old)
  per_token = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
  np.testing.assert_allclose(float(loss), (per_token * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(stats["approx_kl"]),
                             (0.5 * (new - old) ** 2 * mask).sum() / mask.sum(), rtol=1e-5)
  binds = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
  assert 0 < binds[mask > 0].sum() < mask.sum()  # the example exercises both branches
  np.testing.assert_allclose(float(stats["clip_fraction"]), binds[mask > 0].mean(), rtol=1e-6)


def test_policy_loss_gradient_vanishes_exactly_where_the_clip_binds():
  eps = 0.2
  #   ratio:  1.5  0.5   1.05  0.95  1.5   0.5   1.5 (masked out)
  #   A:      +1   -1    +2    -2    -1    +1    +1
  #   binds:  yes  yes   no    no    no    no    (yes, but ignored)
  ratio = np.asarray([[1.5, 0.5, 1.05, 0.95, 1.5, 0.5, 1.5]])
  adv = np.asarray([[1.0, -1.0, 2.0, -2.0, -1.0, 1.0, 1.0]])
  mask = np.asarray([[1, 1, 1, 1, 1, 1, 0]], np.float32)
  old = np.full_like(ratio, -1.3)
  new = old + np.log(ratio)

  def f(logprobs):
    return ppo.policy_loss(logprobs, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                           eps)

  (loss, stats), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(new))
  grad = np.asarray(grad)
  # Unclipped tokens: d(-A r)/d logp = -A r, over the 6 valid tokens.
  want = np.asarray([[0, 0, -2 * 1.05, 2 * 0.95, 1.5, -0.5, 0]]) / 6
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
  assert np.all(grad[0, 2:6] != 0)
  np.testing.assert_allclose(float(stats["clip_fraction"]), 2 / 6, rtol=1e-6)
  # loss = mean(-1.2, 0.8, -2.1, 1.9, 1.5, -0.5) over the 6 valid tokens
  np.testing.assert_allclose(float(loss), (-1.2 + 0.8 - 2.1 + 1.9 + 1.5 - 0.5) / 6, rtol=1e-5)


def test_policy_loss_on_policy_is_minus_mean_advantage():
  # ratio = 1 at the start of each PPO epoch: loss = -mean(A), gradient = -A / n.
  adv = jnp.asarray([[0.3, -1.2, 2.0, 5.0]])
  mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
  logp = jnp.asarray([[-0.5, -2.0, -1.0, -3.0]])
  f = lambda lp: ppo.policy_loss(lp, logp, adv, mask, 0.2)[0]
  np.testing.assert_allclose(float(f(logp)), -(0.3 - 1.2 + 2.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(f)(logp)),
                             [[-0.1, 0.4, -2.0 / 3, 0.0]], rtol=1e-5, atol=1e-7)


# --- value_loss ----------------------------------------------------------------------


def test_value_loss_matches_numpy():
  rng = np.random.RandomState(6)
  clip = 0.2
  old, ret = rng.randn(3, 5), rng.randn(3, 5)
  values = old + rng.randn(3, 5) * 0.5
  mask = prefix_mask([4, 1, 2], 5)
  got = ppo.value_loss(jnp.asarray(values), jnp.asarray(old), jnp.asarray(ret),
                       jnp.asarray(mask), clip)
  v_clip = old + np.clip(values - old, -clip, clip)
  per_token = 0.5 * np.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
  np.testing.assert_allclose(float(got), (per_token * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.parametrize("value, want_loss, want_grad", [
    # old V = 0, G = 1, clip 0.2.
    (0.1, 0.5 * 0.81, 0.1 - 1.0),   # inside the clip range: plain 0.5 (V - G)^2
    (0.9, 0.5 * 0.64, 0.0),         # past the clip towards G: clipped (0.2 - 1)^2 binds
    (-0.5, 0.5 * 2.25, -1.5),       # past the clip away from G: unclipped is larger
    (2.5, 0.5 * 2.25, 1.5),         # overshoots G: unclipped (1.5^2 > 0.8^2) binds
])
def test_value_loss_clipped_branch(value, want_loss, want_grad):
  f = lambda v: ppo.value_loss(v, jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones((1, 1)), 0.2)
  loss, grad = jax.value_and_grad(f)(jnp.full((1, 1), value))
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(grad[0, 0]), want_grad, rtol=1e-5, atol=1e-7)


# --- KLController --------------------------------------------------------------------


@pytest.mark.parametrize("kl, factor", [
    (12.0, 1 + 0.2 * 256 / 10000),   # KL / target - 1 = 1, clipped to +0.2
    (6.6, 1 + 0.1 * 256 / 10000),    # 6.6 / 6 - 1 = 0.1
    (6.0, 1.0),                      # on target
    (5.4, 1 - 0.1 * 256 / 10000),    # 5.4 / 6 - 1 = -0.1
    (0.0, 1 - 0.2 * 256 / 10000),    # -1, clipped to -0.2
])
def test_kl_controller_one_update(kl, factor):
  ctl = ppo.KLController(target=6.0, horizon=10000.0)
  got = float(ctl.update(jnp.asarray(0.1), jnp.asarray(kl), 256))
  np.testing.assert_allclose(got, 0.1 * factor, rtol=1e-6)
  assert abs(got / 0.1 - 1) <= 0.2 * 256 / 10000 + 1e-7


def test_kl_controller_fixed_when_target_not_positive():
  for target in (0.0, -1.0):
    ctl = ppo.KLController(target=target, horizon=10000.0)
    assert float(ctl.update(jnp.asarray(0.05), jnp.asarray(100.0), 256)) == pytest.approx(0.05)


def test_kl_controller_update_jits():
  ctl = ppo.KLController(target=6.0, horizon=100.0)
  got = jax.jit(ctl.update, static_argnums=2)(jnp.asarray(0.1), jnp.asarray(60.0), 10)
  np.testing.assert_allclose(float(got), 0.1 * (1 + 0.2 * 10 / 100), rtol=1e-6)
