"""AdamW with global-norm clipping and the article's stage-1 schedule.

Schedule: 1) linear warmup from 0 to `train.learning_rate` over `warmup_steps`;
2) linear decay to `end_lr_fraction * learning_rate` at `train.steps`.
Weight decay applies to matrices and embeddings, not to norm scales or biases.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

_NO_DECAY = ("scale", "bias", "balance_bias")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  peak = train.learning_rate
  warmup = optax.linear_schedule(0.0, peak, max(train.warmup_steps, 1))
  decay = optax.linear_schedule(peak, peak * train.end_lr_fraction,
                                max(train.steps - train.warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [train.warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay (not norm scales or biases)."""
  def leaf_mask(path, _):
    return getattr(path[-1], "key", None) not in _NO_DECAY
  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def build_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  parts = []
  if train.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                           eps=train.eps, weight_decay=train.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
