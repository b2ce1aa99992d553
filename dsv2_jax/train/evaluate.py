"""Held-out evaluation: loss, perplexity and bits per byte over a whole split.

bits_per_byte = total NLL in bits / UTF-8 bytes of the predicted tokens; it is
comparable across tokenizers. `unigram_bits_per_byte` is the same figure for the
split's own unigram token distribution (the entropy of the text it is scored on),
the no-context baseline a model must beat.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dsv2_jax.data import pipeline
from dsv2_jax.data.tokenizer import Tokenizer
from dsv2_jax.parallel import sharding
from dsv2_jax.rlhf import reward
from dsv2_jax.train.step import eval_step


def make_eval_fn(model: nn.Module, tokenizer: Tokenizer, mesh: Mesh, param_shardings: Any):
  """A jitted eval step bound to the model, with parameters in their shardings."""
  step = functools.partial(eval_step, model=model,
                           token_num_bytes=jnp.asarray(tokenizer.token_num_bytes))
  return jax.jit(sharding.with_activation_rules(step, mesh), in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_fn, params: Any, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
             mesh: Mesh, max_batches: int = 0) -> dict[str, float]:
  """Runs `eval_fn` over the eval split (the first `max_batches` batches if > 0).

  A reward model (scalar head) gets `evaluate_preference`'s figures instead.
  """
  if config.model.head == "scalar":
    return evaluate_preference(eval_fn, params, config, tokenizer, mesh, max_batches)
  totals = None
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  shard = jax.process_index(), jax.process_count()
  per_process = config.eval.batch_size // shard[1]
  for batch in pipeline.eval_batches(config.data, tokenizer, config.eval.batch_size,
                                     max_batches):
    local = {k: v[shard[0] * per_process:(shard[0] + 1) * per_process] for k, v in batch.items()}
    sums = eval_fn(params, sharding.put_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    real = batch["weights"] > 0
    counts += np.bincount(batch["targets"][real], minlength=tokenizer.vocab_size)
  if totals is None:
    raise ValueError(f"eval split {config.data.eval_split!r} produced no batches.")
  totals = jax.device_get(totals)
  tokens, num_bytes = float(totals["tokens"]), float(totals["bytes"])
  loss = float(totals["nll_sum"]) / tokens
  probs = counts[counts > 0] / counts.sum()
  unigram_bits = -float(np.sum(counts[counts > 0] * np.log2(probs)))
  return {
      "loss": loss,
      "perplexity": math.exp(loss),
      "bits_per_byte": float(totals["nll_sum"]) / math.log(2) / max(num_bytes, 1.0),
      "tokens": int(tokens),
      "bytes": int(num_bytes),
      "unigram_bits_per_byte": unigram_bits / max(num_bytes, 1.0),
  }


def evaluate_preference(eval_fn, params: Any, config: ml_collections.ConfigDict,
                        tokenizer: Tokenizer, mesh: Mesh, max_batches: int = 0
                        ) -> dict[str, float]:
  """Scores every eval-split text once; pairwise accuracy and Bradley-Terry loss over
  every (label 1, label 0) pair (`rlhf.reward`), and the mean score of each label."""
  shard = jax.process_index(), jax.process_count()
  per_process = config.eval.batch_size // shard[1]
  scores, labels = [], []
  for batch in pipeline.preference_eval_batches(config.data, tokenizer, config.eval.batch_size,
                                                max_batches):
    local = {k: batch[k][shard[0] * per_process:(shard[0] + 1) * per_process]
             for k in ("inputs", "score_mask")}
    out = jax.device_get(eval_fn(params, sharding.put_batch(local, mesh)))["scores"]
    valid = batch["valid"] > 0
    scores.append(np.asarray(out)[valid])
    labels.append(batch["label"][valid])
  if not scores:
    raise ValueError(f"eval split {config.data.eval_split!r} produced no batches.")
  scores, labels = np.concatenate(scores), np.concatenate(labels)
  threshold, accuracy = reward.best_threshold(scores, labels)
  return {
      "threshold": threshold,
      "accuracy": accuracy,
      "pairwise_accuracy": reward.pairwise_accuracy(scores, labels),
      "loss": reward.pair_loss(scores, labels),
      "mean_score_preferred": float(np.mean(scores[labels == 1])),
      "mean_score_other": float(np.mean(scores[labels == 0])),
      "texts": int(len(scores)),
  }


def summary(result: dict[str, float]) -> str:
  """One line of held-out figures: bits/byte for a language model, pairwise accuracy for
  a reward model."""
  if "positive_share" in result:
    return (f"reward {result['reward']:+.3f}  scored positive {result['positive_share']:.1%}  "
            f"KL to reference {result['kl_per_response']:.2f} nats/response  reference "
            f"bits/byte {result['reference_bits_per_byte']:.3f}  response tokens "
            f"{result['response_tokens']:.1f}")
  if "pairwise_accuracy" in result:
    return (f"pairwise accuracy {result['pairwise_accuracy']:.4f}  Bradley-Terry loss "
            f"{result['loss']:.4f}  mean score {result['mean_score_preferred']:+.3f} "
            f"(preferred) / {result['mean_score_other']:+.3f}  texts {result['texts']:,}")
  return (f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
          f"bits/byte {result['bits_per_byte']:.4f}  "
          f"(unigram baseline {result['unigram_bits_per_byte']:.4f})  tokens {result['tokens']:,}")
