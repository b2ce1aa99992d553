"""Tiny CPU default: a byte-level Transformer on the local Wikipedia excerpt.

  python -m dsv2_jax train --config configs/tiny.py --workdir runs/tiny

Its measured wall time, tokens/s and held-out bits/byte on 2 CPU cores are in
docs/results.md section 1 (with the batch/steps choice behind the defaults).

Every ablation is an argument after ':' (combinable, no new file):
  --config configs/tiny.py:attention=dsa                 # docs/dsa.md
  --config configs/tiny.py:attention=dsa,dsa_score=random,dsa_budget=fixed:4
  --config configs/tiny.py:moe=8x2                       # docs/moe.md: 8 experts, top-2
  --config configs/tiny.py:moe=8x2,lossfree              # bias balancing, no aux loss
  --config configs/tiny.py:remat=layered                 # docs/remat.md
  --config configs/tiny.py:attention=dsa,moe=8x2,remat=layered,steps=100
  --config configs/tiny.py:steps=100,seq_len=256,dataset=web_bible,width=64,layers=2
`--config.a.b=v` flags then change any single field.

Stages (SPEC 2.1; dsv2_jax/train/stages.py, docs/long_context.md). `stage=2` is the
long-context adaptation of a finished stage-1 run: 16x the length (2,048 tokens), YaRN x16
RoPE interpolation, whole Wikipedia articles as single documents, 100 steps (10% of stage 1).
The article's plain position interpolation is `rope=linear:16`; on this byte-level model it
scales every frequency down, blurring the byte order it relies on, and ends 0.7 bits/byte
behind YaRN after the same adaptation (docs/results.md section 8):
  python -m dsv2_jax train --config configs/tiny.py --workdir runs/tiny
  python -m dsv2_jax train --config configs/tiny.py:stage=2 --init_from runs/tiny \
      --workdir runs/tiny_long
Every other argument combines with `stage=2` (e.g. attention=dsa, rope=yarn:16, seq_len=1024).

Stage 3 (docs/rlhf.md): `stage=sft` instruction-tunes a stage-1 run on chat examples
(chatterbot + bible_quotes, loss on responses only, first-fit packed rows of 256 tokens);
`stage=reward` trains a scalar-head reward model on Rotten Tomatoes (fresh, rotten) pairs
(`pooling=mean|last`); `stage=ppo` / `stage=dpo` optimise a policy (--init_from) against a
reward model (--reward_from):
  python -m dsv2_jax train --config configs/tiny.py:stage=sft --init_from runs/tiny --workdir runs/sft
  python -m dsv2_jax train --config configs/tiny.py:layers=2 --workdir runs/tiny_small
  python -m dsv2_jax train --config configs/tiny.py:stage=reward,layers=2 \
      --init_from runs/tiny_small --workdir runs/reward
  python -m dsv2_jax train --config configs/tiny.py:stage=ppo --init_from runs/sft \
      --reward_from runs/reward --workdir runs/ppo

Quantization (docs/quantization.md): `stage=qat` fine-tunes a finished run under INT8
rounding (FFN / experts in 4x4 blocks, attention FP16, the rounding penalty 0.1 -> 0.01),
then `quantize` stores the INT8 weights that eval and generate read:
  python -m dsv2_jax train --config configs/tiny.py:stage=qat --init_from runs/tiny \
      --workdir runs/tiny_qat
  python -m dsv2_jax quantize --workdir runs/tiny_qat --out runs/tiny_int8
`quant=`, `block=` and `penalty=` change the rules (e.g. block=channel, penalty=0).
"""

from dsv2_jax import config as config_lib
from dsv2_jax.quant import rules as quant_rules

GATE_HIDDEN = 64  # Hidden width of the MoE gate of `moe=ExK` (2-layer MLP).


def parse_moe(text: str) -> tuple[int, int]:
  """'8x2' -> (8 experts, top-2); '', '0' or 'none' -> (0, 0): a dense FFN."""
  if text in ("", "0", "none"):
    return 0, 0
  experts, sep, top_k = text.partition("x")
  if not (sep and experts.isdigit() and top_k.isdigit()):
    raise config_lib.ConfigError(f"config argument moe={text!r} must be EXPERTSxTOP_K, "
                                 "e.g. moe=8x2 (or moe=0 for a dense FFN).")
  return int(experts), int(top_k)


def parse_budget(text: str) -> tuple[str, float]:
  """'fraction:0.15' -> ('fraction', 0.15): model.dsa.budget and budget_value."""
  kind, sep, value = text.partition(":")
  try:
    if sep:
      return kind, float(value)
  except ValueError:
    pass
  raise config_lib.ConfigError(f"config argument dsa_budget={text!r} must be KIND:VALUE, "
                               "e.g. fraction:0.15, log:2 or fixed:4.")


def parse_rope(text: str) -> tuple[str, float]:
  """'linear:16' -> ('linear', 16.0): model.rope_scaling and rope_scale; 'none' -> 1."""
  kind, _, factor = text.partition(":")
  try:
    return kind, float(factor) if factor else 1.0
  except ValueError:
    raise config_lib.ConfigError(f"config argument rope={text!r} must be KIND:FACTOR, e.g. "
                                 "linear:16, ntk:16, yarn:16 or none.") from None


STAGE1_SEQ_LEN = 128  # Stage 1's training length; stage 2 extends it (rope_original_length).
# Per-stage defaults of the arguments left at 0 / '' (steps, seq_len, batch_size, rope,
# packing). Stage 2 keeps the tokens per step modest: 4 rows of 2,048 tokens.
STAGES = {
    "1": dict(steps=1000, seq_len=STAGE1_SEQ_LEN, batch_size=16, rope="none", packing="concat"),
    "2": dict(steps=100, seq_len=16 * STAGE1_SEQ_LEN, batch_size=4, rope="yarn:16",
              packing="document"),
    # Stage 3 (docs/rlhf.md): instruction tuning on chat examples, rows of 256 tokens
    # first-fit packed; the reward model on (fresh, rotten) review pairs, one per row.
    "sft": dict(steps=300, seq_len=256, batch_size=16, rope="none", packing="first_fit",
                dataset="chatterbot+bible_quotes"),
    "reward": dict(steps=300, seq_len=256, batch_size=16, rope="none", packing="none",
                   dataset="rotten_tomatoes"),
    # PPO / DPO (--init_from POLICY --reward_from REWARD_MODEL): one step = one batch of
    # 32 prompts of 16 tokens (Rotten Tomatoes openings), responses of 32 tokens.
    "ppo": dict(steps=300, seq_len=128, batch_size=32, rope="none", packing="concat",
                dataset="rotten_tomatoes"),
    "dpo": dict(steps=300, seq_len=128, batch_size=32, rope="none", packing="concat",
                dataset="rotten_tomatoes"),
    # Quantization-aware training of a finished run (--init_from), on stage 1's data.
    "qat": dict(steps=200, seq_len=STAGE1_SEQ_LEN, batch_size=16, rope="none",
                packing="concat"),
}


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(
      arg,
      # Training stage (SPEC 2.1): 1 pretraining, 2 long-context adaptation, sft
      # instruction tuning, reward the reward model (the last two start from a stage-1 run).
      stage="1",
      steps=0,  # Optimizer steps (train.steps); 0 = the stage's default.
      seq_len=0,  # Tokens per training row T (data.seq_len); 0 = the stage's default.
      batch_size=0,  # Rows per optimizer step B (data.batch_size); 0 = the stage's default.
      rope="",  # KIND:FACTOR: model.rope_scaling and rope_scale ('' = the stage's default).
      packing="",  # data.packing: concat | document ('' = the stage's default).
      passkey=0.0,  # data.passkey_fraction: rows turned into pass-key retrieval rows.
      passkey_weight=1.0,  # data.passkey_answer_weight: loss weight of their answer tokens.
      # data.score_pooling of the reward stage: mean (default) or last (docs/rlhf.md).
      pooling="mean",
      dataset="",  # data.dataset: a local builder or a TFDS catalog name ('' = the stage's).
      width=128,  # Residual width D; 4 heads of D/4, SwiGLU FFN of 4D.
      layers=4,  # Decoder blocks L.
      attention="dense",  # model.attention: dense | sliding_window | dsa.
      dsa_score="entropy",  # model.dsa.score: entropy | low_entropy | key_norm | random.
      # Global tokens per query block, KIND:VALUE: fraction:p of the prefix, log:c for
      # c*log2(prefix), fixed:n tokens (model.dsa.budget, budget_value).
      dsa_budget="fraction:0.15",
      dsa_window=32,  # Local window W in tokens; the query block P is the same.
      # ExK: E routed experts, top-k, each of hidden 4D/k, so the active FFN parameters
      # equal the dense FFN's (the dense-vs-MoE comparison); '' = dense FFN.
      moe="",
      lossfree=False,  # MoE balanced by DeepSeek-V3's bias (rate 1e-3) instead of the aux loss.
      remat="none",  # model.remat_policy; any policy but none also rolls the scan (unroll 1).
      # quant.rules (docs/quantization.md), MODULE=FORMAT joined by '+' (',' separates
      # arguments), e.g. quant=ffn=int8+attention=fp16; '' = none, except stage=qat's
      # default (the article's advice: FFN / experts INT8, attention FP16).
      quant="",  # 'none': no quantization, stage=qat included (its float control).
      block="4x4",  # quant.block: RxC, channel or tensor.
      engine="ours",  # quant.engine: ours | qwix (the library's QAT, channel / Kx1 only).
      penalty=0.1,  # quant.penalty_start (decays to a tenth of it); 0 = no penalty.
  )
  if args.stage not in STAGES:
    raise config_lib.ConfigError(f"config argument stage={args.stage} is not built; choose "
                                 f"one of {list(STAGES)}.")
  for key, value in {"dataset": "wiki_excerpt", **STAGES[args.stage]}.items():
    if not args[key]:
      args[key] = value
  rope, rope_scale = parse_rope(args.rope)
  c = config_lib.default_config()
  c.model.update(
      d_model=args.width,
      num_layers=args.layers,
      num_heads=4,
      ffn_hidden=4 * args.width,
      max_seq_len=max(1024, args.seq_len),  # Room to sample past the training length.
      # A fully unrolled scan keeps the stacked parameters but lets XLA:CPU fuse across
      # layers: faster steps on CPU (docs/results.md section 2). Accelerators may prefer 1,
      # and remat needs 1 (section 5.2): the remat argument sets it.
      scan_unroll=4 if args.remat == "none" else 1,
      attention=args.attention,
      remat_policy=args.remat,
      rope_scaling=rope,
      rope_scale=rope_scale,
      rope_original_length=STAGE1_SEQ_LEN,
  )
  budget, budget_value = parse_budget(args.dsa_budget)
  c.model.dsa.update(window=args.dsa_window, block=args.dsa_window, score=args.dsa_score,
                     budget=budget, budget_value=budget_value)
  experts, top_k = parse_moe(args.moe)
  if experts:
    c.model.moe.update(num_experts=experts, top_k=top_k, gate_hidden=GATE_HIDDEN,
                       expert_hidden=c.model.ffn_hidden // top_k)
  if args.lossfree:
    c.model.moe.update(aux_loss_weight=0.0, balance_bias_rate=1e-3)
  c.data.update(dataset=args.dataset, seq_len=args.seq_len, batch_size=args.batch_size,
                packing=args.packing, passkey_fraction=args.passkey,
                passkey_answer_weight=args.passkey_weight)
  c.train.update(
      steps=args.steps,
      # The article's 5e-5 peak is for a 175B model; a 1M-parameter model trains far
      # faster at a 60x larger peak. Under this budget, more small steps beat fewer large
      # ones at the same tokens (docs/results.md section 1).
      learning_rate=3e-3,
      warmup_steps=min(100, args.steps),
      end_lr_fraction=0.1,
      log_every=50,
      eval_every=250,
      checkpoint_every=250,
  )
  c.eval.update(batch_size=32, max_batches=8)  # Periodic evals: 32k tokens; final: all.
  if args.stage in ("sft", "reward"):
    # Fine-tuning a pretrained trunk: a lower peak, evals on the whole held-out split.
    c.train.update(learning_rate=1e-3, warmup_steps=min(20, args.steps), eval_every=100,
                   checkpoint_every=100)
    c.data.update(format="chat" if args.stage == "sft" else "preference")
    c.data.score_pooling = args.pooling
    c.model.head = "scalar" if args.stage == "reward" else "lm"
    c.eval.update(batch_size=32, max_batches=0)
    c.sample.update(prompt="Repeat exactly: \"The earth was formless and empty.\"")
  if args.stage in ("ppo", "dpo"):
    # The policy's model section is taken from --init_from; data only names the prompts.
    c.data.update(format="text")
    c.rlhf.update(algorithm=args.stage, batch_size=args.batch_size)
    c.train.update(learning_rate=1e-4, warmup_steps=0, log_every=1, eval_every=10,
                   checkpoint_every=10)
  quant = args.quant.replace("+", ",")
  if args.stage == "qat" and not quant:
    quant = quant_rules.default_rules(c.model)
  quant = "" if quant == "none" else quant
  if args.stage == "qat":
    # Fine-tuning a pretrained model under rounding, as stage 2: a lower peak.
    c.train.update(learning_rate=1e-3, warmup_steps=min(10, args.steps), eval_every=50,
                   checkpoint_every=50, log_every=10)
  c.quant.update(rules=quant, block=args.block, penalty_start=args.penalty,
                 penalty_end=args.penalty / 10, engine=args.engine)
  if args.stage == "2":
    # Adaptation, not pretraining: a 3x lower peak after a short warmup (the PI paper
    # fine-tunes at ~1/10 of the pretraining rate), and evals of 64k tokens.
    c.train.update(learning_rate=1e-3, warmup_steps=min(10, args.steps), eval_every=50,
                   checkpoint_every=50, log_every=10)
    c.eval.update(batch_size=4, max_batches=8)
  return c
