"""dsv2_jax: JAX/Flax reimplementation of the article's large-model design.

Where things live (README.md has the full table):
  dsv2_jax/model/      the model maths; the shape alphabet is in its __init__
    layers, rope, ffn, attention   Einsum/Norm/Embedder, RoPE, FFNs, dense attention
    dsa, dsa_global                dynamic sparse attention (fast path, global kernel)
    dsa_reference                  DSA oracle: explicit mask + dense masked attention
    moe, moe_dispatch              gated MoE layer (router, losses), dropless dispatch
    moe_parallel                   MoE dispatch over a mesh (expert-parallel all-to-all)
    moe_reference                  the article's all-experts loop (MoE oracle)
    transformer, remat, flops      decoder (nn.scan stack), remat policies, FLOP counts
  dsv2_jax/data/       tokenizer, local TFDS corpora, sources (name -> TFDS), grain pipeline
  dsv2_jax/train/      optimizer, state, step (non-finite guard), checkpoint, metrics,
                       moe_stats, evaluate, trainer (train_and_evaluate)
  dsv2_jax/parallel/   model-agnostic: mesh + logical-axis rules (sharding), pipeline
                       schedule, microbatches, multi-process start-up, collective bytes
  dsv2_jax/infer/      KV-cache generation
  dsv2_jax/config.py   the config schema and its validation
  dsv2_jax/info.py     parameter counts;  dsv2_jax/plan.py  per-device memory planner
  dsv2_jax/cli.py      python -m dsv2_jax {train,eval,generate,info,plan}
"""

__version__ = "0.1.0"
