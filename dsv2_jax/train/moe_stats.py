"""MoE bookkeeping for the train step: auxiliary losses, load metrics, balancing-bias update.

Every MoE layer sows (see `dsv2_jax.model.moe`) into the 'intermediates' collection;
under `nn.scan` each value is stacked over the scanned layers. This module reduces them.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from dsv2_jax.model.moe import (ASSIGNMENT_FRACTION, BALANCE_BIAS, PROB_MEAN,
                                 balance_loss_from_means)


def _collect(intermediates: Any, name: str) -> list[jax.Array]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  return [v[0] for path, v in flat.items() if path[-1] == name]


def aux_loss_and_metrics(intermediates: Any, moe: ml_collections.ConfigDict
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(weighted auxiliary loss, metrics) from the sown values; zeros for a dense model.

  The balancing and z losses are averaged over MoE layers, then weighted by
  `moe.aux_loss_weight` and `moe.z_loss_weight`.
  """
  if not moe.num_experts:
    return jnp.zeros((), jnp.float32), {}
  fraction = jnp.concatenate([v.reshape(-1, moe.num_experts)
                              for v in _collect(intermediates, ASSIGNMENT_FRACTION)])
  prob_mean = jnp.concatenate([v.reshape(-1, moe.num_experts)
                               for v in _collect(intermediates, PROB_MEAN)])
  aux = balance_loss_from_means(fraction, prob_mean)  # [L]
  z = jnp.concatenate([v.reshape(-1) for v in _collect(intermediates, "z_loss")])
  load = jnp.concatenate([v.reshape(-1, moe.num_experts)
                          for v in _collect(intermediates, "expert_load")])  # [L, E]
  dropped = jnp.concatenate([v.reshape(-1) for v in _collect(intermediates, "dropped_fraction")])
  rows = jnp.concatenate([v.reshape(-1) for v in _collect(intermediates, "executed_rows")])
  total = moe.aux_loss_weight * jnp.mean(aux) + moe.z_loss_weight * jnp.mean(z)
  share = load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1e-9)
  entropy = -jnp.sum(jnp.where(share > 0, share * jnp.log(share), 0.0), axis=-1)
  metrics = {
      "moe/aux_loss": jnp.mean(aux),
      "moe/z_loss": jnp.mean(z),
      # Worst layer's busiest expert, relative to a perfectly even load (1 = balanced).
      "moe/load_max_over_mean": jnp.max(jnp.max(share, axis=-1) * moe.num_experts),
      # Mean over layers of the load entropy / log E (1 = balanced).
      "moe/load_entropy": jnp.mean(entropy) / jnp.log(moe.num_experts),
      "moe/dropped_fraction": jnp.mean(dropped),
      "moe/executed_rows": jnp.mean(rows),
  }
  return total, metrics


def update_balance_bias(params: Any, intermediates: Any, rate: float) -> Any:
  """Loss-free balancing (DeepSeek-V3): bias += rate * sign(mean load - load), per layer.

  Each router's `balance_bias` [.., E] is paired with the `assignment_fraction` it sowed
  (same module path), so the update needs no knowledge of the layer layout.
  """
  if rate <= 0:
    return params
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  sown = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  for path, bias in flat.items():
    if path[-1] == BALANCE_BIAS:
      fraction = sown[path[:-1] + (ASSIGNMENT_FRACTION,)][0].reshape(bias.shape)
      mean = 1.0 / bias.shape[-1]
      flat[path] = bias + rate * jnp.sign(mean - fraction)
  return flax.traverse_util.unflatten_dict(flat)
