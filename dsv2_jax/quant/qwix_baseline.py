"""The qwix baseline (`quant.engine = 'qwix'`): QAT by Google's qwix library instead of ours.

qwix's `QtProvider` intercepts the einsums of the matched modules and fake-quantizes
their weights (straight-through), per output channel or in tiles along the contracted
axis (`QtRule.tile_size`): our layouts 'channel' and 'Kx1'. It has no rounding penalty
and no tiles along the output axis, so 4x4 blocks and the penalty are ours alone
(qwix's array-level `qwix.quantize` does the rounding in both engines). With our
calibration (`blocks.CALIBRATION`) the two engines round identically
(tests/quant/test_qwix_baseline.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import qwix

from dsv2_jax.quant import blocks
from dsv2_jax.quant.rules import Rule

# qwix matches module paths (the einsum's module), not parameter paths.
MODULE_PATHS = {
    "ffn": r"(.*/)?(ffn|shared_experts)/(up|gate|down)",
    "attention": r"(.*/)?attention/(query|key|value|out)",
    "embed": r"embedder",
    "head": r"head",
}


def check(rules: tuple[Rule, ...]) -> None:
  """ValueError (one line) for a rule qwix's QAT cannot express."""
  for rule in rules:
    if rule.module not in MODULE_PATHS:
      raise ValueError(f"quant.engine='qwix' covers the einsum weights {list(MODULE_PATHS)}; "
                       f"{rule} (the GMoE's own matmuls) needs quant.engine='ours'.")
    if rule.kind != "int8" or rule.layout.cols != 1:
      raise ValueError(f"quant.engine='qwix' quantizes INT8 per output channel or in tiles "
                       f"along the contraction (int8:channel, int8:Kx1); {rule} needs "
                       "quant.engine='ours'.")


def qtrules(rules: tuple[Rule, ...]) -> list[qwix.QtRule]:
  out = []
  for rule in rules:
    out.append(qwix.QtRule(module_path=MODULE_PATHS[rule.module], weight_qtype=jnp.int8,
                           tile_size=rule.layout.rows or None,
                           weight_calibration_method=blocks.CALIBRATION))
  return out


def wrap(model: nn.Module, rules: tuple[Rule, ...]) -> nn.Module:
  """`model` whose matched einsums see qwix-fake-quantized weights (same params tree)."""
  check(rules)
  return qwix.quantize_model(model, qwix.QtProvider(qtrules(rules)))
