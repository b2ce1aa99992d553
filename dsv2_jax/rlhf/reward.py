"""The reward model's objective: Bradley-Terry pairs, and its held-out accuracy.

A reward model is the Transformer trunk with `model.head='scalar'`: one score per
position, read at the `<eos>` closing each text. For a pair (chosen c, rejected r) the
Bradley-Terry model says P(c preferred) = sigmoid(r(c) - r(r)), so the loss is
-log sigmoid(r(c) - r(r)) (Christiano et al. 2017; Ouyang et al. 2022). It fixes
score differences only: adding a constant to every score changes nothing.

Held-out pairwise accuracy is taken over *every* (label 1, label 0) pair of the
evaluation texts, which is the ROC AUC of the scores (ties count one half).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def scores_at(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] score of each row at its scored token. scores [B, T] f32, mask [B, T] one-hot."""
  return jnp.sum(scores * mask, axis=-1)


def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
  """[B] -log sigmoid(chosen - rejected) per pair (f32, stable for large margins)."""
  return -jax.nn.log_sigmoid(chosen.astype(jnp.float32) - rejected.astype(jnp.float32))


def pairwise_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
  """Share of all (label 1, label 0) pairs whose label-1 text scores higher; ties 1/2.

  Equals the ROC AUC: computed from ranks in O(n log n), not over the n1 n0 pairs.
  """
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  n1, n0 = int(np.sum(labels == 1)), int(np.sum(labels == 0))
  if not n1 or not n0:
    raise ValueError(f"pairwise accuracy needs both labels; got {n1} ones and {n0} zeros.")
  order = np.argsort(scores, kind="stable")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # Average ranks over ties (1-based), so a tie contributes one half.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(avg, counts)
  return float((np.sum(ranks[labels == 1]) - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def pair_loss(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean Bradley-Terry loss over every (label 1, label 0) pair (held-out)."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  diff = scores[labels == 1][:, None] - scores[labels == 0][None, :]
  return float(np.mean(np.logaddexp(0.0, -diff)))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """(t, accuracy): the cut t maximising the accuracy of 'score > t means label 1', t a
  midpoint between consecutive distinct scores (or below / above all of them). The
  scores' offset is arbitrary under Bradley-Terry; t is the reward model's operating
  point, so PPO's "scores positive" means score > t."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  values = np.unique(scores)
  cuts = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
  order = np.argsort(scores)
  s, y = scores[order], labels[order] == 1
  # Texts at or below each cut are called 0: correct ones are zeros below + ones above.
  below = np.searchsorted(s, cuts, side="right")
  zeros_below = np.concatenate([[0], np.cumsum(~y)])[below]
  ones_above = int(np.sum(y)) - np.concatenate([[0], np.cumsum(y)])[below]
  correct = zeros_below + ones_above
  best = int(np.argmax(correct))
  return float(cuts[best]), float(correct[best] / len(scores))
