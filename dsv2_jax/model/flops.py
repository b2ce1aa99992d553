"""Analytic parameter and FLOP counts of the decoder (for MFU and `info`).

Training FLOPs per token follow the PaLM appendix convention:
  6 * (matmul parameters, output head included)  +  6 * 2 * L * T * N * H
(the attention term counts the full T x T score and value products without the
causal discount). MFU = achieved model FLOP/s / peak FLOP/s.
"""

from __future__ import annotations

import ml_collections

from dsv2_jax.model.ffn import is_gated


def matmul_params(model: ml_collections.ConfigDict) -> int:
  """Parameters that take part in a matmul per token (embedding lookup excluded)."""
  d, n, f, v = model.d_model, model.num_heads, model.ffn_hidden, model.vocab_size
  k = model.num_kv_heads or n
  h = model.head_dim or d // n
  attention = d * n * h * 2 + d * k * h * 2  # query, out; key, value
  ffn = d * f * (3 if is_gated(model.activation) else 2)
  return model.num_layers * (attention + ffn) + d * v  # + output head


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  n, d = model.num_heads, model.d_model
  h = model.head_dim or d // n
  return 6.0 * matmul_params(model) + 12.0 * model.num_layers * seq_len * n * h


def forward_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  return train_flops_per_token(model, seq_len) / 3.0
