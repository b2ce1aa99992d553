"""Reward model objective: Bradley-Terry loss, pairwise accuracy (AUC), `loss_sum`.

Oracles are the definitions written out directly: -log(sigmoid(d)) for the loss, a loop
over every (label 1, label 0) pair for the accuracy and the held-out loss, and the
model's own scores read by hand at the masked tokens for the training objective.
"""

from __future__ import annotations

import itertools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.rlhf import reward
from dsv2_jax.train.step import loss_sum
from tests.helpers import init, small_model_config


def brute_force(scores, labels):
  """(accuracy, mean BT loss) over every (label 1, label 0) pair, ties counting 1/2."""
  wins, losses = [], []
  for i, j in itertools.product(range(len(scores)), repeat=2):
    if labels[i] == 1 and labels[j] == 0:
      d = float(scores[i]) - float(scores[j])
      wins.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
      losses.append(-np.log(1.0 / (1.0 + np.exp(-d))))
  return np.mean(wins), np.mean(losses)


def test_bradley_terry_loss_is_minus_log_sigmoid_and_stable():
  rng = np.random.RandomState(0)
  chosen, rejected = rng.randn(64) * 3, rng.randn(64) * 3
  loss = np.asarray(reward.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected)))
  d = chosen - rejected
  np.testing.assert_allclose(loss, -np.log(1.0 / (1.0 + np.exp(-d))), rtol=1e-5, atol=1e-6)
  assert loss.dtype == np.float32
  # Huge margins: 0 when right, the margin itself when wrong (never inf or nan).
  big = np.asarray(reward.bradley_terry_loss(jnp.array([1e4, 0.0]), jnp.array([0.0, 1e4])))
  assert np.isfinite(big).all()
  np.testing.assert_allclose(big, [0.0, 1e4], rtol=1e-6)
  # bf16 scores are scored in f32.
  half = reward.bradley_terry_loss(jnp.array([1.0], jnp.bfloat16), jnp.array([0.0], jnp.bfloat16))
  assert half.dtype == jnp.float32 and np.isclose(float(half[0]), np.log1p(np.exp(-1.0)))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(data=st.data(), n=st.integers(2, 30))
def test_pairwise_accuracy_and_pair_loss_equal_the_pair_loop(data, n):
  labels = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
  hypothesis.assume(0 < labels.sum() < n)
  # Few distinct values: many ties, across and within labels.
  scores = np.array(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)), float)
  scores = scores * 0.5 + data.draw(st.sampled_from([0.0, 1e3]))  # Large offsets too.
  accuracy, loss = brute_force(scores, labels)
  assert reward.pairwise_accuracy(scores, labels) == pytest.approx(accuracy, abs=1e-12)
  assert reward.pair_loss(scores, labels) == pytest.approx(loss, rel=1e-9)


def test_pairwise_accuracy_on_random_data_with_ties():
  rng = np.random.RandomState(1)
  labels = rng.randint(0, 2, 300)
  scores = rng.randint(0, 20, 300).astype(np.float32)  # ~15 texts per value: many ties.
  accuracy, loss = brute_force(scores, labels)
  assert reward.pairwise_accuracy(scores, labels) == pytest.approx(accuracy, abs=1e-12)
  assert reward.pair_loss(scores, labels) == pytest.approx(loss, rel=1e-9)
  # Known values: all tied = 1/2, perfectly separated = 1, reversed = 0.
  assert reward.pairwise_accuracy(np.zeros(4), np.array([1, 0, 1, 0])) == 0.5
  assert reward.pairwise_accuracy(np.array([3.0, 1.0, 2.0]), np.array([1, 0, 1])) == 1.0
  assert reward.pairwise_accuracy(np.array([0.0, 1.0, 2.0]), np.array([1, 0, 0])) == 0.0


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0], []])
def test_pairwise_accuracy_needs_both_labels(labels):
  with pytest.raises(ValueError, match="needs both labels"):
    reward.pairwise_accuracy(np.arange(len(labels), dtype=float), np.array(labels))


def test_scores_at_reads_the_masked_token_and_a_shift_changes_nothing():
  rng = np.random.RandomState(2)
  b, t = 6, 9
  chosen, rejected = rng.randn(b, t).astype(np.float32), rng.randn(b, t).astype(np.float32)
  idx_c, idx_r = rng.randint(0, t, b), rng.randint(0, t, b)
  mask_c = np.eye(t, dtype=np.float32)[idx_c]
  mask_r = np.eye(t, dtype=np.float32)[idx_r]
  np.testing.assert_array_equal(np.asarray(reward.scores_at(chosen, mask_c)),
                                chosen[np.arange(b), idx_c])

  def total(shift):
    return jnp.sum(reward.bradley_terry_loss(reward.scores_at(chosen + shift, mask_c),
                                             reward.scores_at(rejected + shift, mask_r)))

  base = float(total(0.0))
  for shift in (-7.0, 0.5, 30.0):
    assert float(total(shift)) == pytest.approx(base, rel=1e-5)
  assert abs(float(jax.grad(total)(0.0))) < 1e-5
  # A shift of the chosen scores only does change the loss (the check can fail).
  moved = jnp.sum(reward.bradley_terry_loss(reward.scores_at(chosen + 1.0, mask_c),
                                            reward.scores_at(rejected, mask_r)))
  assert float(moved) < base - 0.1


def test_loss_sum_of_the_scalar_head_is_bradley_terry_on_model_scores():
  model, params, _ = init(small_model_config(head="scalar"), t=12, b=4)
  rng = np.random.RandomState(3)
  b, t = 4, 12
  chosen = rng.randint(0, 256, (b, t)).astype(np.int32)
  rejected = rng.randint(0, 256, (b, t)).astype(np.int32)
  idx_c, idx_r = rng.randint(0, t, b), rng.randint(0, t, b)
  batch = {"chosen": chosen, "rejected": rejected,
           "chosen_mask": np.eye(t, dtype=np.float32)[idx_c],
           "rejected_mask": np.eye(t, dtype=np.float32)[idx_r]}
  batch["weights"] = batch["chosen_mask"]
  total, _ = loss_sum(model, params, {k: jnp.asarray(v) for k, v in batch.items()})
  # Each text scored alone, read at its mask by index.
  sc = np.asarray(model.apply({"params": params}, jnp.asarray(chosen)), np.float64)
  sr = np.asarray(model.apply({"params": params}, jnp.asarray(rejected)), np.float64)
  d = sc[np.arange(b), idx_c] - sr[np.arange(b), idx_r]
  assert float(total) == pytest.approx(np.sum(np.log1p(np.exp(-d))), rel=1e-5)
  # Swapping chosen and rejected gives the loss of -d (the order matters).
  swapped = {"chosen": rejected, "rejected": chosen, "chosen_mask": batch["rejected_mask"],
             "rejected_mask": batch["chosen_mask"], "weights": batch["rejected_mask"]}
  total_swapped, _ = loss_sum(model, params, {k: jnp.asarray(v) for k, v in swapped.items()})
  assert float(total_swapped) == pytest.approx(np.sum(np.log1p(np.exp(d))), rel=1e-5)
