"""Quantization-aware training: the forward pass sees the rounded weights, the gradient
reaches the float master weights straight through, and a penalty pulls the weights
toward their INT8 grid (SPEC 3.1):

  L = L_CE + lambda(t) * sum_W ||Round(W) - W||^2

over the weights `quant.rules` stores as INT8, summed over their elements, in weight
units (`blocks.rounding_error`). lambda(t) decays exponentially from
`quant.penalty_start` to `quant.penalty_end` over the run's `train.steps` (an optax
schedule); weights a rule stores as bf16/fp16 are rounded to that dtype the same way,
without a penalty. See docs/quantization.md.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dsv2_jax.quant import blocks, rules as rules_lib


def _round_float(w: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """`w` rounded to `dtype` forward, identity backward."""
  return blocks.straight_through(w, w.astype(dtype).astype(w.dtype))


class QAT:
  """The rounding of one run's weights under its quantization plan."""

  def __init__(self, plan: rules_lib.Plan, penalty_start: float = 0.0,
               penalty_end: float = 0.0, steps: int = 1):
    self.plan = plan
    if penalty_start > 0:
      self.penalty_weight = optax.exponential_decay(
          penalty_start, transition_steps=max(1, steps),
          decay_rate=max(penalty_end, 1e-30) / penalty_start)
    else:
      self.penalty_weight = optax.constant_schedule(0.0)

  def weights(self, params: Any) -> Any:
    """`params` with every planned weight rounded as it will be stored (straight-through
    gradient); other parameters unchanged."""
    def fake(rule, names, w):
      if rule.kind == "int8":
        return blocks.fake_quantize(w, names, rule.layout)
      return _round_float(w, rules_lib.FLOATS[rule.kind])
    return self.plan.map(fake, params)

  def penalty(self, params: Any) -> jax.Array:
    """sum ||Round(W) - W||^2 over the INT8 weights (f32 scalar; 0 if there are none)."""
    total = jnp.zeros((), jnp.float32)
    flat = {rules_lib.path_of(keys): leaf
            for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path in self.plan.int8_paths:
      rule, names = self.plan.rule_of(path)
      total = total + blocks.rounding_error(flat[path], names, rule.layout)
    return total

  def store(self, params: Any, int8_dot: bool = False) -> Any:
    """The stored form of `params`: INT8 weights as `blocks.QTensor` (used by INT8 x INT8
    dots if `int8_dot`, else dequantized inside each matmul), bf16/fp16 weights cast."""
    def stored(rule, names, w):
      if rule.kind == "int8":
        t = blocks.quantize(w, names, rule.layout)
        return t.replace(dot="int8" if int8_dot else "dequantize")
      return w.astype(rules_lib.FLOATS[rule.kind])
    return self.plan.map(stored, params)


def from_config(config: ml_collections.ConfigDict, boxed_params: Any) -> QAT | None:
  """The run's QAT (None when `quant.rules` is empty); ValueError for a rule that
  matches no parameter of the model."""
  q = config.quant
  rules = rules_lib.parse(q.rules, q.block)
  if not rules:
    return None
  return QAT(rules_lib.plan(rules, boxed_params), q.penalty_start, q.penalty_end,
             config.train.steps)
