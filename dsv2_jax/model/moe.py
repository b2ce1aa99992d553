"""Gated mixture-of-experts feed-forward: a router, top-k, dropless dispatch.

  logits = gate_out(act(gate_in(x)))              # 'mlp': the article's 2-layer gate (GMoE)
         | x @ gate                               # 'linear': DeepSeekMoE's router
  probs  = softmax(logits)                        # over E experts, f32
  top-k experts by probs + bias                   # bias: loss-free balancing, selection only
         among the topk_group best of n_group groups   # group-limited (DeepSeek-V2)
  weights = probs of the chosen (optionally renormalised) x routed_scaling_factor
  y = sum_k weights_k * expert_{e_k}(x) + shared_experts(x)

`model.moe.router` picks the gate; everything after it (selection, dispatch, shared
experts, the auxiliary losses) is one code path, so GMoE and DeepSeekMoE share it.

Only the chosen experts run (`moe_dispatch`; split over devices by
`moe_parallel`); the article's all-experts loop is the
oracle (`moe_reference`). Each call sows, under the 'intermediates' collection, the
auxiliary losses (Switch/GShard load balancing, router z-loss) and load statistics
that the train step adds to the loss and logs. Expert weights carry the 'expert'
logical axis, so expert parallelism only needs a rule in the sharding table.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import ml_collections

from dsv2_jax.model import moe_parallel
from dsv2_jax.model.ffn import ACTIVATIONS, FeedForward, is_gated
from dsv2_jax.model.layers import Einsum, dtype_of, weight

BALANCE_BIAS = "balance_bias"  # Router parameter name, updated by the train step.
ASSIGNMENT_FRACTION = "assignment_fraction"  # Its sown statistic (fraction per expert).
PROB_MEAN = "router_prob_mean"  # Sown mean router probability per expert.
ROUTERS = ("mlp", "linear")  # `model.moe.router`.


def limit_groups(scores: jax.Array, n_group: int, topk_group: int) -> jax.Array:
  """Group-limited routing: scores [X, E] with the experts outside each token's
  `topk_group` best groups (a group scores its best expert) set to -inf."""
  x, e = scores.shape
  grouped = scores.reshape(x, n_group, e // n_group)
  _, chosen = jax.lax.top_k(jnp.max(grouped, axis=-1), topk_group)  # [X, topk_group]
  keep = jnp.any(jax.nn.one_hot(chosen, n_group, dtype=jnp.bool_), axis=1)  # [X, groups]
  return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(x, e)


def balance_loss_from_means(fraction: jax.Array, prob_mean: jax.Array) -> jax.Array:
  """Switch/GShard auxiliary loss E * sum_e f_e P_e: 1 when routing is uniform.

  Args:
    fraction: [..., E] f_e, fraction of the X A assignments that go to e (no gradient).
    prob_mean: [..., E] P_e, mean router probability of e (carries the gradient).
  Both are token means, so microbatches combine them exactly by averaging.
  """
  num_experts = fraction.shape[-1]
  return num_experts * jnp.sum(jax.lax.stop_gradient(fraction) * prob_mean, axis=-1)


def load_balancing_loss(probs: jax.Array, expert_idx: jax.Array, num_experts: int) -> jax.Array:
  """`balance_loss_from_means` of router probs [X, E] and choices expert_idx [X, A]."""
  counts = jnp.bincount(expert_idx.reshape(-1), length=num_experts)
  return balance_loss_from_means(counts / expert_idx.size, jnp.mean(probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE's z-loss: mean squared log-partition of the router logits."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


class Router(nn.Module):
  """The gate (`model.moe.router`) -> probs [X, E] (f32) and the top-k (indices, weights)."""

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x [X, D] -> (logits [X, E] f32, probs [X, E] f32, expert_idx [X, A], weights [X, A])."""
    cfg, moe = self.cfg, self.cfg.moe
    d, e, gh = x.shape[-1], moe.num_experts, moe.gate_hidden
    dense = lambda shape, axes, name: Einsum(  # noqa: E731
        shape, axes, (0,), dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), name=name)
    f32_weight = lambda name, shape, axes: weight(self.param(  # noqa: E731
        name, nn.with_logical_partitioning(nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal"), axes), shape, dtype_of(cfg.param_dtype)),
        jnp.float32)
    # The layer that gives the logits runs in f32: bf16 rounding would change the top-k.
    if moe.router == "linear":
      logits = jnp.dot(x.astype(jnp.float32), f32_weight("gate", (d, e), ("embed", "expert")))
    else:
      h = ACTIVATIONS[moe.gate_activation](dense((d, gh), ("embed", "gate_mlp"), "gate_in")(
          "XD,DI->XI", x))
      logits = jnp.dot(h.astype(jnp.float32),
                       f32_weight("gate_out", (gh, e), ("gate_mlp", "expert")))
    probs = jax.nn.softmax(logits, axis=-1)
    select = probs
    if moe.balance_bias_rate > 0:
      # Loss-free balancing (DeepSeek-V3): a per-expert bias steers selection only. It
      # gets no gradient and no optimizer update; the train step moves it by
      # `balance_bias_rate` x sign(mean load - load) from the sown assignment fractions.
      bias = self.param(BALANCE_BIAS, nn.with_logical_partitioning(
          nn.initializers.zeros, ("expert",)), (e,), jnp.float32)
      select = probs + jax.lax.stop_gradient(bias)
    if moe.topk_group < moe.n_group:
      select = limit_groups(select, moe.n_group, moe.topk_group)
    _, expert_idx = jax.lax.top_k(jax.lax.stop_gradient(select), moe.top_k)
    # f and P of the balancing loss E sum f P (`balance_loss_from_means`), sown as means
    # so that microbatches (pipeline, accumulation) combine them exactly.
    self.sow("intermediates", ASSIGNMENT_FRACTION,
             jnp.bincount(expert_idx.reshape(-1), length=e) / expert_idx.size)
    self.sow("intermediates", PROB_MEAN, jnp.mean(probs, axis=0))
    weights = jnp.take_along_axis(probs, expert_idx, axis=-1)
    if moe.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if moe.routed_scaling_factor != 1.0:
      weights = weights * moe.routed_scaling_factor
    return logits, probs, expert_idx, weights


class MoEFeedForward(nn.Module):
  """Routed experts (+ optional shared experts) replacing the dense FFN: [X, D] -> [X, D]."""

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, moe = self.cfg, self.cfg.moe
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, e, f = x.shape[-1], moe.num_experts, moe.expert_hidden
    gated = is_gated(cfg.activation)
    logits, probs, expert_idx, weights = Router(cfg, name="router")(x)
    expert_idx = checkpoint_name(expert_idx, "moe_routing")
    init = lambda fan_in_axis: nn.initializers.variance_scaling(  # noqa: E731
        1.0, "fan_in", "truncated_normal", in_axis=fan_in_axis, out_axis=-1, batch_axis=(0,))
    # Fan-in is D for w_in and F for w_out (axis 1); the expert axis is a batch axis.
    in_shape, in_axes = ((e, d, 2, f), ("expert", "embed", None, "expert_mlp")) if gated else (
        (e, d, f), ("expert", "embed", "expert_mlp"))  # Gated: (gate, up) on axis 2.
    w_in = self.param("w_in", nn.with_logical_partitioning(init(1), in_axes), in_shape,
                      param_dtype)
    w_out = self.param("w_out", nn.with_logical_partitioning(
        init(1), ("expert", "expert_mlp", "embed")), (e, f, d), param_dtype)
    # INT8 experts (an exported run) are dequantized here, per layer: weight-only.
    w_in, w_out = weight(w_in, param_dtype), weight(w_out, param_dtype)
    # Expert-parallel (all-to-all) when the mesh splits the experts, else one device's.
    y, plan = moe_parallel.mesh_routed_ffn(
        x, expert_idx, weights, w_in, w_out, act=ACTIVATIONS[cfg.activation], gated=gated,
        dtype=dtype, path=moe.dispatch, tile=moe.tile_rows, max_tile=moe.max_tile_rows,
        capacity_factor=moe.capacity_factor)
    y = checkpoint_name(y, "moe_out")
    if moe.num_shared_experts:
      shared_cfg = ml_collections.FrozenConfigDict({
          **cfg.to_dict(), "ffn_hidden": moe.num_shared_experts * f})
      y = y + FeedForward(shared_cfg, name="shared_experts")(x)

    load = plan.group_sizes / expert_idx.size  # Fraction of kept assignments per expert.
    self.sow("intermediates", "z_loss", router_z_loss(logits))
    self.sow("intermediates", "expert_load", load)
    self.sow("intermediates", "dropped_fraction", plan.dropped / expert_idx.size)
    self.sow("intermediates", "executed_rows", plan.executed_rows)
    return nn.with_logical_constraint(y.astype(dtype), ("tokens", "act_embed"))
