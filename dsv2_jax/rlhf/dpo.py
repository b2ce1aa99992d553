"""Direct preference optimisation (Rafailov et al. 2023): the loss.

For a prompt x with a preferred response y_w and a dispreferred y_l (here: two samples
of the reference policy, ranked by the reward model), DPO minimises

  -log sigmoid(beta [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

with sequence log-probabilities summed over the response tokens. beta plays the part of
PPO's KL coefficient: the optimum is the KL-regularised reward maximiser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dpo_loss(chosen_logp: jax.Array, rejected_logp: jax.Array, ref_chosen_logp: jax.Array,
             ref_rejected_logp: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
  """Per-pair DPO loss [B] and the implicit reward margin [B].

  Args:
    chosen_logp, rejected_logp: [B] summed response log-probabilities under the policy.
    ref_chosen_logp, ref_rejected_logp: [B] the same under the frozen reference.
    beta: the KL strength.
  """
  margin = beta * ((chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp))
  return -jax.nn.log_sigmoid(margin.astype(jnp.float32)), margin
