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

from dsv2_jax.parallel import sharding
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


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the mean token loss of `batch` (inputs/targets/weights).

  An MoE model adds its weighted auxiliary losses to the objective; `loss` in the
  metrics stays the token cross-entropy, so dense and MoE runs compare directly.
  """
  rng, dropout_rng = jax.random.split(state.rng)

  moe = model.cfg.moe

  def loss_fn(params):
    logits, variables = model.apply({"params": params}, batch["inputs"], deterministic=False,
                                    rngs={"dropout": dropout_rng}, mutable=["intermediates"])
    nll_sum, count = cross_entropy(logits, batch["targets"], batch["weights"])
    loss = nll_sum / jnp.maximum(count, 1.0)
    intermediates = variables.get("intermediates", {})
    aux, moe_metrics = moe_stats.aux_loss_and_metrics(intermediates, moe)
    return loss + aux, (loss, count, moe_metrics, intermediates)

  (_, (loss, count, moe_metrics, intermediates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if moe.num_experts:
    params = moe_stats.update_balance_bias(params, intermediates, moe.balance_bias_rate)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": count,
             **moe_metrics}
  return new_state, metrics


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                   state_shardings: Any):
  """`train_step` compiled with explicit shardings; the input state is donated."""
  return jax.jit(functools.partial(train_step, model=model, tx=tx),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def eval_step(params: Any, batch: Batch, *, model: nn.Module,
              token_num_bytes: jax.Array) -> dict[str, jax.Array]:
  """Sums for held-out metrics: NLL (nats), predicted tokens and their UTF-8 bytes."""
  logits = model.apply({"params": params}, batch["inputs"], deterministic=True)
  nll_sum, count = cross_entropy(logits, batch["targets"], batch["weights"])
  num_bytes = jnp.sum(token_num_bytes[batch["targets"]] * batch["weights"])
  return {"nll_sum": nll_sum, "tokens": count, "bytes": num_bytes}
