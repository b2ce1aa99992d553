"""Analytic parameter and FLOP counts of the decoder (for MFU and `info`).

Training FLOPs per token follow the PaLM appendix convention:
  6 * (matmul parameters, output head included)  +  6 * 2 * L * T * N * H
(the attention term counts the full T x T score and value products without the
causal discount). MFU = achieved model FLOP/s / peak FLOP/s.
"""

from __future__ import annotations

import ml_collections

from dsv2_jax.model.ffn import is_gated


def num_moe_layers(model: ml_collections.ConfigDict) -> int:
  moe = model.moe
  if not moe.num_experts:
    return 0
  return (model.num_layers - moe.first_dense_layers) // moe.every_n_layers


def matmul_params(model: ml_collections.ConfigDict) -> int:
  """Parameters that take part in a matmul per token (embedding lookup excluded).

  An MoE layer counts its gate, the k routed experts a token uses and the shared ones.
  """
  d, n, f, v = model.d_model, model.num_heads, model.ffn_hidden, model.vocab_size
  k = model.num_kv_heads or n
  h = model.head_dim or d // n
  per_ffn_width = d * (3 if is_gated(model.activation) else 2)
  attention = d * n * h * 2 + d * k * h * 2  # query, out; key, value
  moe, moe_layers = model.moe, num_moe_layers(model)
  dense_layers = model.num_layers - moe_layers
  total = model.num_layers * attention + dense_layers * per_ffn_width * f + d * v
  if moe_layers:
    gate = d * moe.gate_hidden + moe.gate_hidden * moe.num_experts
    experts = (moe.top_k + moe.num_shared_experts) * per_ffn_width * moe.expert_hidden
    total += moe_layers * (gate + experts)
  return total


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  n, d = model.num_heads, model.d_model
  h = model.head_dim or d // n
  return 6.0 * matmul_params(model) + 12.0 * model.num_layers * seq_len * n * h


def forward_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  return train_flops_per_token(model, seq_len) / 3.0
