"""Parameter accounting from abstract shapes (`jax.eval_shape`: nothing allocated)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsv2_jax.model import flops
from dsv2_jax.model.transformer import build_model


def abstract_params(model_config: ml_collections.ConfigDict) -> Any:
  model = build_model(model_config)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
  return nn.meta.unbox(shapes)


def _keys(path: tuple[Any, ...]) -> list[str]:
  return [getattr(p, "key", str(p)) for p in path]


def _component(keys: list[str]) -> str:
  """A readable name for a parameter's group: 'embedder', 'attention', 'moe/experts', ..."""
  if not keys[0].startswith(("layers", "dense_layers", "moe_layers")):
    return keys[0]
  inner = [k for k in keys[1:] if not k.startswith("block_")]
  if inner[0] == "moe":
    if inner[1] in ("w_in", "w_out"):
      return "moe/routed_experts"
    return f"moe/{inner[1]}"
  return inner[0]


def _is_routed_expert(keys: list[str]) -> bool:
  return "moe" in keys and keys[-1] in ("w_in", "w_out")


def model_info(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Total and active (per token) parameters, a per-component breakdown, FLOPs per token.

  Everything comes from abstract shapes. Active parameters count each routed-expert
  weight [E, ...] at k / E of its size: a token runs k of the E experts.
  """
  params = abstract_params(config.model)
  moe = config.model.moe
  breakdown: dict[str, int] = {}
  routed = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = _keys(path)
    name = _component(keys)
    breakdown[name] = breakdown.get(name, 0) + int(leaf.size)
    if _is_routed_expert(keys):
      routed += int(leaf.size)
  total = sum(breakdown.values())
  active = total - routed + (routed * moe.top_k // moe.num_experts if routed else 0)
  return {
      "total_params": total,
      "active_params": active,
      "routed_expert_params": routed,
      "matmul_params": flops.matmul_params(config.model),
      "breakdown": dict(sorted(breakdown.items())),
      "train_flops_per_token": flops.train_flops_per_token(config.model, config.data.seq_len),
      "seq_len": config.data.seq_len,
  }


def format_info(report: dict[str, Any]) -> str:
  lines = [f"total parameters   {report['total_params']:>16,}",
           f"active per token   {report['active_params']:>16,}",
           f"routed experts     {report['routed_expert_params']:>16,}",
           f"matmul parameters  {report['matmul_params']:>16,}  (per token: active without "
           "the embedding lookup)",
           f"train FLOPs/token  {report['train_flops_per_token']:>16,.0f}"
           f"  (seq_len {report['seq_len']})", "breakdown:"]
  lines += [f"  {name:<24}{count:>16,}" for name, count in report["breakdown"].items()]
  return "\n".join(lines)
