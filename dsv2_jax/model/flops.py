"""Analytic parameter and FLOP counts of the decoder (for MFU and `info`).

Training FLOPs per token follow the PaLM appendix convention:
  6 * (matmul parameters, output head included)  +  6 * L * T * N * (Hqk + Hv)
(the attention term counts the full T x T score and value products without the
causal discount; Hqk = Hv = H except under Multi-head Latent Attention, whose heads are
H + r wide for scores and O for values). MFU = achieved model FLOP/s / peak FLOP/s.
"""

from __future__ import annotations

import ml_collections

from dsv2_jax.model.ffn import is_gated


def num_moe_layers(model: ml_collections.ConfigDict) -> int:
  moe = model.moe
  if not moe.num_experts:
    return 0
  return (model.num_layers - moe.first_dense_layers) // moe.every_n_layers


def head_dims(model: ml_collections.ConfigDict) -> tuple[int, int]:
  """(query/key width, value width) of one attention head."""
  mla = model.mla
  if mla.kv_lora_rank:
    return mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim
  h = model.head_dim or model.d_model // model.num_heads
  return h, h


def cache_values_per_token(model: ml_collections.ConfigDict) -> int:
  """Values one layer caches per token for decoding: c + r (MLA) or 2 K H (MHA/GQA)."""
  if model.mla.kv_lora_rank:
    return model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
  return 2 * (model.num_kv_heads or model.num_heads) * head_dims(model)[0]


def attention_weights(model: ml_collections.ConfigDict) -> int:
  """Matmul parameters of one attention layer (projections in and out)."""
  d, n = model.d_model, model.num_heads
  mla = model.mla
  if mla.kv_lora_rank:  # Multi-head Latent Attention (model/mla.py).
    qk, v = head_dims(model)
    c, r = mla.kv_lora_rank, mla.qk_rope_head_dim
    query = (d * mla.q_lora_rank + mla.q_lora_rank * n * qk) if mla.q_lora_rank else d * n * qk
    return query + d * (c + r) + c * n * (mla.qk_nope_head_dim + v) + n * v * d
  k = model.num_kv_heads or n
  h, _ = head_dims(model)
  return d * n * h * 2 + d * k * h * 2  # query, out; key, value


def matmul_weights(model: ml_collections.ConfigDict) -> dict[str, int]:
  """Matmul parameters of one layer's parts and of the head: attention (q, k, v, out),
  the dense FFN, one routed expert, the MoE gate, the output head."""
  d, f, v = model.d_model, model.ffn_hidden, model.vocab_size
  width = d * (3 if is_gated(model.activation) else 2)
  moe = model.moe
  gate = 0
  if moe.num_experts:
    gate = (d * moe.num_experts if moe.router == "linear"
            else d * moe.gate_hidden + moe.gate_hidden * moe.num_experts)
  return {"attention": attention_weights(model),
          "ffn": width * f,
          "expert": width * moe.expert_hidden if moe.num_experts else 0,
          "gate": gate,
          "head": d * v}


def matmul_params(model: ml_collections.ConfigDict) -> int:
  """Parameters that take part in a matmul per token (embedding lookup excluded).

  An MoE layer counts its gate, the k routed experts a token uses and the shared ones.
  """
  w = matmul_weights(model)
  moe, moe_layers = model.moe, num_moe_layers(model)
  dense_layers = model.num_layers - moe_layers
  total = model.num_layers * w["attention"] + dense_layers * w["ffn"] + w["head"]
  if moe_layers:
    experts = (moe.top_k + moe.num_shared_experts) * w["expert"]
    total += moe_layers * (w["gate"] + experts)
  return total


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  qk, v = head_dims(model)
  return 6.0 * matmul_params(model) + 6.0 * model.num_layers * seq_len * model.num_heads * (
      qk + v)


def forward_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  return train_flops_per_token(model, seq_len) / 3.0
