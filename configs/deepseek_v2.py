"""The published DeepSeek-V2 layout (236B total / 21B active), and its tiny CPU variant.

DeepSeek-AI (2024), "DeepSeek-V2: a strong, economical, and efficient mixture-of-experts
language model": Multi-head Latent Attention (dsv2_jax/model/mla.py; 128 heads, KV latent
512, query latent 1,536, decoupled RoPE 64), DeepSeekMoE (1 dense layer, then 2 shared +
160 routed experts of hidden 1,536, top-6 among 3 of 8 groups, weights x 16), YaRN x40
over 4K with mscale 0.707. `PUBLISHED` is the checkpoint's Hugging Face config.json; the
model fields come from it through the converter's own mapping
(`dsv2_jax.convert.hf_deepseek_v2.model_config`), so `convert --from_hf` of the real
checkpoint gives exactly this model. Counts from abstract shapes (docs/results.md 13):
  python -m dsv2_jax info --config configs/deepseek_v2.py
  python -m dsv2_jax plan --config configs/deepseek_v2.py --mesh fsdp=-1,tensor=8,expert=8 \
      --devices 1024
configs/deepseek_v2_lite.py is DeepSeek-V2-Lite (15.7B / 2.4B) through the same function.

Arguments after ':' (combinable):
  tiny          the CPU variant: width 128, 4 layers, 4 heads on the local Wikipedia
                excerpt with configs/tiny.py's training settings; MLA with latent 64, RoPE
                16, heads 32 + 16 (the full model's query latent at 3/2 the KV latent);
                DeepSeekMoE with 1 dense layer, then 2 shared + 32 routed experts of hidden
                64, top-6 (the Lite variant: greedy; this one: 3 of 8 groups... scaled to
                2 of 4), so its active FFN width (8 x 64) equals the dense FFN's 4D = 512:
                  python -m dsv2_jax train --config configs/deepseek_v2.py:tiny --workdir runs/v2_tiny
  steps, seq_len, batch_size, width, layers   as configs/tiny.py (with tiny)
  remat=POLICY  model.remat_policy (default layered at full size, none when tiny)
  attention=dense|dsa   the kernel behind MLA (DSA from the article; decoding: dense)
  variant=full|lite     which published checkpoint (configs/deepseek_v2_lite.py sets lite)
  pretrain      from-scratch pretraining as the paper: plain RoPE at 4K (the published
                config is the long-context one, YaRN x40 to 160K; the layout is the same)
"""

import pathlib

import ml_collections

from dsv2_jax import config as config_lib
from dsv2_jax.convert import hf_deepseek_v2

_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
_COMMON = dict(model_type="deepseek_v2", vocab_size=102_400, num_key_value_heads=None,
               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
               moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
               hidden_act="silu", max_position_embeddings=163_840, rms_norm_eps=1e-6,
               tie_word_embeddings=False, rope_theta=10_000, rope_scaling=_YARN,
               attention_bias=False, initializer_range=0.02)
# config.json of deepseek-ai/DeepSeek-V2 and deepseek-ai/DeepSeek-V2-Lite (the fields the
# model reads).
PUBLISHED = {
    "full": dict(_COMMON, hidden_size=5120, intermediate_size=12_288,
                 moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
                 q_lora_rank=1536, n_routed_experts=160, routed_scaling_factor=16.0,
                 topk_method="group_limited_greedy", n_group=8, topk_group=3,
                 aux_loss_alpha=0.003),
    "lite": dict(_COMMON, hidden_size=2048, intermediate_size=10_944,
                 moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                 q_lora_rank=None, n_routed_experts=64, routed_scaling_factor=1.0,
                 topk_method="greedy", n_group=1, topk_group=1, aux_loss_alpha=0.001),
}
# The published totals the counts are checked against (tests/test_info.py).
PUBLISHED_PARAMS = {"full": (236e9, 21e9), "lite": (15.7e9, 2.4e9)}


def tiny_config(variant: str, args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The tiny CPU variant: configs/tiny.py's data and training, a scaled-down V2 model."""
  tiny_args = ",".join(f"{k}={args[k]}" for k in ("steps", "seq_len", "batch_size", "width",
                                                   "layers") if args[k])
  c = config_lib.from_file(pathlib.Path(__file__).with_name("tiny.py"), tiny_args or None)
  m = c.model
  width = m.d_model
  m.update(position="rope", attention=args.attention, remat_policy=args.remat or "none")
  if m.remat_policy != "none":
    m.scan_unroll = 1
  if args.attention != "dense":
    c.sample.max_new_tokens = 0  # Decoding MLA is built for dense attention only.
  m.mla.update(kv_lora_rank=width // 2, q_lora_rank=(3 * width // 4) if variant == "full" else 0,
               qk_nope_head_dim=width // 4, qk_rope_head_dim=width // 8,
               v_head_dim=width // 4)
  grouped = variant == "full"
  m.moe.update(num_experts=32, top_k=6, num_shared_experts=2, expert_hidden=m.ffn_hidden // 8,
               router="linear", first_dense_layers=1, n_group=4 if grouped else 1,
               topk_group=2 if grouped else 1,
               routed_scaling_factor=PUBLISHED[variant]["routed_scaling_factor"],
               aux_loss_weight=PUBLISHED[variant]["aux_loss_alpha"], z_loss_weight=0.0)
  return c


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, variant="full", tiny=False, steps=0, seq_len=0,
                              batch_size=0, width=0, layers=0, remat="", attention="dense",
                              pretrain=False)
  if args.variant not in PUBLISHED:
    raise config_lib.ConfigError(f"config argument variant={args.variant!r}: choose one of "
                                 f"{sorted(PUBLISHED)}.")
  if args.tiny:
    return tiny_config(args.variant, args)
  c = hf_deepseek_v2.model_config(PUBLISHED[args.variant])
  c.model.update(dtype="bfloat16", attention=args.attention,
                 remat_policy=args.remat or "layered")
  if args.attention != "dense":
    c.sample.max_new_tokens = 0  # Decoding MLA is built for dense attention only.
  if args.pretrain:  # Stage 1 of the paper: 4K context, plain RoPE; YaRN comes after.
    c.model.update(rope_scaling="none", rope_scale=1.0, max_seq_len=4096)
  # Pretraining as the paper: 4K-token rows, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0,
  # warmup 2,000 steps to 2.4e-4 (full) / 4.2e-4 (Lite).
  c.data.update(dataset="c4/en", seq_len=4096, batch_size=1024)
  c.eval.update(batch_size=1024)
  c.train.update(learning_rate=2.4e-4 if args.variant == "full" else 4.2e-4,
                 warmup_steps=2000, weight_decay=0.1, grad_clip_norm=1.0)
  return c
