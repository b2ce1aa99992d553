"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022): the math.

One PPO step (the loop is `rlhf/trainer.py`):
  1. rollout: sample R response tokens for a batch of prompts from the policy;
  2. score: reward model on prompt + response; per-token KL penalty to the frozen
     reference, r_t = -beta (log pi(y_t) - log pi_ref(y_t)), the score added at the last
     response token;
  3. advantages by GAE(gamma, lambda) over the response tokens, whitened over the batch;
  4. several epochs of minibatches of the clipped surrogate + clipped value loss;
  5. beta follows the adaptive KL controller.

Shapes: [B, R] per response token; `mask` is 1 on tokens up to and including the first
end-of-document (the response ends there) and 0 after it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def response_mask(tokens: jax.Array, eos_id: int) -> jax.Array:
  """float32 [B, R]: 1 up to and including each row's first `eos_id`, 0 after."""
  eos = (tokens == eos_id).astype(jnp.int32)
  before = jnp.cumsum(eos, axis=-1) - eos  # eos tokens strictly before t
  return (before == 0).astype(jnp.float32)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[token], f32. logits [B, R, V], tokens [B, R] -> [B, R]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def entropy(logits: jax.Array) -> jax.Array:
  """[B, R] entropy (nats) of each token's distribution."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mean_rows(x: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] mean of each row of x [B, T] over its masked entries."""
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the masked entries (population std), 0 elsewhere."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def shaped_rewards(score: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array,
                   mask: jax.Array, kl_coef: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token rewards: -kl_coef * (log pi - log pi_ref), plus `score` [B] at each row's
  last response token. Returns (rewards [B, R], per-token KL [B, R]), both masked."""
  kl = (logprobs - ref_logprobs) * mask
  last = jnp.sum(mask, axis=-1).astype(jnp.int32) - 1  # [B]
  at_last = jax.nn.one_hot(last, mask.shape[-1], dtype=jnp.float32)
  return (-kl_coef * kl + score[:, None] * at_last) * mask, kl


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over R steps.

  delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lambda A_{t+1}, with
  V and r zero past the response's end (so the last token bootstraps from 0).

  Returns:
    (advantages, returns = advantages + values), [B, R], masked.
  """
  values = values * mask
  rewards = rewards * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def step(carry, delta):  # Walks t = R-1 .. 0.
    advantage = delta + gamma * lam * carry
    return advantage, advantage

  _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
  advantages = advantages.T * mask
  return advantages, (advantages + values) * mask


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                mask: jax.Array, clip_ratio: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO's clipped surrogate, negated for minimisation, masked token mean."""
  ratio = jnp.exp(logprobs - old_logprobs)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  stats = {"clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
           "approx_kl": masked_mean(0.5 * jnp.square(logprobs - old_logprobs), mask)}
  return loss, stats


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
               mask: jax.Array, clip_value: float) -> jax.Array:
  """0.5 max((V - G)^2, (V_clipped - G)^2), V_clipped within clip_value of the old V."""
  clipped = old_values + jnp.clip(values - old_values, -clip_value, clip_value)
  return 0.5 * masked_mean(jnp.maximum(jnp.square(values - returns),
                                       jnp.square(clipped - returns)), mask)


@dataclasses.dataclass(frozen=True)
class KLController:
  """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2).

  beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon), KL the mean per-response
  KL of the last rollout and n its responses. target <= 0 keeps beta fixed.
  """

  target: float
  horizon: float

  def update(self, kl_coef: jax.Array, kl: jax.Array, n: int) -> jax.Array:
    if self.target <= 0:
      return kl_coef
    error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n / self.horizon)
