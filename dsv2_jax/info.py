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


def _component(path: tuple[Any, ...]) -> str:
  """A readable name for a parameter's group: 'embedder', 'layers/attention', ..."""
  keys = [getattr(p, "key", str(p)) for p in path]
  if keys[0] in ("layers",) or keys[0].startswith("layer_"):
    return f"layers/{keys[1]}"
  return keys[0]


def model_info(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Total parameters, a per-component breakdown and FLOPs per token."""
  params = abstract_params(config.model)
  breakdown: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = _component(path)
    breakdown[name] = breakdown.get(name, 0) + int(leaf.size)
  total = sum(breakdown.values())
  return {
      "total_params": total,
      "active_params": total,  # Dense model: every parameter is used for every token.
      "matmul_params": flops.matmul_params(config.model),
      "breakdown": dict(sorted(breakdown.items())),
      "train_flops_per_token": flops.train_flops_per_token(config.model, config.data.seq_len),
      "seq_len": config.data.seq_len,
  }


def format_info(report: dict[str, Any]) -> str:
  lines = [f"total parameters   {report['total_params']:>16,}",
           f"active per token   {report['active_params']:>16,}",
           f"matmul parameters  {report['matmul_params']:>16,}",
           f"train FLOPs/token  {report['train_flops_per_token']:>16,.0f}"
           f"  (seq_len {report['seq_len']})", "breakdown:"]
  lines += [f"  {name:<24}{count:>16,}" for name, count in report["breakdown"].items()]
  return "\n".join(lines)
