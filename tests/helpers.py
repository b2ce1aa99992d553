"""What tests share: the repository path and the small configs they build on.

Tests import this module (`from tests import helpers`), never each other; conftest.py
keeps only fixtures. Every small model here is one `small_model_config` with fields
changed, so a test names only what it varies.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsv2_jax import config as config_lib
from dsv2_jax.model.transformer import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]

# A small GMoE: 4 experts, top-2, tiny gate and experts (compiles in seconds).
MOE = dict(num_experts=4, top_k=2, gate_hidden=8, expert_hidden=16)
# Small Multi-head Latent Attention: latent 12 (< 2 N H = 64), 6 + 4 query/key, values 8.
MLA = dict(kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8)
# A small DeepSeekMoE: linear router over 8 experts in 4 groups (2 allowed), top-2,
# one shared expert, scaled weights.
DEEPSEEK_MOE = dict(num_experts=8, top_k=2, expert_hidden=16, router="linear",
                    num_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.0)


def small_model_config(**fields) -> ml_collections.ConfigDict:
  """The model config of a 2-layer, width-32 byte LM (4 heads, FFN 48, 64 positions).

  `fields` change model fields; `dsa=`, `moe=` and `mla=` take dicts of their sub-fields.
  """
  c = config_lib.default_config().model
  c.update(d_model=32, num_layers=2, num_heads=4, ffn_hidden=48, vocab_size=258,
           max_seq_len=64)
  c.dsa.update(fields.pop("dsa", {}))
  c.moe.update(fields.pop("moe", {}))
  c.mla.update(fields.pop("mla", {}))
  c.update(fields)
  return c


def small_config(seq_len: int = 0, batch_size: int = 8, **fields) -> ml_collections.ConfigDict:
  """A whole config around `small_model_config(**fields)`; seq_len 0 = max_seq_len."""
  c = config_lib.default_config()
  c.model = small_model_config(**fields)
  c.data.update(seq_len=seq_len or c.model.max_seq_len, batch_size=batch_size)
  return c


def init(cfg: ml_collections.ConfigDict, t: int = 16, b: int = 2, seed: int = 0):
  """The model of model config `cfg`, its unboxed params and [b, t] random byte tokens."""
  model = build_model(cfg)
  tokens = jnp.asarray(np.random.RandomState(seed).randint(0, 256, (b, t)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens))["params"]
  return model, params, tokens


def tiny_config(data_dir: str) -> ml_collections.ConfigDict:
  """A trainer config: the small model (FFN 64) on the Lee news corpus, 6 steps in seconds."""
  c = small_config(seq_len=32, batch_size=4, ffn_hidden=64, max_seq_len=128)
  c.data.update(dataset="lee_news", data_dir=data_dir)
  c.train.update(steps=6, warmup_steps=2, learning_rate=3e-3, log_every=2, eval_every=0,
                 checkpoint_every=3, async_checkpointing=False)
  c.eval.update(batch_size=32, max_batches=2)
  c.sample.update(max_new_tokens=8)
  return c


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  """`python -m dsv2_jax ARGS` in a fresh process (stdout/stderr as text); raises with both
  when `check` and the exit status is not 0."""
  env = dict(os.environ, JAX_PLATFORMS="")  # As a user runs it: JAX picks the backend.
  proc = subprocess.run([sys.executable, "-m", "dsv2_jax", *args], capture_output=True,
                        env=env, cwd=REPO, timeout=600)
  proc.stdout, proc.stderr = (x.decode("utf-8", "replace") for x in (proc.stdout, proc.stderr))
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
  return proc
