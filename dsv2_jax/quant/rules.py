"""Which weights are quantized, and how: `quant.rules` read into a per-parameter plan.

`quant.rules` is a comma-separated list of MODULE=FORMAT, e.g. the article's advice
'ffn=int8,experts=int8,attention=fp16' (FFN to INT8 first, attention kept in FP16).

  MODULE  parameters (paths in the params tree)
  ffn        the dense FFN and the shared experts (up, gate, down)
  experts    the routed experts' w_in and w_out
  router     the MoE gate (its two layers, or DeepSeekMoE's one)
  attention  the q, k, v and output projections (and MLA's down/up projections)
  embed      the token embedding table (also the tied output head)
  head       the untied output head

  FORMAT  int8 (blocks of `quant.block`), int8:LAYOUT (e.g. int8:channel), bf16, fp16,
          f32 (kept as trained). Norms, biases and the reward model's score head are never
          quantized.

`plan` matches the rules against a model's parameters and fails (ValueError, one line)
on a rule that matches nothing, as it would silently do nothing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv2_jax.quant.blocks import Layout

MODULES = {
    "ffn": r"(^|.*/)(ffn|shared_experts)/(up|gate|down)/w",
    "experts": r"(^|.*/)moe/w_(in|out)",
    "router": r"(^|.*/)moe/router/(gate_in/w|gate_out|gate$)",
    "attention": (r"(^|.*/)attention/(query|key|value|out|query_down|query_up|kv_down|"
                  r"key_rope|key_up|value_up)/w"),
    "embed": r"embedder/embedding",
    "head": r"head/w",
}
FLOATS = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "f32": jnp.float32}
FORMATS = ("int8", "int8:LAYOUT", *FLOATS)


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one module's weights are stored: INT8 blocks of `layout`, or a float dtype."""

  module: str
  kind: str  # 'int8' or a key of FLOATS.
  layout: Layout | None = None

  def __str__(self) -> str:
    return f"{self.module}=int8:{self.layout}" if self.kind == "int8" else \
        f"{self.module}={self.kind}"


def default_rules(model: Any) -> str:
  """The article's advice for `model` (a model config section): FFN weights (dense and
  shared experts, routed experts) in INT8 blocks, attention projections in FP16;
  embedding, head and router as trained."""
  moe = model.moe
  parts = []
  if not moe.num_experts or moe.first_dense_layers or moe.num_shared_experts:
    parts.append("ffn=int8")
  if moe.num_experts:
    parts.append("experts=int8")
  return ",".join(parts + ["attention=fp16"])


def parse(text: str, default_block: str) -> tuple[Rule, ...]:
  """The rules of `quant.rules` ('' = none); ValueError naming the bad part and the fix."""
  rules = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    module, _, fmt = part.partition("=")
    if module not in MODULES:
      raise ValueError(f"quant.rules: {module!r} is not a module; choose among "
                       f"{list(MODULES)} (e.g. 'ffn=int8,attention=fp16').")
    if any(r.module == module for r in rules):
      raise ValueError(f"quant.rules names {module!r} twice.")
    kind, _, layout = fmt.partition(":")
    if kind == "int8":
      field = f"quant.rules {part!r}: block" if layout else "quant.block"
      rules.append(Rule(module, "int8", Layout.parse(layout or default_block, field)))
    elif kind in FLOATS and not layout:
      rules.append(Rule(module, kind))
    else:
      raise ValueError(f"quant.rules: {part!r} has no valid format; write MODULE=FORMAT "
                       f"with FORMAT one of {list(FORMATS)}.")
  return tuple(rules)


def path_of(keys: tuple[Any, ...]) -> str:
  """'a/b/c' of a tree path (the form MODULES match)."""
  return jax.tree_util.keystr(keys, simple=True, separator="/")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-parameter rules: {path: (rule, logical axis names)} of the parameters a rule
  covers; every other parameter is left as it is."""

  entries: dict[str, tuple[Rule, tuple[str | None, ...]]]

  def rule_of(self, path: str) -> tuple[Rule, tuple[str | None, ...]] | None:
    return self.entries.get(path)

  def map(self, fn, params: Any) -> Any:
    """`fn(rule, names, leaf)` on every planned leaf of `params`; others unchanged."""
    def visit(keys, leaf):
      entry = self.entries.get(path_of(keys))
      return leaf if entry is None else fn(entry[0], entry[1], leaf)
    return jax.tree_util.tree_map_with_path(visit, params)

  @property
  def int8_paths(self) -> list[str]:
    return [p for p, (r, _) in self.entries.items() if r.kind == "int8"]


def plan(rules: tuple[Rule, ...], boxed_params: Any) -> Plan:
  """Matches `rules` to the parameters of `boxed_params` (nn.Partitioned leaves, e.g.
  `jax.eval_shape` of `model.init`), whose names give each weight's matrix view."""
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  entries = {}
  for rule in rules:
    pattern = re.compile(MODULES[rule.module])
    hits = [(keys, leaf) for keys, leaf in leaves if pattern.fullmatch(path_of(keys))]
    if not hits:
      raise ValueError(f"quant.rules: {rule} matches no parameter of this model (no "
                       f"{rule.module} weights); drop it from quant.rules.")
    for keys, leaf in hits:
      names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * leaf.ndim
      entries[path_of(keys)] = (rule, names)
  return Plan(entries)
