"""Rematerialisation: `model.remat_policy` -> a `jax.checkpoint` policy for one layer.

The layers tag their activations with `checkpoint_name` (the names in `TAGS`); a policy
decides which of them the backward pass keeps and which it recomputes from the layer's
input. Every policy gives the same gradients as `none`; they differ in memory and FLOPs
(`experiments/remat_memory.py` measures both).

  none     no remat: autodiff keeps every residual.
  full     keep nothing but the layer input; recompute the whole layer.
  dots     keep every matmul output (no batch dims), recompute the element-wise rest.
  layered  the article's policy (SPEC 2.2): keep the FFN activations (gate, up, hidden)
           and the attention's Q and K; recompute V, the attention itself, the norms and
           the projections' outputs (MLA keeps its latents too: V is recomputed from
           them). An MoE FFN keeps its routing, gathered rows and expert
           activations; DSA keeps its token scores and selection ([B, T] and a few indices
           per block), so the backward pass never redoes the top-k.
  offload  keep what `layered` keeps, in host memory (memory kind 'pinned_host'), and
           copy it back for the backward pass. On CPU, host memory is device memory:
           the copies vanish in lowering and the policy costs what `layered` does.
  custom   keep exactly the names listed in `model.remat_names` (comma-separated).
"""

from __future__ import annotations

from typing import Callable

import jax

# Every name a layer passes to `checkpoint_name`, with where it is.
TAGS: dict[str, str] = {
    "query": "attention: Q after RoPE [B, T, N, H]",
    "key": "attention: K after RoPE [B, T, K, H]",
    "value": "attention: V [B, T, K, H]",
    "attention_out": "attention: output before the out projection [B, T, N, H]",
    "kv_latent": "MLA: the joint KV latent c_kv after its norm [X, c]",
    "key_rope": "MLA: the decoupled RoPE key shared by all heads [B, T, r]",
    "query_latent": "MLA: the low-rank query latent after its norm [X, q]",
    "dsa_scores": "DSA: per-token selection score [B, T]",
    "dsa_selection": "DSA: selected positions per query block",
    "ffn_gate": "FFN: gate projection [X, F]",
    "ffn_up": "FFN: up projection [X, F]",
    "ffn_hidden": "FFN: act(gate) * up [X, F]",
    "ffn_down": "FFN: down projection, the block's output [X, D]",
    "moe_routing": "MoE: chosen experts [X, A]",
    "moe_rows": "MoE: tokens gathered into expert-sorted rows [R, D]",
    "moe_expert_pre": "MoE: expert input projections (gate | up) [R, 2F]",
    "moe_expert_out": "MoE: expert outputs, expert-sorted rows [R, D]",
    "moe_out": "MoE: combined expert output [X, D]",
}

LAYERED = ("query", "key", "kv_latent", "key_rope", "query_latent", "dsa_scores", "dsa_selection", "ffn_gate", "ffn_up", "ffn_hidden",
           "moe_routing", "moe_rows", "moe_expert_pre", "moe_expert_out")

OFFLOAD_SRC, OFFLOAD_DST = "device", "pinned_host"

POLICIES = ("none", "full", "dots", "layered", "offload", "custom")


def parse_names(text: str) -> tuple[str, ...]:
  """'query, key' -> ('query', 'key'); unknown names raise ValueError listing `TAGS`."""
  listed = tuple(n.strip() for n in text.split(",") if n.strip())
  unknown = [n for n in listed if n not in TAGS]
  if unknown:
    raise ValueError(f"model.remat_names has unknown names {unknown}: use names from "
                     f"{', '.join(TAGS)}.")
  return listed


def saved_names(name: str, custom_names: str = "") -> tuple[str, ...]:
  """The tagged activations a policy keeps (for `dots`, `none`, `full`: none by name)."""
  if name in ("layered", "offload"):
    return LAYERED
  if name == "custom":
    return parse_names(custom_names)
  return ()


def supports_offload(device: jax.Device | None = None) -> bool:
  """Whether the device has the host memory kind `offload` copies residuals to."""
  device = device or jax.devices()[0]
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # pylint: disable=broad-except  # Backends without memory kinds.
    return False
  return OFFLOAD_DST in kinds


def policy(name: str, custom_names: str = "") -> Callable | None:
  """The jax.checkpoint policy for `name`; None means do not rematerialise.

  Raises ValueError (naming the config field and the fix) for an unknown policy or
  name, names given to a policy other than `custom`, and `offload` without host memory.
  """
  if name not in POLICIES:
    raise ValueError(f"model.remat_policy={name!r} is unknown; choose one of {POLICIES}.")
  if name == "custom" and not parse_names(custom_names):
    raise ValueError("model.remat_policy='custom' needs model.remat_names, e.g. "
                     "--config.model.remat_names=query,key,ffn_hidden.")
  if name != "custom" and custom_names:
    raise ValueError(f"model.remat_names={custom_names!r} is only read by "
                     "model.remat_policy='custom': set that policy or clear the names.")
  cp = jax.checkpoint_policies
  if name == "none":
    return None
  if name == "full":
    return cp.nothing_saveable
  if name == "dots":
    return cp.dots_with_no_batch_dims_saveable
  if name == "offload":
    if not supports_offload():
      raise ValueError(
          f"model.remat_policy='offload' needs a '{OFFLOAD_DST}' memory kind, which "
          f"{jax.devices()[0].platform} devices lack here; use 'layered' instead.")
    return cp.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=LAYERED,
        offload_src=OFFLOAD_SRC, offload_dst=OFFLOAD_DST)
  return cp.save_only_these_names(*saved_names(name, custom_names))
