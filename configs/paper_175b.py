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

Stages (SPEC 2.1), `stage=N`:
  1  pretraining on C4 (TFDS catalog `c4/en`), 2,048-token rows, AdamW (b1 0.9, b2 0.95),
     warmup to 5e-5 then linear decay.
  2  long-context adaptation, 2K -> 32K tokens on PG-19 (TFDS `pg19`; Books3 is not in the
     catalog) with whole books as single documents, position interpolation x16 and the
     article's sliding-window attention (window 2,048), 1,000 steps from stage 1:
       python -m dsv2_jax train --config configs/paper_175b.py:stage=2 \
           --init_from gs://bucket/stage1 --workdir gs://bucket/stage2
Both evaluate and sample with the article's sliding window, 2,048 tokens, stride 512
(SPEC 3.3). The figures of docs/results.md 5.3 and 6.4 were measured at 4,096-token rows:
add --config.data.seq_len=4096 to reproduce them.
"""

from dsv2_jax import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(
      arg,
      remat="layered",  # model.remat_policy (the article's layered, SPEC 2.2).
      stage=1,  # 1 pretraining (C4, 2K), 2 long-context adaptation (PG-19, 32K).
  )
  c = config_lib.default_config()
  m = c.model
  m.update(vocab_size=102_400, d_model=12_288, num_layers=45, num_heads=96, head_dim=128,
           max_seq_len=4096, attention="dsa", dtype="bfloat16",
           remat_policy=args.remat)  # Memory per policy: docs/results.md 5.3.
  m.moe.update(num_experts=128, top_k=4, gate_hidden=1536, expert_hidden=680)
  c.data.update(dataset="c4/en", seq_len=2048, batch_size=1024)
  c.eval.update(batch_size=1024,  # Splits over up to 1,024 data-parallel devices.
                window=2048, stride=512)  # The article's sliding-window inference.
  c.sample.update(window=2048, stride=512)
  if args.stage == 2:
    m.update(max_seq_len=32_768, attention="sliding_window", rope_scaling="linear",
             rope_scale=16.0, rope_original_length=2048)
    m.dsa.update(window=2048, block=2048)
    c.data.update(dataset="pg19", text_key="book_text", seq_len=32_768, batch_size=64,
                  packing="document")  # 64 x 32K = the 2M tokens of a stage-1 step.
    c.eval.batch_size = 64
    # The PI paper's recipe: 1,000 steps at 2e-5 after 20 warmup steps, no decay.
    c.train.update(steps=1000, learning_rate=2e-5, warmup_steps=20, end_lr_fraction=1.0)
  elif args.stage != 1:
    raise config_lib.ConfigError(f"config argument stage={args.stage} is not built; "
                                 "choose 1 or 2.")
  return c
