"""Multi-head Latent Attention: absorbed decoding against the expanded forward pass, the
latent cache, causality, and the kernel with value heads narrower than the keys."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax import config as config_lib
from dsv2_jax.model import dense_attention, flops
from dsv2_jax.model import mla as mla_lib
from dsv2_jax.model.transformer import build_model
from tests.helpers import DEEPSEEK_MOE, MLA, init, small_config, small_model_config

YARN = dict(rope_scaling="yarn", rope_scale=4.0, rope_original_length=16, yarn_ramp="dims",
            yarn_mscale=0.707, yarn_mscale_all_dim=0.707)
VARIANTS = {
    "mla": dict(mla=MLA),
    "mla_q_lora": dict(mla=dict(MLA, q_lora_rank=10)),
    # The HF parity test (tests/convert) also decodes this shape in the default suite.
    "mla_yarn_deepseek_moe": pytest.param(
        dict(mla=dict(MLA, q_lora_rank=10), moe=dict(DEEPSEEK_MOE, first_dense_layers=1),
             **YARN), marks=pytest.mark.slow),
}


def decode_in_pieces(model, params, tokens, first: int, slots: int = 24):
  """Logits of a prefill of `first` tokens, then one token at a time, and the cache."""
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((tokens.shape[0], slots), jnp.int32),
                     decode=True)["cache"]
  cache = jax.tree.map(jnp.zeros_like, cache)
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True,
                                          mutable=["cache"]))
  logits, mutated = step(cache, tokens[:, :first])
  outs = [logits]
  for i in range(first, tokens.shape[1]):
    logits, mutated = step(mutated["cache"], tokens[:, i:i + 1])
    outs.append(logits)
  return np.concatenate(outs, axis=1), mutated["cache"]


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_absorbed_decode_equals_the_expanded_forward(kw):
  cfg = small_model_config(**kw)
  config_lib.validate(small_config(**kw))
  model, params, tokens = init(cfg, t=16)
  full = model.apply({"params": params}, tokens)
  decoded, cache = decode_in_pieces(model, params, tokens, first=7)
  np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=1e-5)
  # The test can fail: decoding without the absorbed key (q_rope only) differs.
  assert np.abs(np.asarray(full[:, 1:] - full[:, :-1])).max() > 1e-3
  assert int(cache["index"]) == 16


def test_the_cache_holds_only_the_latent_and_the_rope_key():
  cfg = small_model_config(mla=MLA)
  model, _, _ = init(cfg)
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((3, 20), jnp.int32), decode=True)["cache"]
  leaves = {"/".join(k.key for k in path): leaf.shape for path, leaf in
            jax.tree_util.tree_flatten_with_path(nn.meta.unbox(cache))[0]}
  assert leaves == {"index": (), "layers/attention/cached_latent": (2, 3, 20, 12),
                    "layers/attention/cached_key_rope": (2, 3, 20, 4)}
  assert flops.cache_values_per_token(cfg) == 12 + 4
  assert flops.cache_values_per_token(small_model_config()) == 2 * 4 * 8
  assert flops.cache_values_per_token(small_model_config(num_kv_heads=2)) == 2 * 2 * 8


def test_parameters_are_the_low_rank_factors():
  model, params, _ = init(small_model_config(mla=dict(MLA, q_lora_rank=10)))
  shapes = jax.tree.map(lambda a: a.shape, params["layers"]["attention"])
  assert shapes == {
      "query_down": {"w": (2, 32, 10)}, "query_norm": {"scale": (2, 10)},
      "query_up": {"w": (2, 10, 4, 10)}, "kv_down": {"w": (2, 32, 12)},
      "kv_norm": {"scale": (2, 12)}, "key_rope": {"w": (2, 32, 4)},
      "key_up": {"w": (2, 12, 4, 6)}, "value_up": {"w": (2, 12, 4, 8)},
      "out": {"w": (2, 4, 8, 32)}}


def test_later_tokens_do_not_change_earlier_logits_and_gradients_are_finite():
  cfg = small_model_config(mla=dict(MLA, q_lora_rank=10), num_layers=1)
  model, params, tokens = init(cfg, t=24)
  logits = model.apply({"params": params}, tokens)
  changed = tokens.at[:, 14:].set((tokens[:, 14:] + 7) % 256)
  np.testing.assert_array_equal(np.asarray(logits[:, :14]),
                                np.asarray(model.apply({"params": params}, changed)[:, :14]))
  grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["layers"]["attention"]["key_up"]["w"]).max()) > 0


@pytest.mark.parametrize("v_head_dim", [8, 10, 14])
def test_padding_to_equal_widths_leaves_attention_unchanged(v_head_dim):
  """DSA needs values as wide as keys: `_equal_widths` pads either side exactly."""
  rng = np.random.RandomState(0)
  q, k = (jnp.asarray(rng.randn(2, 16, 4, 10), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.randn(2, 16, 4, v_head_dim), jnp.float32)
  want = dense_attention.causal_attention(q, k, v)
  same_widths_only = lambda q, k, v: (  # noqa: E731
      dense_attention.causal_attention(q, k, v) if q.shape == v.shape else None)
  got = mla_lib._equal_widths(same_widths_only, q, k, v)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_dsa_kernel_runs_under_mla_and_equals_dense_when_it_sees_everything():
  cfg = small_model_config(mla=MLA, attention="dsa", dsa=dict(window=4, block=4,
                                                              budget_value=0.3))
  model, params, tokens = init(cfg, t=24)
  assert np.isfinite(np.asarray(model.apply({"params": params}, tokens))).all()
  with pytest.raises(ValueError, match="supports dense attention only"):  # Decoding.
    model.apply({"params": params}, tokens[:, :1], decode=True, mutable=["cache"])
  # With W + P covering the whole row, DSA is causal attention: MLA agrees with dense.
  wide = small_model_config(mla=MLA, attention="dsa", dsa=dict(window=24, block=1,
                                                               budget_value=0.3))
  np.testing.assert_allclose(
      build_model(wide).apply({"params": params}, tokens),
      build_model(small_model_config(mla=MLA)).apply({"params": params}, tokens), atol=2e-5)


BAD_MLA = [
    (dict(mla=dict(q_lora_rank=8)), "belongs to Multi-head Latent Attention"),
    (dict(mla=dict(MLA, qk_rope_head_dim=3)), "qk_rope_head_dim=3 must be even"),
    (dict(mla=MLA, num_kv_heads=2), "no GQA"),
    (dict(mla=MLA, position="learned"), "set model.position='rope'"),
    (dict(mla=MLA, attention="dsa"), "set sample.max_new_tokens=0"),
    (dict(moe=dict(DEEPSEEK_MOE, n_group=3)), "n_group=3 must be a positive divisor"),
    (dict(moe=dict(DEEPSEEK_MOE, topk_group=5)), r"topk_group=5 must be in \[1"),
    (dict(moe=dict(DEEPSEEK_MOE, topk_group=1, top_k=3)), "raise topk_group"),
    (dict(moe=dict(DEEPSEEK_MOE, router="mlps")), "model.moe.router='mlps'"),
]


@pytest.mark.parametrize("fields,message", BAD_MLA)
def test_bad_mla_and_router_settings_name_the_field(fields, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(small_config(**fields))
