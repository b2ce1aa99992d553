"""Inference latency on paper: a roofline + collectives model of tensor x pipeline layouts.

For one request (batch 1) of a decoder config on `Hardware`, with tensor parallelism TP
(matmuls split along their output / input dimension inside a node, Megatron style) and
PP pipeline stages (consecutive layers on different nodes):

  compute   forward FLOPs (`model.flops`, PaLM convention) / TP / peak FLOP/s
  memory    bytes each device reads: its 1/TP of the weights a token uses (all of a
            layer's attention and dense FFN; the router's top-k experts, at most all of
            them, for the prompt's tokens) plus its KV cache, / HBM bandwidth
  layer     max(compute, memory) (roofline), per layer, plus the head
  tp comm   2 all-reduces of the layer's activations [tokens, D] per layer over TP
            devices on the intra-node link (ring: 2 (n-1)/n x bytes / bandwidth + 2 (n-1)
            link latencies)
  pp comm   PP - 1 sends of the activations between stages on the inter-node link
  head      the output head's matmul, then a ring all-gather of the vocabulary-split
            logits over TP (`tp_collective_bytes`; checked against compiled HLO)

Without overlap every term adds. With overlap the TP all-reduces hide behind the next
layer's compute (per layer max(layer, tp comm)), and the prompt is cut into
`microbatches` chunks that flow through the stages (GPipe fill: the pipeline takes
(m + PP - 1) chunk-stage times instead of PP x m), the stage-to-stage sends hidden
behind compute. Decode (one new token) cannot be chunked: its stages run one after the
other, so PP never shortens a decode step. Numbers are lower bounds at the data-sheet
peaks (`efficiency` scales them); docs/latency.md cites the sheets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from dsv2_jax.model import flops as flops_lib


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator and its links (per device, one direction)."""

  name: str
  peak_flops: float  # Dense bf16 matmul FLOP/s.
  hbm_bytes_per_s: float
  intra_node_bytes_per_s: float  # NVLink / ICI.
  inter_node_bytes_per_s: float  # InfiniBand / DCN, this device's share.
  devices_per_node: int
  link_latency_s: float  # Per hop of a ring step.


# Data-sheet figures (docs/latency.md gives the sources).
PRESETS = {
    "h100": Hardware("NVIDIA H100 SXM5 (NVLink 4 + 400G InfiniBand NDR)", 989e12, 3.35e12,
                     450e9, 50e9, 8, 5e-6),
    "h200": Hardware("NVIDIA H200 SXM (NVLink 4 + 400G InfiniBand NDR)", 989e12, 4.8e12,
                     450e9, 50e9, 8, 5e-6),
    # A v5p pod slice is one ICI domain (up to 8,960 chips): stages stay on ICI too.
    "tpu_v5p": Hardware("Google TPU v5p (ICI)", 459e12, 2.765e12, 600e9, 600e9, 8960, 2e-6),
}


@dataclasses.dataclass(frozen=True)
class Layout:
  tensor: int = 1
  stages: int = 1
  microbatches: int = 1  # Prompt chunks pipelined through the stages (prefill only).
  overlap: bool = False


def ring_all_reduce_s(num_bytes: float, devices: int, bandwidth: float, latency: float
                      ) -> float:
  """Ring all-reduce of `num_bytes` per device: reduce-scatter + all-gather."""
  if devices <= 1:
    return 0.0
  return 2 * (devices - 1) / devices * num_bytes / bandwidth + 2 * (devices - 1) * latency


def send_s(num_bytes: float, bandwidth: float, latency: float) -> float:
  return num_bytes / bandwidth + latency


def tp_collective_bytes(model: ml_collections.ConfigDict, tokens: int, tensor: int,
                        bytes_per_value: int = 2) -> dict[str, int]:
  """Per-device result bytes of one forward pass's TP collectives, as
  `parallel.collectives.collective_bytes` counts them in compiled HLO: 2 all-reduces of
  [tokens, D] per layer, and the all-gather of the vocabulary-split logits [tokens, V]
  (V padded to a multiple of TP)."""
  if tensor <= 1:
    return {"all-reduce": 0, "all-gather": 0}
  vocab = -(-model.vocab_size // tensor) * tensor
  return {"all-reduce": 2 * model.num_layers * tokens * model.d_model * bytes_per_value,
          "all-gather": tokens * vocab * bytes_per_value}


def estimate(model: ml_collections.ConfigDict, hw: Hardware, layout: Layout, tokens: int,
             context: int = 0, bytes_per_param: int = 2, efficiency: float = 1.0
             ) -> dict[str, Any]:
  """Seconds for one forward pass over `tokens` new tokens after `context` cached ones
  (prefill: tokens = prompt, context = 0; decode: tokens = 1, context = prompt + so far).

  Returns the total and its parts (seconds), per layer and summed over the model.
  """
  tp, pp = layout.tensor, layout.stages
  if not 1 <= pp <= model.num_layers:
    raise ValueError(f"stages={pp} must be in [1, {model.num_layers} layers].")
  if tp > hw.devices_per_node:
    raise ValueError(f"tensor={tp} is more than the {hw.devices_per_node} devices of a "
                     f"{hw.name} node; the model puts TP inside a node.")
  m = layout.microbatches if tokens > 1 else 1
  if tokens % m:
    raise ValueError(f"{tokens} prompt tokens do not split into {m} microbatches.")
  peak, hbm = hw.peak_flops * efficiency, hw.hbm_bytes_per_s * efficiency
  w = flops_lib.matmul_weights(model)
  moe = model.moe
  layers = model.num_layers
  moe_layers = flops_lib.num_moe_layers(model)
  d = model.d_model
  span = context + tokens
  flops_per_token = flops_lib.forward_flops_per_token(model, span)

  # Per layer, per chunk of tokens / m new tokens: FLOPs and bytes one device handles.
  chunk = tokens / m
  head_flops = 2.0 * w["head"] * chunk
  layer_flops = (flops_per_token * chunk - head_flops) / layers
  experts_read = min(moe.num_experts, moe.top_k * max(1, int(chunk))) if moe.num_experts else 0
  dense_layer = w["attention"] + w["ffn"]
  moe_layer = w["attention"] + w["gate"] + w["expert"] * (experts_read
                                                          + moe.num_shared_experts)
  mean_weights = ((layers - moe_layers) * dense_layer + moe_layers * moe_layer) / layers
  # The cache this layer reads: K and V split over TP by heads, or MLA's latent, which
  # every head needs, read whole on each device.
  kv_bytes = span * flops_lib.cache_values_per_token(model) * bytes_per_param
  kv_split = 1 if model.mla.kv_lora_rank else tp
  layer_bytes = mean_weights * bytes_per_param / tp + kv_bytes / kv_split
  compute = layer_flops / tp / peak
  memory = layer_bytes / hbm
  layer = max(compute, memory)
  act_bytes = chunk * d * bytes_per_param
  tp_comm = 2 * ring_all_reduce_s(act_bytes, tp, hw.intra_node_bytes_per_s, hw.link_latency_s)
  head = max(head_flops / tp / peak, w["head"] * bytes_per_param / tp / hbm)
  if tp > 1:  # The vocabulary-split logits are gathered (ring all-gather).
    logits = tp_collective_bytes(model, 1, tp, bytes_per_param)["all-gather"] * chunk
    head += ((tp - 1) / tp * logits / hw.intra_node_bytes_per_s
             + (tp - 1) * hw.link_latency_s)
  p2p = send_s(act_bytes, hw.inter_node_bytes_per_s, hw.link_latency_s) if pp > 1 else 0.0

  per_layer = max(layer, tp_comm) if layout.overlap else layer + tp_comm
  stage = per_layer * math.ceil(layers / pp)  # One chunk through the deepest stage.
  if layout.overlap:  # Chunks fill the pipeline; sends hide behind the next chunk's compute.
    total = (m + pp - 1) * max(stage, p2p) + head * m
  else:  # Chunk after chunk, each through every layer and every stage boundary.
    total = m * (layers * per_layer + (pp - 1) * p2p + head)
  return {
      "total_s": total, "tokens": tokens, "context": context, "layout": dataclasses.asdict(layout),
      "hardware": hw.name, "devices": tp * pp,
      "per_layer": {"compute_s": compute, "memory_s": memory, "tp_comm_s": tp_comm,
                    "bound": "compute" if compute >= memory else "memory"},
      "compute_s": compute * layers * m, "memory_s": memory * layers * m,
      "tp_comm_s": tp_comm * layers * m, "pp_comm_s": p2p * (pp - 1) * m, "head_s": head * m,
      "flops": flops_per_token * tokens,
  }


def article_table(model: ml_collections.ConfigDict, hw: Hardware, prompt: int,
                  new_tokens: int, microbatches: int = 16) -> dict[str, Any]:
  """The article's comparison (SPEC 3.2): one request = prefill `prompt` tokens + decode
  `new_tokens`, under TP 8, TP 8 x PP 4 without overlap, and with overlap (the prompt in
  the best of 1, 2, 4, ... `microbatches` chunks: more chunks fill the pipeline but each
  rereads the weights)."""
  chunks = [m for m in (1, 2, 4, 8, 16, 32) if m <= microbatches and prompt % m == 0]
  best = min(chunks, key=lambda m: estimate(model, hw, Layout(8, 4, m, True),
                                            prompt)["total_s"])
  layouts = {"tp8": Layout(8, 1), "tp8_pp4": Layout(8, 4),
             "tp8_pp4_overlap": Layout(8, 4, best, True)}
  out = {}
  for name, layout in layouts.items():
    prefill = estimate(model, hw, layout, prompt)
    decode = estimate(model, hw, layout, 1, context=prompt + new_tokens // 2)
    out[name] = {"prefill_s": prefill["total_s"], "decode_token_s": decode["total_s"],
                 "request_s": prefill["total_s"] + new_tokens * decode["total_s"],
                 "prefill": prefill, "decode": decode}
  base = out["tp8"]["request_s"]
  for row in out.values():
    row["speedup_vs_tp8"] = base / row["request_s"]
  return {"hardware": hw.name, "prompt_tokens": prompt, "new_tokens": new_tokens,
          "microbatches": microbatches, "layouts": out}


def format_table(table: dict[str, Any]) -> str:
  lines = [f"{table['hardware']}: one request of {table['prompt_tokens']} prompt tokens + "
           f"{table['new_tokens']} new tokens (batch 1; lower bounds at data-sheet peaks)",
           f"{'layout':<18} {'devices':>7} {'prefill ms':>11} {'decode ms/token':>16} "
           f"{'request ms':>11} {'vs tp8':>7}"]
  for name, row in table["layouts"].items():
    lines.append(f"{name:<18} {row['prefill']['devices']:>7} {row['prefill_s'] * 1e3:>11.2f} "
                 f"{row['decode_token_s'] * 1e3:>16.3f} {row['request_s'] * 1e3:>11.1f} "
                 f"{row['speedup_vs_tp8']:>6.2f}x")
  return "\n".join(lines)


def cpu_hardware(peak_flops: float, hbm_bytes_per_s: float) -> Hardware:
  """This machine as `Hardware` (measured peak and memory bandwidth; one device)."""
  return Hardware("this CPU (measured)", peak_flops, hbm_bytes_per_s, math.inf, math.inf, 1,
                  0.0)
