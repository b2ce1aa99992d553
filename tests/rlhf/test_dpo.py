"""DPO loss (`rlhf/dpo.py`) against -log(sigmoid(beta * ((a - b) - (c - d)))) written out.

a, c: policy log-probabilities of the chosen / rejected responses; b, d: the reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.rlhf import dpo


def np_dpo(a, b, c, d, beta):
  margin = beta * ((np.float64(a) - b) - (np.float64(c) - d))
  return -np.log(1.0 / (1.0 + np.exp(-margin))), margin


def test_dpo_loss_matches_direct_formula():
  rng = np.random.RandomState(0)
  a, b, c, d = (rng.randn(32) * 5 - 20 for _ in range(4))  # summed logps are negative
  for beta in (0.1, 0.5):
    loss, margin = dpo.dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (a, c, b, d)), beta)
    want_loss, want_margin = np_dpo(a, b, c, d, beta)
    assert loss.shape == margin.shape == (32,)
    np.testing.assert_allclose(np.asarray(margin), want_margin, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-4, atol=1e-5)


def test_dpo_loss_is_log2_when_policy_is_reference():
  rng = np.random.RandomState(1)
  chosen, rejected = jnp.asarray(rng.randn(8) - 10), jnp.asarray(rng.randn(8) - 10)
  loss, margin = dpo.dpo_loss(chosen, rejected, chosen, rejected, 0.1)
  np.testing.assert_array_equal(np.asarray(margin), 0.0)
  np.testing.assert_allclose(np.asarray(loss), np.log(2.0), rtol=1e-6)


def test_dpo_margin_sign():
  ref_c, ref_r = jnp.asarray([-10.0, -10.0]), jnp.asarray([-12.0, -12.0])
  # Row 0: the policy raised the chosen response relative to the reference (+1) and
  # lowered the rejected (-1): margin = beta * (1 - (-1)) = 0.2 > 0, loss < log 2.
  # Row 1: the opposite: margin = -0.2, loss > log 2.
  chosen = jnp.asarray([-9.0, -11.0])
  rejected = jnp.asarray([-13.0, -11.0])
  loss, margin = dpo.dpo_loss(chosen, rejected, ref_c, ref_r, 0.1)
  np.testing.assert_allclose(np.asarray(margin), [0.2, -0.2], rtol=1e-5)
  assert float(loss[0]) < np.log(2.0) < float(loss[1])


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
  rng = np.random.RandomState(2)
  a, b, c, d = (jnp.asarray(rng.randn(6) - 5) for _ in range(4))
  beta = 0.3
  f = lambda a, c: jnp.sum(dpo.dpo_loss(a, c, b, d, beta)[0])
  ga, gc = jax.grad(f, argnums=(0, 1))(a, c)
  # d loss / d a = -beta * sigmoid(-margin) < 0: descent raises log pi(y_w); and
  # d loss / d c = +beta * sigmoid(-margin) > 0: descent lowers log pi(y_l).
  _, margin = np_dpo(np.asarray(a), np.asarray(b), np.asarray(c), np.asarray(d), beta)
  weight = beta / (1.0 + np.exp(margin))
  np.testing.assert_allclose(np.asarray(ga), -weight, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(gc), weight, rtol=1e-4)
  assert np.all(np.asarray(ga) < 0) and np.all(np.asarray(gc) > 0)


def test_dpo_loss_finite_for_huge_margins():
  zeros = jnp.zeros(3)
  chosen = jnp.asarray([1e5, -1e5, 0.0])
  f = lambda a: jnp.sum(dpo.dpo_loss(a, zeros, zeros, zeros, 1.0)[0])
  loss, _ = dpo.dpo_loss(chosen, zeros, zeros, zeros, 1.0)
  grad = np.asarray(jax.grad(f)(chosen))
  assert np.all(np.isfinite(np.asarray(loss))) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(np.asarray(loss), [0.0, 1e5, np.log(2.0)], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad, [0.0, -1.0, -0.5], rtol=1e-6, atol=1e-6)


def test_dpo_loss_is_float32_for_bf16_inputs():
  x = jnp.asarray([-3.0, -4.0], jnp.bfloat16)
  loss, _ = dpo.dpo_loss(x, x - 1, x, x, 0.5)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loss), -np.log(1 / (1 + np.exp(-0.5))), rtol=1e-2)
