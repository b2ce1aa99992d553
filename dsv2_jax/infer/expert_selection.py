"""Selective expert loading (article 4.2): keep, per MoE layer, only the experts a task uses.

  profile       counts, per MoE layer, how often each expert is among a token's top-k
                over a task's data (the router's sown assignment fractions x tokens);
  keep_experts  keeps the M most used experts of each layer (each layer its own set, in
                ascending index order) and drops the rest from the parameters: every
                parameter with an 'expert' axis (w_in, w_out, the gate's output layer, the
                balance bias) is gathered along it. The model is rebuilt with
                `moe.num_experts = M`, so the router's softmax runs over the kept experts
                only: the gate is renormalised over them.

With M = E nothing changes (the identity gather): the model is the full model exactly.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsv2_jax.model.moe import ASSIGNMENT_FRACTION
from dsv2_jax.model.transformer import build_model
from dsv2_jax.quant.rules import path_of


def profile(model: nn.Module, params: Any, batches: Iterable[dict[str, np.ndarray]]
            ) -> dict[str, np.ndarray]:
  """{MoE module path: int64 [L, E] selection counts} over the `batches` ('inputs')."""
  @jax.jit
  def fractions(params, inputs):
    _, variables = model.apply({"params": params}, inputs, mutable=["intermediates"])
    out = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(variables["intermediates"])[0]:
      path = path_of(keys)
      if f"/router/{ASSIGNMENT_FRACTION}/" in path:
        out[path.split("/router/")[0]] = leaf  # [L, E] fraction of this batch's picks.
    return out

  counts: dict[str, np.ndarray] = {}
  for batch in batches:
    inputs = jnp.asarray(batch["inputs"])
    picks = inputs.size * model.cfg.moe.top_k
    for path, frac in jax.device_get(fractions(params, inputs)).items():
      got = np.rint(np.asarray(frac, np.float64) * picks).astype(np.int64)
      counts[path] = counts.get(path, 0) + got
  if not counts:
    raise ValueError("the model has no MoE layers to profile (model.moe.num_experts=0).")
  return counts


def kept_experts(counts: dict[str, np.ndarray], keep: int) -> dict[str, np.ndarray]:
  """{MoE path: int32 [L, keep]} the `keep` most used experts per layer, ascending
  (ties: the lower index)."""
  out = {}
  for path, c in counts.items():
    order = np.argsort(-c, axis=-1, kind="stable")[:, :keep]
    out[path] = np.sort(order, axis=-1).astype(np.int32)
  return out


def keep_experts(params: Any, boxed_params: Any, kept: dict[str, np.ndarray]) -> Any:
  """`params` with only the `kept` experts of each MoE layer (see module docstring)."""
  names = {path_of(k): tuple(leaf.names) for k, leaf in jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}

  def gather(keys, leaf):
    path = path_of(keys)
    axes = names.get(path, ())
    owner = next((p for p in kept if path.startswith(p + "/")), None)
    if owner is None or "expert" not in axes:
      return leaf
    axis = axes.index("expert")
    idx = jnp.asarray(kept[owner])  # [L, M]; axis 0 of the leaf is the layers axis.
    shape = [1] * leaf.ndim
    shape[0], shape[axis] = idx.shape
    return jnp.take_along_axis(leaf, idx.reshape(shape), axis=axis)

  return jax.tree_util.tree_map_with_path(gather, params)


def kept_model_config(model: ml_collections.ConfigDict, keep: int
                      ) -> ml_collections.ConfigDict:
  """The model section with `keep` experts; ValueError if it cannot hold the top-k."""
  e, k = model.moe.num_experts, model.moe.top_k
  if not e:
    raise ValueError("--experts_keep needs an MoE run (model.moe.num_experts=0).")
  if not k <= keep <= e:
    raise ValueError(f"--experts_keep={keep} must be in [moe.top_k={k}, "
                     f"moe.num_experts={e}].")
  if model.moe.topk_group < model.moe.n_group:
    raise ValueError(f"--experts_keep: this run routes within groups (moe.n_group="
                     f"{model.moe.n_group}, topk_group={model.moe.topk_group}); keeping a "
                     "subset of experts would break the groups. Evaluate it without "
                     "--experts_keep.")
  out = ml_collections.ConfigDict(model.to_dict())
  out.moe.num_experts = keep
  return out


def select(model: nn.Module, params: Any, boxed_params: Any,
           batches: Iterable[dict[str, np.ndarray]], keep: int) -> tuple[nn.Module, Any]:
  """(model, params) with only the `keep` experts per layer that `batches` pick most."""
  kept_model = build_model(kept_model_config(model.cfg, keep))
  counts = profile(model, params, batches)
  return kept_model, keep_experts(params, boxed_params, kept_experts(counts, keep))


def parameter_bytes(params: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
