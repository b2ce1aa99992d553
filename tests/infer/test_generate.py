"""Cached generation == repeated full forward passes (greedy)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.infer.generate import generate, sample_token
from dsv2_jax.model.transformer import build_model
from tests.helpers import small_model_config


def test_greedy_generation_matches_full_forward_argmax():
  cfg = small_model_config()
  model = build_model(cfg)
  prompt = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 5)), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), prompt))["params"]
  new = generate(model, params, prompt, jax.random.PRNGKey(0), max_new_tokens=6,
                 temperature=0.0, top_k=0)
  seq = prompt
  for _ in range(6):  # Oracle: no cache, re-run the whole prefix.
    nxt = jnp.argmax(model.apply({"params": params}, seq)[:, -1], axis=-1).astype(jnp.int32)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(new, seq[:, 5:])


def test_top_k_one_is_greedy_and_top_k_restricts_support():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0]])
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  assert all(int(sample_token(logits, k, 1.0, 1)[0]) == 1 for k in keys[:20])
  drawn = {int(sample_token(logits, k, 1.0, 2)[0]) for k in keys}
  assert drawn == {1, 3}
