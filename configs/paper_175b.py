"""The article's GMoE at paper scale: 128 experts, top-4, 175B total / 35B active parameters.

The article fixes only E = 128, k = 4, the 2-layer MLP gate and the two totals. This is
one layout consistent with them (GPT-3-175B width, DSA, SwiGLU experts):
  d_model 12288, 96 heads x 128, 45 layers, every FFN an MoE of 128 experts of hidden
  680 (fine-grained), gate hidden 1536, vocabulary 102,400, untied embeddings.
Its total and active parameter counts (and their split into experts, attention,
embeddings and gates) come from abstract shapes, nothing allocated:
  python -m dsv2_jax info --config configs/paper_175b.py
and are recorded in docs/results.md section 4.2 (last paragraph).

Arguments after ':' (combinable): remat=POLICY (model.remat_policy; default layered), e.g.
  python -m dsv2_jax plan --config configs/paper_175b.py:remat=full --mesh fsdp=-1,tensor=8
"""

from dsv2_jax import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(
      arg, remat="layered")  # model.remat_policy (the article's layered, SPEC 2.2).
  c = config_lib.default_config()
  m = c.model
  m.update(vocab_size=102_400, d_model=12_288, num_layers=45, num_heads=96, head_dim=128,
           max_seq_len=4096, attention="dsa", dtype="bfloat16",
           remat_policy=args.remat)  # Memory per policy: docs/results.md 5.3.
  m.moe.update(num_experts=128, top_k=4, gate_hidden=1536, expert_hidden=680)
  c.data.update(seq_len=4096, batch_size=1024)
  c.eval.batch_size = 1024  # Splits over up to 1,024 data-parallel devices.
  return c
