"""The one config schema: every field with its meaning and unit, plus validation.

Config files under `configs/` start from `default_config()` and change only what
differs, so a fresh reader finds every knob here, once. `validate()` runs once at
start-up and raises `ConfigError` naming the field and the fix.

Launch examples:
  python -m dsv2_jax train --config configs/tiny.py --workdir /tmp/tiny
  python -m dsv2_jax train --config configs/tiny.py:steps=50 --config.model.num_layers=2
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any

import ml_collections

from dsv2_jax.data import pipeline, sources, tokenizer
from dsv2_jax.model import attention, ffn, layers, moe_dispatch, remat, rope, transformer
from dsv2_jax.model import dsa as dsa_lib
from dsv2_jax.model import moe as moe_lib

# The choices of a field are owned by the module that implements them.
# Local TFDS builders (`dsv2_jax.data.sources.LOCAL_BUILDERS`); any other name is treated
# as a TFDS catalog name ("c4/en", "pg19", ...) that must be prepared in data_dir.
LOCAL_DATASETS = tuple(sources.LOCAL_BUILDERS)
DTYPES = tuple(layers.DTYPES)
ACTIVATIONS = tuple(ffn.ACTIVATIONS)
NORMS = layers.NORMS
POSITIONS = transformer.POSITIONS
HEADS = transformer.HEADS
ROPE_SCALINGS = rope.ROPE_SCALINGS
YARN_RAMPS = rope.YARN_RAMPS
ROUTERS = moe_lib.ROUTERS
ATTENTIONS = attention.ATTENTIONS
MOE_DISPATCH = moe_dispatch.DISPATCH_PATHS
TOKENIZERS = tokenizer.TOKENIZERS


class ConfigError(ValueError):
  """A config field holds a value we cannot run with; the message names the fix."""


def default_config() -> ml_collections.ConfigDict:
  """Returns the full config with the article's stage-1 settings as defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, dropout and data shuffling.

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 258  # Embedding rows; >= the tokenizer's vocabulary (bytes: 256 + 2).
  m.d_model = 1024  # Residual stream width D.
  m.num_layers = 8  # Decoder blocks L (stacked with nn.scan).
  m.num_heads = 16  # Query heads N; must divide d_model unless head_dim is set.
  m.num_kv_heads = 0  # Key/value heads K (GQA); 0 means = num_heads.
  m.head_dim = 0  # Per-head width H; 0 means d_model // num_heads.
  m.ffn_hidden = 4096  # FFN hidden width F.
  m.activation = "swiglu"  # One of ACTIVATIONS; gated ones use two input matrices.
  m.norm = "rmsnorm"  # One of NORMS; pre-norm everywhere.
  m.norm_eps = 1e-6
  m.position = "rope"  # One of POSITIONS.
  m.rope_max_wavelength = 10_000.0
  # RoPE context extension (stage 2, docs/long_context.md): one of ROPE_SCALINGS.
  #   none    plain RoPE (rope_scale must be 1);
  #   linear  position interpolation (Chen et al. 2023): positions / rope_scale;
  #   ntk     NTK-aware: base rope_max_wavelength * rope_scale^(H / (H - 2));
  #   yarn    YaRN (Peng et al. 2023): per-frequency blend of the two, plus attention
  #           temperature (0.1 ln rope_scale + 1)^2 on the logits.
  m.rope_scaling = "none"
  m.rope_scale = 1.0  # s: the context is extended s-fold over rope_original_length.
  m.rope_original_length = 0  # Pretrained context length in tokens (yarn; 0 = unset).
  m.yarn_beta_fast = 32.0  # YaRN: frequencies with > beta_fast turns in the original
  m.yarn_beta_slow = 1.0  # length extrapolate; < beta_slow turns interpolate.
  m.yarn_ramp = "turns"  # One of YARN_RAMPS: turns (the paper's) | dims (DeepSeek-V2, HF).
  # YaRN temperature m(s, c) = 0.1 c ln s + 1: q and k scale by m(s, yarn_mscale) /
  # m(s, yarn_mscale_all_dim), the logits by m(s, yarn_mscale_all_dim)^2 (DeepSeek-V2:
  # 0.707 and 0.707). The defaults give the paper's (0.1 ln s + 1)^2 on the logits.
  m.yarn_mscale = 1.0
  m.yarn_mscale_all_dim = 0.0
  m.max_seq_len = 2048  # Position limit in tokens (learned table size; decode cache cap).
  m.tie_embeddings = False  # Share the input embedding with the output head.
  # One of HEADS: 'lm' (next-token logits) or 'scalar' (a reward model's score; trained on
  # data.format='preference' pairs with the Bradley-Terry loss, docs/rlhf.md).
  m.head = "lm"
  m.dropout_rate = 0.0  # Residual dropout probability.
  m.attention = "dense"  # One of ATTENTIONS; 'sliding_window' is DSA with budget 0.
  # Dynamic sparse attention (docs/dsa.md): local window + score-selected global tokens.
  m.dsa = ml_collections.ConfigDict()
  m.dsa.window = 32  # W: each query attends its W most recent tokens (article: k = 32).
  m.dsa.block = 32  # P: queries sharing one global selection; must be <= window + 1.
  m.dsa.budget = "fraction"  # Global tokens per block: fraction | log | fixed.
  m.dsa.budget_value = 0.15  # fraction: p of the length so far (article: 15%);
  #                            log: c in c*log2(length); fixed: the count.
  m.dsa.score = "entropy"  # Importance score: one of dsv2_jax.model.dsa.SCORES.
  m.dsa.seed = 0  # Seed of the 'random' score.
  # Gated mixture-of-experts (SPEC 1.2; dsv2_jax/model/moe.py). num_experts = 0: dense FFN.
  m.moe = ml_collections.ConfigDict()
  m.moe.num_experts = 0  # E routed experts (article: 128); 0 disables MoE.
  m.moe.top_k = 4  # Experts per token (article: 4).
  m.moe.gate_hidden = 256  # Hidden width of the 2-layer MLP gate.
  m.moe.gate_activation = "gelu"  # One of ACTIVATIONS without 'glu' (the gate's hidden layer).
  m.moe.expert_hidden = 1024  # Hidden width of each routed (and shared) expert.
  m.moe.num_shared_experts = 0  # DeepSeekMoE always-on experts (one FFN of n x expert_hidden).
  m.moe.every_n_layers = 1  # Every n-th block is MoE (the last of each group of n).
  m.moe.first_dense_layers = 0  # Leading blocks kept dense (DeepSeek-V2: 1).
  m.moe.renormalize = False  # Rescale the top-k probs to sum to 1 (the article uses them raw).
  m.moe.capacity_factor = 0.0  # > 0: per-expert capacity factor x X k / E, overflow dropped.
  m.moe.aux_loss_weight = 0.01  # Switch/GShard load-balancing loss weight.
  m.moe.z_loss_weight = 0.001  # Router z-loss weight.
  m.moe.balance_bias_rate = 0.0  # > 0: loss-free balancing bias step (DeepSeek-V3: 0.001).
  m.moe.dispatch = "auto"  # auto | tiled | ragged_dot (auto: tiled on CPU, else ragged_dot).
  m.moe.tile_rows = 0  # Padding unit of the tiled dispatch; 0 picks from tokens and E.
  m.moe.max_tile_rows = 128  # Largest tile; tiles halve from it down to tile_rows.
  # One of ROUTERS: 'mlp' is the article's 2-layer MLP gate (gate_hidden wide); 'linear'
  # is DeepSeekMoE's one [D, E] matrix (DeepSeek-V2, docs/deepseek_v2.md).
  m.moe.router = "mlp"
  # Group-limited routing (DeepSeek-V2's device-limited routing): the E experts form
  # n_group groups; a token picks its topk_group best groups (by their best expert) and
  # its top_k experts among those. n_group = topk_group = 1: no limit.
  m.moe.n_group = 1
  m.moe.topk_group = 1
  m.moe.routed_scaling_factor = 1.0  # Multiplies the routed experts' weights (V2: 16).
  # Multi-head Latent Attention (DeepSeek-V2 sec. 2.1; dsv2_jax/model/mla.py) replaces the
  # q/k/v projections when kv_lora_rank > 0; the attention kernel is still model.attention.
  m.mla = ml_collections.ConfigDict()
  m.mla.kv_lora_rank = 0  # d_c: the joint KV latent, what decoding caches; 0 = MHA/GQA.
  m.mla.q_lora_rank = 0  # d_c': low-rank queries through a latent this wide; 0 = full rank.
  m.mla.qk_nope_head_dim = 128  # d_h: per-head query/key width without RoPE.
  m.mla.qk_rope_head_dim = 64  # d_h^R: decoupled RoPE width; one RoPE key for all heads.
  m.mla.v_head_dim = 128  # Per-head value width.
  m.remat_policy = "none"  # none | full | dots | layered | offload | custom (model/remat.py).
  m.remat_names = ""  # remat_policy=custom: comma-separated activations to keep, e.g. "query,key".
  m.scan_layers = True  # nn.scan over layers (fast compile; remat shows in memory).
  # Layers per scan iteration (>= num_layers: no loop); trades compile time. On CPU a fully
  # unrolled scan lets XLA hoist the remat recompute: keep 1 when memory matters.
  m.scan_unroll = 1
  # Microbatches Y of the pipeline schedule when mesh.stage = Z > 1 (bubble (Z-1)/(Y+Z-1));
  # 0 picks the largest divisor of each data shard's rows up to 4 x stages.
  m.pipeline_microbatches = 0
  # Compute dtype of activations and matmuls. "bfloat16" (with param_dtype float32) is mixed
  # precision: bf16 x bf16 -> f32 matmuls in both passes, f32 master weights
  # (dsv2_jax/model/mixed_precision.py; AMX where the CPU has it, results 11.5).
  m.dtype = "float32"
  m.param_dtype = "float32"  # Storage dtype of parameters and optimizer state.
  m.init_std = 0.02  # Std of the embedding init (projections use fan-in scaling).

  d = c.data = ml_collections.ConfigDict()
  # Local builder (LOCAL_DATASETS) or a TFDS catalog name; 'a+b' joins the examples of
  # several (e.g. the SFT mixture 'chatterbot+bible_quotes').
  d.dataset = "wiki_excerpt"
  d.data_dir = "~/tensorflow_datasets"  # TFDS data dir (passed explicitly, never env).
  d.text_key = "text"  # Feature holding the document text (pg19: "book_text").
  # What an example is (one of pipeline.FORMATS):
  #   text        documents for language modelling (pretraining, long context);
  #   chat        prompt/response pairs in the chat template, loss on responses only (SFT);
  #   preference  texts with a 0/1 label: (label 1, label 0) pairs for a reward model.
  d.format = "text"
  d.prompt_key = "prompt"  # format=chat: the user turn's feature.
  d.response_key = "response"  # format=chat: the assistant turn's feature.
  d.label_key = "label"  # format=preference: 1 = preferred (e.g. fresh review), 0 = not.
  # format=preference: how a text's reward is read from the per-token scores of the
  # scalar head: 'last' at the <eos> closing it (InstructGPT), 'mean' their mean over the
  # text and its <eos> (every token's score gets gradient directly).
  d.score_pooling = "last"
  d.train_split = "train"
  d.eval_split = "validation"
  d.seq_len = 2048  # Tokens per training row T.
  # concat: documents joined and cut into rows (GPT-style); document: every row from one
  # document (long-context stage: whole books and articles), the tail row padded.
  # format=chat: first_fit packs whole examples into rows (attention stays within each
  # example; dense attention), none gives each example its own padded row.
  d.packing = "concat"
  # Fraction of training rows turned into pass-key retrieval rows over their own text
  # (dsv2_jax/data/passkey.py): the synthetic long-context skill, next to real text.
  d.passkey_fraction = 0.0
  # Loss weight of a pass-key row's answer tokens (5 of T): > 1 makes the rare retrieval
  # signal count next to the text around it.
  d.passkey_answer_weight = 1.0
  d.batch_size = 32  # Rows per optimizer step B (global, over all devices).
  d.tokenizer = "byte"  # One of TOKENIZERS.
  d.tokenizer_model = ""  # Path of a local SentencePiece model (tokenizer="sentencepiece").
  # Allow TFDS to download and prepare a catalog dataset. Off by default so that a
  # missing dataset fails at once instead of retrying cloud storage for minutes.
  d.download = False

  t = c.train = ml_collections.ConfigDict()
  t.steps = 100_000  # Optimizer steps.
  t.learning_rate = 5e-5  # Peak LR after warmup (article stage 1: 5e-5).
  t.warmup_steps = 2000  # Linear warmup from 0 to learning_rate.
  t.end_lr_fraction = 0.0  # LR at the last step, as a fraction of the peak (linear decay).
  t.b1 = 0.9  # AdamW beta1 (article).
  t.b2 = 0.95  # AdamW beta2 (article).
  t.eps = 1e-8
  t.weight_decay = 0.1  # Decoupled; applied to matrices only, not norms or biases.
  t.grad_clip_norm = 1.0  # Global-norm clipping threshold; 0 disables.
  # Microbatches per optimizer step (article: 8); data.batch_size is the whole step's rows.
  t.grad_accum_steps = 1
  t.log_every = 50  # Steps between metric lines (host syncs only then).
  t.eval_every = 1000  # Steps between held-out evaluations; 0 = only at the end.
  t.checkpoint_every = 1000  # Steps between checkpoints; the last step is always saved.
  t.max_checkpoints = 3  # Checkpoints kept on disk.
  t.async_checkpointing = True  # Write checkpoints in the background.
  # Consecutive steps with a non-finite loss or gradient (each one skipped, not applied)
  # after which the run stops with exit status 2; its checkpoints stay finite.
  t.max_skipped_steps = 10
  # Start from another run's final parameters (not its optimizer state, step or data
  # position): the workdir of a previous stage. Shapes must match; the mesh may differ.
  t.init_from = ""

  e = c.eval = ml_collections.ConfigDict()
  e.batch_size = 32  # Rows per eval batch.
  e.max_batches = 0  # Cap on batches of the periodic evals; the final eval reads it all.
  # Cap on the final eval's batches; 0 = the whole split (every reported figure). Smoke
  # runs (the notebooks under CI) set it; eval.json then says how many tokens it read.
  e.final_max_batches = 0
  # Sliding-window scoring of `eval --text` / `eval --window` (SPEC 3.3: 2048 / 512): each
  # token is scored once, with >= window - stride tokens of context (except at the start).
  e.window = 0  # Tokens per window; 0 = data.seq_len.
  e.stride = 0  # Tokens scored per window; 0 = window (non-overlapping windows).

  s = c.sample = ml_collections.ConfigDict()
  s.prompt = "The "  # Prompt for the sample printed after training.
  s.max_new_tokens = 200
  s.temperature = 0.8  # 0 = greedy.
  s.top_k = 40  # Sample among the k most likely tokens; 0 = all.
  s.top_p = 1.0  # Nucleus: sample among the most likely tokens holding p of the mass; 1 = all.
  # Rolling-window generation past the window: the model sees at most `window` tokens;
  # when full, the window slides forward by `stride` and is recomputed from its tokens.
  s.window = 0  # 0 = model.max_seq_len.
  s.stride = 0  # 0 = window // 4.

  r = c.rag = ml_collections.ConfigDict()  # Retrieval-augmented eval/generate (--rag).
  r.passage_tokens = 128  # Tokens per indexed passage (chunks of each document).
  r.top_k = 3  # Passages put ahead of the query, most relevant first.
  r.query_tokens = 64  # eval --rag: the last tokens before each scored span form the query.

  # Preference optimisation of a language model (stage 3, docs/rlhf.md): `train` runs
  # PPO or DPO instead of supervised training when `rlhf.algorithm` is set. The policy
  # starts from train.init_from (an SFT or stage-1 run; also the frozen reference), the
  # reward is the scalar-head run at rlhf.reward_from. One step = one rollout batch.
  h = c.rlhf = ml_collections.ConfigDict()
  h.algorithm = "none"  # One of RLHF_ALGORITHMS: none | ppo | dpo.
  h.reward_from = ""  # Workdir of a reward model (model.head='scalar') run.
  h.prompt_dataset = "rotten_tomatoes"  # Prompts: openings of this dataset's texts.
  h.prompt_key = "text"
  h.prompt_tokens = 16  # Each prompt is the first prompt_tokens tokens of a text.
  h.response_tokens = 32  # Tokens sampled per response (it ends early at end-of-document).
  h.batch_size = 32  # Prompts per rollout (PPO) or preference pairs per step (DPO).
  h.temperature = 1.0  # Rollout sampling (temperature / top_k / top_p as in `sample`).
  h.top_k = 0
  h.top_p = 1.0
  h.value = "separate"  # PPO value function: separate (a copy of the reward model's
  #                       trunk, as InstructGPT) or shared (a head on the policy trunk).
  h.epochs = 4  # PPO epochs over each rollout batch.
  h.minibatches = 4  # Minibatches per epoch.
  h.gamma = 1.0  # GAE discount.
  h.lam = 0.95  # GAE lambda.
  h.clip_ratio = 0.2  # PPO policy ratio clip.
  h.clip_value = 0.2  # PPO value clip.
  h.value_coef = 0.1  # Weight of the value loss.
  h.kl_coef = 0.1  # Initial per-token KL penalty beta.
  h.kl_target = 6.0  # Adaptive controller's target KL per response (nats); 0 = fixed beta.
  h.kl_horizon = 10_000  # Controller horizon (responses).
  h.dpo_beta = 0.1  # DPO's KL strength.
  h.eval_prompts = 128  # Held-out prompts (eval split openings) per evaluation.

  # Quantization (docs/quantization.md). With `quant.rules` set, training is QAT (the
  # forward pass sees the rounded weights) and `quantize` exports that layout.
  q = c.quant = ml_collections.ConfigDict()
  q.rules = ""  # MODULE=FORMAT,... e.g. 'ffn=int8,experts=int8,attention=fp16'; '' = off.
  q.block = "4x4"  # One INT8 scale per block: RxC (contracted x output), channel, tensor.
  q.penalty_start = 0.1  # lambda of the rounding penalty sum ||Round(W) - W||^2 decays
  q.penalty_end = 0.01  # exponentially from penalty_start to penalty_end; 0 = none.
  q.engine = "ours"  # QAT by: ours (any block, the penalty) | qwix (channel / Kx1 tiles).
  q.exported = False  # Set by `quantize` in the workdir it writes (INT8 weights stored).
  q.int8_dot = False  # Exported INT8 weights: INT8 x INT8 -> INT32 dots (else weight-only).

  # Mesh axis sizes; -1 takes the remaining devices. Model code never names these.
  c.mesh = ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, tensor=1, expert=1, stage=1))
  return c


def from_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file such as configs/tiny.py (not validated)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `configs/x.py:a=1,b=foo,flag` into typed values (big_vision style).

  A bare key means True; values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is unknown; known: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes", "y")
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


def head_dim(model: ml_collections.ConfigDict) -> int:
  return model.head_dim or model.d_model // model.num_heads


def num_kv_heads(model: ml_collections.ConfigDict) -> int:
  return model.num_kv_heads or model.num_heads


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def _check_choice(value: str, field: str, choices: tuple[str, ...]) -> None:
  _check(value in choices, f"{field}={value!r} is not supported; choose one of {list(choices)}.")


def _check_positive(config: ml_collections.ConfigDict, *fields: str) -> None:
  for field in fields:
    value = config
    for part in field.split("."):
      value = value[part]
    _check(isinstance(value, int) and value > 0,
           f"{field}={value!r} must be a positive integer.")


def _validate_dsa(dsa: ml_collections.ConfigDict) -> None:
  _check(isinstance(dsa.window, int) and dsa.window >= 1,
         f"model.dsa.window={dsa.window!r} must be a positive integer.")
  _check(isinstance(dsa.block, int) and 1 <= dsa.block <= dsa.window + 1,
         f"model.dsa.block={dsa.block!r} must be in [1, model.dsa.window + 1 = "
         f"{dsa.window + 1}]: a block's global selection may only read positions before "
         "the block, and its window must reach back over the block; lower model.dsa.block.")
  _check_choice(dsa.budget, "model.dsa.budget", dsa_lib.BUDGETS)
  _check_choice(dsa.score, "model.dsa.score", dsa_lib.SCORES)
  _check(dsa.budget_value >= 0, f"model.dsa.budget_value={dsa.budget_value} must be >= 0.")
  if dsa.budget == "fraction":
    _check(dsa.budget_value <= 1, f"model.dsa.budget_value={dsa.budget_value} is a fraction "
           "for model.dsa.budget='fraction': use a value in [0, 1].")


def _validate_moe(m: ml_collections.ConfigDict) -> None:
  moe = m.moe
  _check(isinstance(moe.num_experts, int) and moe.num_experts >= 0,
         f"model.moe.num_experts={moe.num_experts!r} must be an integer >= 0 (0 = dense FFN).")
  if not moe.num_experts:
    return
  _check(isinstance(moe.top_k, int) and 1 <= moe.top_k <= moe.num_experts,
         f"model.moe.top_k={moe.top_k!r} must be in [1, model.moe.num_experts="
         f"{moe.num_experts}].")
  for field in ("gate_hidden", "expert_hidden", "every_n_layers"):
    _check(isinstance(moe[field], int) and moe[field] >= 1,
           f"model.moe.{field}={moe[field]!r} must be a positive integer.")
  _check(moe.gate_activation in ACTIVATIONS and not moe.gate_activation.endswith("glu"),
         f"model.moe.gate_activation={moe.gate_activation!r} must be one of "
         f"{[a for a in ACTIVATIONS if not a.endswith('glu')]}.")
  moe_layers = m.num_layers - moe.first_dense_layers
  _check(0 <= moe.first_dense_layers < m.num_layers,
         f"model.moe.first_dense_layers={moe.first_dense_layers} must be in "
         f"[0, model.num_layers={m.num_layers}).")
  _check(moe_layers % moe.every_n_layers == 0,
         f"model.moe.every_n_layers={moe.every_n_layers} must divide the "
         f"{moe_layers} layers after model.moe.first_dense_layers={moe.first_dense_layers}: "
         "change one of model.num_layers, model.moe.every_n_layers, "
         "model.moe.first_dense_layers.")
  _check(moe.num_shared_experts >= 0, "model.moe.num_shared_experts must be >= 0.")
  for field in ("capacity_factor", "aux_loss_weight", "z_loss_weight", "balance_bias_rate"):
    _check(moe[field] >= 0, f"model.moe.{field}={moe[field]} must be >= 0.")
  _check_choice(moe.dispatch, "model.moe.dispatch", MOE_DISPATCH)
  _check(moe.tile_rows >= 0, f"model.moe.tile_rows={moe.tile_rows} must be >= 0 (0 = auto).")
  _check(moe.max_tile_rows >= 0, f"model.moe.max_tile_rows={moe.max_tile_rows} must be >= 0 "
         "(0 or <= tile_rows: one tile size).")
  _check_choice(moe.router, "model.moe.router", ROUTERS)
  _check(isinstance(moe.n_group, int) and moe.n_group >= 1
         and moe.num_experts % moe.n_group == 0,
         f"model.moe.n_group={moe.n_group!r} must be a positive divisor of "
         f"model.moe.num_experts={moe.num_experts} (1 = no group limit).")
  _check(isinstance(moe.topk_group, int) and 1 <= moe.topk_group <= moe.n_group,
         f"model.moe.topk_group={moe.topk_group!r} must be in [1, model.moe.n_group="
         f"{moe.n_group}].")
  group = moe.num_experts // moe.n_group
  _check(moe.top_k <= moe.topk_group * group,
         f"model.moe.top_k={moe.top_k} is more than the {moe.topk_group * group} experts "
         f"in model.moe.topk_group={moe.topk_group} groups of {group}: raise topk_group.")
  _check(moe.routed_scaling_factor > 0, f"model.moe.routed_scaling_factor="
         f"{moe.routed_scaling_factor} must be > 0.")


def _validate_mla(config: ml_collections.ConfigDict) -> None:
  m = config.model
  mla = m.mla
  for field in ("kv_lora_rank", "q_lora_rank"):
    _check(isinstance(mla[field], int) and mla[field] >= 0,
           f"model.mla.{field}={mla[field]!r} must be an integer >= 0 (0 = off).")
  if not mla.kv_lora_rank:
    _check(not mla.q_lora_rank, f"model.mla.q_lora_rank={mla.q_lora_rank} belongs to "
           "Multi-head Latent Attention: set model.mla.kv_lora_rank > 0 too, or 0 here.")
    return
  for field in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    _check(isinstance(mla[field], int) and mla[field] >= 1,
           f"model.mla.{field}={mla[field]!r} must be a positive integer.")
  _check(mla.qk_rope_head_dim % 2 == 0, f"model.mla.qk_rope_head_dim="
         f"{mla.qk_rope_head_dim} must be even (RoPE rotates pairs).")
  _check(m.position == "rope", f"model.position={m.position!r}: Multi-head Latent Attention "
         "rotates its decoupled key with RoPE; set model.position='rope'.")
  _check(not m.num_kv_heads, f"model.num_kv_heads={m.num_kv_heads}: Multi-head Latent "
         "Attention has one latent for all heads (no GQA); set model.num_kv_heads=0.")
  _check(m.attention == "dense" or not config.sample.max_new_tokens, f"model.attention="
         f"{m.attention!r} with Multi-head Latent Attention trains and evaluates, but decoding "
         "it is built for dense attention only: set sample.max_new_tokens=0 (no sample "
         "after training) or model.attention='dense'.")
  _check(not m.head_dim, f"model.head_dim={m.head_dim}: with Multi-head Latent Attention "
         "the head widths are model.mla.qk_nope_head_dim / qk_rope_head_dim / v_head_dim; "
         "set model.head_dim=0.")


def _validate_remat(m: ml_collections.ConfigDict) -> None:
  _check_choice(m.remat_policy, "model.remat_policy", remat.POLICIES)
  try:
    remat.policy(m.remat_policy, m.remat_names)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _validate_rope(m: ml_collections.ConfigDict) -> None:
  _check_choice(m.rope_scaling, "model.rope_scaling", ROPE_SCALINGS)
  _check(m.rope_scale >= 1.0 and math.isfinite(m.rope_scale),
         f"model.rope_scale={m.rope_scale} must be >= 1 (the context extension factor).")
  if m.rope_scaling == "none":
    _check(m.rope_scale == 1.0, f"model.rope_scale={m.rope_scale} has no effect with "
           "model.rope_scaling='none': choose model.rope_scaling=linear, ntk or yarn.")
  if m.rope_scaling == "yarn":
    _check(isinstance(m.rope_original_length, int) and m.rope_original_length > 0,
           f"model.rope_original_length={m.rope_original_length!r}: YaRN needs the "
           "pretrained context length in tokens (e.g. the first stage's data.seq_len).")
    _check(m.yarn_beta_fast > m.yarn_beta_slow > 0,
           f"model.yarn_beta_fast={m.yarn_beta_fast} must exceed model.yarn_beta_slow="
           f"{m.yarn_beta_slow} > 0.")
    _check_choice(m.yarn_ramp, "model.yarn_ramp", YARN_RAMPS)
    for field in ("yarn_mscale", "yarn_mscale_all_dim"):
      _check(m[field] >= 0 and math.isfinite(m[field]),
             f"model.{field}={m[field]} must be a number >= 0 (0 = no temperature term).")


def _validate_windows(config: ml_collections.ConfigDict) -> None:
  """eval.window/stride and sample.window/stride: 0 = default, else 1 <= stride <= window."""
  for section, limit in (("eval", None), ("sample", config.model.max_seq_len)):
    window, stride = config[section].window, config[section].stride
    _check(isinstance(window, int) and window >= 0,
           f"{section}.window={window!r} must be an integer >= 0 (0 = default).")
    _check(isinstance(stride, int) and stride >= 0,
           f"{section}.stride={stride!r} must be an integer >= 0 (0 = default).")
    if window and stride:
      _check(stride <= window, f"{section}.stride={stride} is larger than {section}.window="
             f"{window}: tokens between windows would never be seen; use a stride <= window.")
    if limit and window:
      _check(window <= limit, f"{section}.window={window} is larger than "
             f"model.max_seq_len={limit}, the longest input the model takes.")


def _validate_sample(s: ml_collections.ConfigDict) -> None:
  _check(isinstance(s.max_new_tokens, int) and s.max_new_tokens >= 0,
         f"sample.max_new_tokens={s.max_new_tokens!r} must be an integer >= 0 "
         "(0: no sample after training).")
  _check(s.temperature >= 0 and math.isfinite(s.temperature),
         f"sample.temperature={s.temperature} must be >= 0 (0 = greedy).")
  _check(isinstance(s.top_k, int) and s.top_k >= 0,
         f"sample.top_k={s.top_k!r} must be an integer >= 0 (0 = all tokens).")
  _check(0.0 < s.top_p <= 1.0, f"sample.top_p={s.top_p} must be in (0, 1] (1 = off).")
  if s.max_new_tokens:
    _check(bool(s.prompt), "sample.prompt is empty: give at least one character "
           "(or set sample.max_new_tokens=0 to skip the sample).")


RLHF_ALGORITHMS = ("none", "ppo", "dpo")
RLHF_VALUES = ("separate", "shared")


def _validate_rlhf(config: ml_collections.ConfigDict) -> None:
  h = config.rlhf
  _check_choice(h.algorithm, "rlhf.algorithm", RLHF_ALGORITHMS)
  if h.algorithm == "none":
    return
  _check(bool(config.train.init_from), f"rlhf.algorithm={h.algorithm!r} starts the policy "
         "from a trained language model: set --init_from (train.init_from) to an SFT or "
         "stage-1 workdir.")
  _check(bool(h.reward_from), f"rlhf.algorithm={h.algorithm!r} needs a reward model: set "
         "rlhf.reward_from to the workdir of a model.head='scalar' run.")
  _check_choice(h.value, "rlhf.value", RLHF_VALUES)
  _check_positive(config, "rlhf.prompt_tokens", "rlhf.response_tokens", "rlhf.batch_size",
                  "rlhf.epochs", "rlhf.minibatches", "rlhf.eval_prompts")
  _check(h.batch_size % h.minibatches == 0, f"rlhf.minibatches={h.minibatches} must divide "
         f"rlhf.batch_size={h.batch_size}.")
  _check(h.temperature > 0, f"rlhf.temperature={h.temperature} must be > 0: rollouts sample.")
  _check(0.0 < h.top_p <= 1.0 and h.top_k >= 0, "rlhf.top_p must be in (0, 1], top_k >= 0.")
  for field in ("gamma", "lam"):
    _check(0.0 <= h[field] <= 1.0, f"rlhf.{field}={h[field]} must be in [0, 1].")
  for field in ("clip_ratio", "clip_value", "value_coef", "kl_coef", "dpo_beta", "kl_horizon"):
    _check(h[field] > 0, f"rlhf.{field}={h[field]} must be > 0.")
  _check(h.kl_target >= 0, f"rlhf.kl_target={h.kl_target} must be >= 0 (0 = fixed beta).")


def _validate_quant(q: ml_collections.ConfigDict) -> None:
  from dsv2_jax.quant import blocks, rules  # pylint: disable=g-import-not-at-top
  _check_choice(q.engine, "quant.engine", ("ours", "qwix"))
  try:
    blocks.Layout.parse(q.block, "quant.block")
    parsed = rules.parse(q.rules, q.block)
    if q.engine == "qwix":
      from dsv2_jax.quant import qwix_baseline  # pylint: disable=g-import-not-at-top
      qwix_baseline.check(parsed)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for field in ("penalty_start", "penalty_end"):
    _check(q[field] >= 0 and math.isfinite(q[field]),
           f"quant.{field}={q[field]} must be a number >= 0 (0 = no rounding penalty).")
  _check(not q.penalty_start or q.penalty_end > 0, "quant.penalty_end must be > 0 when "
         f"quant.penalty_start={q.penalty_start} (the decay ends there); or set both to 0.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config once; raises ConfigError naming the field and the fix."""
  m, d, t = config.model, config.data, config.train
  _check_positive(config, "model.d_model", "model.num_layers", "model.num_heads",
                  "model.ffn_hidden", "model.vocab_size", "model.max_seq_len",
                  "data.seq_len", "data.batch_size", "train.steps", "eval.batch_size",
                  "train.log_every")
  mla = bool(m.mla.kv_lora_rank)  # Head widths are then model.mla's.
  if not m.head_dim and not mla:
    _check(m.d_model % m.num_heads == 0,
           f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}: "
           f"pick num_heads among {[n for n in range(1, 65) if m.d_model % n == 0]} "
           "or set model.head_dim explicitly.")
  _check(num_kv_heads(m) > 0 and m.num_heads % num_kv_heads(m) == 0,
         f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}.")
  if m.position == "rope":
    _check(mla or head_dim(m) % 2 == 0, f"head dim {head_dim(m)} must be even for RoPE: "
           "change model.d_model / model.num_heads or model.head_dim.")
    _validate_rope(m)
  _check(d.seq_len <= m.max_seq_len,
         f"data.seq_len={d.seq_len} is longer than the position limit "
         f"model.max_seq_len={m.max_seq_len}: raise model.max_seq_len or shorten data.seq_len.")
  for field in ("dtype", "param_dtype"):
    _check_choice(m[field], f"model.{field}", DTYPES)
  _check_choice(m.activation, "model.activation", ACTIVATIONS)
  _check_choice(m.norm, "model.norm", NORMS)
  _check_choice(m.position, "model.position", POSITIONS)
  _check_choice(m.attention, "model.attention", ATTENTIONS)
  if m.attention != "dense":
    _validate_dsa(m.dsa)
  _validate_moe(m)
  _validate_mla(config)
  _validate_remat(m)
  _check_choice(d.tokenizer, "data.tokenizer", TOKENIZERS)
  _check_choice(d.format, "data.format", pipeline.FORMATS)
  _check_choice(d.packing, "data.packing", pipeline.PACKINGS[d.format])
  if d.packing == "first_fit":
    _check(m.attention == "dense", f"data.packing='first_fit' keeps examples apart with a "
           f"dense attention mask; model.attention={m.attention!r} has none: use "
           "data.packing='none' (one example per row).")
  _check_choice(d.score_pooling, "data.score_pooling", pipeline.SCORE_POOLINGS)
  _check_choice(m.head, "model.head", HEADS)
  _check((m.head == "scalar") == (d.format == "preference"),
         f"model.head={m.head!r} goes with data.format="
         f"{'preference' if m.head == 'scalar' else 'text or chat'!r}, not {d.format!r}: a "
         "reward model (head 'scalar') trains on preference pairs, a language model on text.")
  _check(0.0 <= d.passkey_fraction <= 1.0,
         f"data.passkey_fraction={d.passkey_fraction} must be in [0, 1].")
  _check(d.passkey_answer_weight > 0, f"data.passkey_answer_weight="
         f"{d.passkey_answer_weight} must be > 0.")
  _check(0.0 <= m.dropout_rate < 1.0, f"model.dropout_rate={m.dropout_rate} must be in [0, 1).")
  _check(m.scan_unroll >= 1, f"model.scan_unroll={m.scan_unroll} must be >= 1 "
         "(values >= model.num_layers unroll the whole stack).")
  _check(isinstance(d.dataset, str) and d.dataset.strip() != "",
         "data.dataset is empty: use one of "
         f"{list(LOCAL_DATASETS)} or a TFDS catalog name such as 'c4/en'.")
  for part in d.dataset.split("+"):
    name = part.split("/")[0].split(":")[0]
    _check(name.replace("_", "").replace(".", "").isalnum(),
           f"data.dataset={d.dataset!r} is not a dataset name: use one of "
           f"{list(LOCAL_DATASETS)} or a TFDS catalog name such as 'c4/en' ('a+b' joins "
           "several).")
  if d.tokenizer == "sentencepiece":
    _check(bool(d.tokenizer_model), "data.tokenizer='sentencepiece' needs "
           "data.tokenizer_model=PATH of a trained .model file.")
  _check(t.learning_rate > 0 and math.isfinite(t.learning_rate),
         f"train.learning_rate={t.learning_rate} must be a positive number.")
  _check(0 <= t.warmup_steps <= t.steps,
         f"train.warmup_steps={t.warmup_steps} must be in [0, train.steps={t.steps}].")
  _check(0.0 <= t.end_lr_fraction <= 1.0,
         f"train.end_lr_fraction={t.end_lr_fraction} must be in [0, 1].")
  _check(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, "train.b1 and train.b2 must be in [0, 1).")
  for field in ("eval_every", "checkpoint_every"):
    _check(t[field] >= 0, f"train.{field}={t[field]} must be >= 0 (0 disables).")
  _check(t.grad_accum_steps >= 1 and d.batch_size % t.grad_accum_steps == 0,
         f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1 and divide "
         f"data.batch_size={d.batch_size} (the rows of one optimizer step).")
  _check(t.max_checkpoints >= 1, f"train.max_checkpoints={t.max_checkpoints} must be >= 1.")
  _check(isinstance(t.max_skipped_steps, int) and t.max_skipped_steps >= 1,
         f"train.max_skipped_steps={t.max_skipped_steps!r} must be a positive integer "
         "(consecutive non-finite steps tolerated before the run stops).")
  _validate_sample(config.sample)
  _validate_windows(config)
  _check(isinstance(t.init_from, str), f"train.init_from={t.init_from!r} must be a workdir "
         "path (or '' to start from a fresh init).")
  _check_positive(config, "rag.passage_tokens", "rag.top_k", "rag.query_tokens")
  _validate_rlhf(config)
  _validate_quant(config.quant)
  _check(config.eval.max_batches >= 0, "eval.max_batches must be >= 0 (0 = whole split).")
  _check(config.eval.final_max_batches >= 0,
         "eval.final_max_batches must be >= 0 (0 = whole split).")
  for axis, size in config.mesh.items():
    _check(isinstance(size, int) and (size >= 1 or size == -1),
           f"mesh.{axis}={size!r} must be a positive integer or -1 (fill).")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a saved config on top of the defaults (new fields keep defaults)."""
  config = default_config()
  saved = json.loads(text)

  def merge(dst: ml_collections.ConfigDict, src: dict[str, Any]) -> None:
    for key, value in src.items():
      if key in dst and isinstance(dst[key], ml_collections.ConfigDict):
        merge(dst[key], value)
      else:
        with dst.unlocked():
          dst[key] = value

  merge(config, saved)
  return config
