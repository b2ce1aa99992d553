"""The jitted train and eval steps, as top-level functions of (state, batch).

The model and optimizer are bound with `functools.partial` before `jax.jit`, so a
step is a pure function the trainer, tests and benchmarks all share.
"""

from __future__ import annotations

from typing import Any

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dsv2_jax.parallel import microbatch, sharding
from dsv2_jax.quant.qat import QAT
from dsv2_jax.rlhf import reward
from dsv2_jax.train import moe_stats
from dsv2_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Summed token NLL (nats) in f32 and the summed weight.

  Args:
    logits: [B, T, V] any float dtype.
    targets: int [B, T].
    weights: [B, T], 0 on padding.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(nll * weights), jnp.sum(weights)


def loss_sum(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None,
             ) -> tuple[jax.Array, Any]:
  """The summed objective of `batch` (to divide by sum(batch['weights'])) and the sown
  intermediates. Language model: token NLL, weighted (SFT: responses only), packed rows
  with `positions`. Scalar head: the Bradley-Terry loss of each chosen/rejected pair.
  rng None: deterministic (no dropout)."""
  kwargs = dict(deterministic=rng is None, rngs={} if rng is None else {"dropout": rng},
                mutable=["intermediates"])
  if model.cfg.head == "scalar":
    b = batch["chosen"].shape[0]
    rows = jnp.concatenate([batch["chosen"], batch["rejected"]])  # [2B, T]
    scores, variables = model.apply({"params": params}, rows, **kwargs)  # [2B, T]
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    r = reward.scores_at(scores, mask)  # [2B]
    total = jnp.sum(reward.bradley_terry_loss(r[:b], r[b:]))
  else:
    logits, variables = model.apply({"params": params}, batch["inputs"],
                                    batch.get("positions"), **kwargs)
    total, _ = cross_entropy(logits, batch["targets"], batch["weights"])
  return total, variables.get("intermediates", {})


def batch_grads(params: Any, batch: Batch, rng: jax.Array, *, model: nn.Module,
                accum_steps: int = 1, qat: QAT | None = None,
                penalty_weight: jax.Array | float = 0.0
                ) -> tuple[Any, jax.Array, dict[str, jax.Array], Any]:
  """Gradients of the mean loss of `batch` (`loss_sum` / its summed weights).

  An MoE model adds its weighted auxiliary losses to the objective; the returned loss
  stays the token cross-entropy, so dense and MoE runs compare directly.

  accum_steps > 1 splits the batch rows into that many microbatches and sums their
  gradients in a `lax.scan` (`train.grad_accum_steps`). Each microbatch's token loss
  is divided by the whole batch's token count, so the sum equals the full batch's
  gradient up to float summation order. Each microbatch's MoE auxiliary losses are
  computed from its own routing: the balancing loss, a product of batch means, then
  differs from the full batch's. Sown statistics combine as `microbatch.reduce_stats`.

  With `qat` (quantization-aware training) the model runs on `qat.weights(params)`
  (rounded forward, straight-through backward) and the objective adds
  `penalty_weight * qat.penalty(params)`, once per batch (`quant/penalty` in the metrics).

  Returns:
    (grads, loss, moe_metrics, intermediates).
  """
  moe = model.cfg.moe
  count = jnp.sum(batch["weights"])

  def grads_of(micro: Batch, micro_rng: jax.Array):
    def loss_fn(params):
      used = params if qat is None else qat.weights(params)
      nll_sum, intermediates = loss_sum(model, used, micro, micro_rng)
      aux, moe_metrics = moe_stats.aux_loss_and_metrics(intermediates, moe)
      if qat is not None:
        penalty = qat.penalty(params)
        aux = aux + penalty_weight * penalty
        moe_metrics = {**moe_metrics, "quant/penalty": penalty}
      loss = nll_sum / jnp.maximum(count, 1.0)
      return loss + aux / accum_steps, (loss, moe_metrics, intermediates)
    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, out

  if accum_steps == 1:
    grads, (loss, moe_metrics, intermediates) = grads_of(batch, rng)
    return grads, loss, moe_metrics, intermediates
  # Strided microbatches: each device keeps its own rows of every one (nothing moves).
  micro = jax.tree.map(lambda x: microbatch.split(x, accum_steps), batch)

  def accumulate(total, xs):
    grads, out = grads_of(*xs)
    return jax.tree.map(jnp.add, total, grads), out

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (losses, moe_metrics, intermediates) = jax.lax.scan(
      accumulate, zeros, (micro, jax.random.split(rng, accum_steps)))
  moe_metrics, intermediates = microbatch.reduce_stats((moe_metrics, intermediates))
  return grads, jnp.sum(losses), moe_metrics, intermediates


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, accum_steps: int = 1,
               skip_non_finite: bool = True, qat: QAT | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the mean token loss of `batch` (see `batch_grads`).

  Non-finite guard: when the loss or the gradient norm is not finite, the update is
  not applied (parameters, optimizer state and the MoE balancing
  bias stay as they were), while the step counter and RNG advance as usual, so the
  data position moves on. `skipped_steps` and `consecutive_skips` count such steps;
  the trainer stops after `train.max_skipped_steps` in a row. (optax.apply_if_finite
  guards the optimizer alone and applies the update anyway after its limit.)
  `skip_non_finite=False` drops the guard (its cost: experiments/guard_overhead.py).
  """
  rng, dropout_rng = jax.random.split(state.rng)
  penalty_weight = 0.0 if qat is None else qat.penalty_weight(state.step)
  grads, loss, moe_metrics, intermediates = batch_grads(
      state.params, batch, dropout_rng, model=model, accum_steps=accum_steps, qat=qat,
      penalty_weight=penalty_weight)
  if qat is not None:
    moe_metrics = {**moe_metrics, "quant/lambda": jnp.asarray(penalty_weight, jnp.float32)}
  grad_norm = optax.global_norm(grads)

  def apply_update(params_and_opt_state):
    params, opt_state = params_and_opt_state
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if model.cfg.moe.num_experts:
      params = moe_stats.update_balance_bias(params, intermediates,
                                             model.cfg.moe.balance_bias_rate)
    return params, opt_state

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_non_finite:  # A conditional, so the update still runs in place (no state copy).
    params, opt_state = jax.lax.cond(finite, apply_update, lambda x: x,
                                     (state.params, state.opt_state))
  else:
    params, opt_state = apply_update((state.params, state.opt_state))
    finite = jnp.asarray(True)
  skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
      skipped_steps=state.skipped_steps + skipped,
      consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1))
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": jnp.sum(batch["weights"]),
             "skipped_steps": new_state.skipped_steps,
             "consecutive_skips": new_state.consecutive_skips, **moe_metrics}
  return new_state, metrics


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                   state_shardings: Any, accum_steps: int = 1, skip_non_finite: bool = True,
                   qat: QAT | None = None):
  """`train_step` compiled with explicit shardings; the input state is donated.

  The step is traced under the activation rules, so the model's activation constraints
  shard on `mesh` too (`sharding.activation_rules`).
  """
  step = functools.partial(train_step, model=model, tx=tx, accum_steps=accum_steps,
                           skip_non_finite=skip_non_finite, qat=qat)
  return jax.jit(sharding.with_activation_rules(step, mesh),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def eval_step(params: Any, batch: Batch, *, model: nn.Module,
              token_num_bytes: jax.Array) -> dict[str, jax.Array]:
  """Sums for held-out metrics: NLL (nats), predicted tokens and their UTF-8 bytes.

  A scalar-head model returns {'scores': [B]} instead, each row's score at its
  `score_mask` token (the metrics need every score: `rlhf.reward.pairwise_accuracy`).
  """
  if model.cfg.head == "scalar":
    scores = model.apply({"params": params}, batch["inputs"], deterministic=True)
    return {"scores": reward.scores_at(scores, batch["score_mask"])}
  logits = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                       deterministic=True)
  nll_sum, count = cross_entropy(logits, batch["targets"], batch["weights"])
  num_bytes = jnp.sum(token_num_bytes[batch["targets"]] * batch["weights"])
  return {"nll_sum": nll_sum, "tokens": count, "bytes": num_bytes}
