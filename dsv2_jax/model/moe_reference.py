"""The article's `gated_routing` (SPEC 1.2), kept as the MoE test oracle and benchmark baseline.

Every expert runs on every token and the outputs are masked by the routing weights,
exactly as the article's PyTorch loop does. It costs E / A times the active FLOPs and is
never the implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv2_jax.model.moe_dispatch import Activation, expert_ffn, flat_in


def gated_routing(x: jax.Array, expert_idx: jax.Array, weights: jax.Array, w_in: jax.Array,
                  w_out: jax.Array, *, act: Activation, gated: bool,
                  dtype: jnp.dtype = jnp.float32, keep: jax.Array | None = None) -> jax.Array:
  """x [X, D], expert_idx / weights [X, A], w_in [E, D, (2,) F], w_out [E, F, D] -> [X, D].

  `keep` [X, A] (optional) zeroes dropped pairs, for comparing with capacity-limited dispatch.
  """
  if keep is not None:
    weights = jnp.where(keep, weights, 0.0)
  w_in = flat_in(w_in)
  out = jnp.zeros(x.shape, jnp.float32)
  for e in range(w_out.shape[0]):  # The article: `for i, expert in enumerate(experts)`.
    weight = jnp.sum(jnp.where(expert_idx == e, weights, 0.0), axis=-1, keepdims=True)
    out = out + expert_ffn(x, w_in[e], w_out[e], act, gated, dtype).astype(jnp.float32) * weight
  return out.astype(dtype)
