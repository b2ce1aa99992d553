"""Decoder: causality, cache decode == full forward, dtypes, logical axis names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.model.transformer import build_model
from tests.helpers import MOE, init, small_config, small_model_config


VARIANTS = [
    dict(),
    dict(scan_layers=False),
    dict(num_kv_heads=2),
    dict(position="learned", activation="gelu", norm="layernorm", tie_embeddings=True),
    dict(remat_policy="full"),
    dict(remat_policy="dots", scan_unroll=2),
    dict(attention="dsa", dsa=dict(window=4, block=4, budget_value=0.3)),
    dict(attention="dsa", num_kv_heads=2, dsa=dict(window=4, block=2, budget="log",
                                                   budget_value=2.0, score="key_norm")),
    dict(attention="sliding_window", dsa=dict(window=3, block=4)),
    dict(attention="dsa", remat_policy="full", dsa=dict(window=4, block=4, score="random")),
    dict(num_layers=4, moe=MOE),
    dict(num_layers=3, remat_policy="full", moe=dict(MOE, every_n_layers=2,
                                                     first_dense_layers=1)),
    dict(scan_layers=False, moe=dict(MOE, num_shared_experts=1, renormalize=True,
                                     balance_bias_rate=0.01, dispatch="ragged_dot")),
    dict(attention="dsa", dsa=dict(window=4, block=4), moe=dict(MOE, top_k=1)),
]
# MoE: unscanned ragged_dot by default; groups + remat (slow to compile) under -m slow.
DECODE_VARIANTS = VARIANTS[:4] + VARIANTS[6:9] + VARIANTS[12:13] + [
    pytest.param(VARIANTS[11], marks=pytest.mark.slow, id="moe_groups_remat_full")]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_changing_later_tokens_leaves_earlier_logits_unchanged(kw):
  model, params, tokens = init(small_model_config(**dict(kw)), t=24)
  logits = model.apply({"params": params}, tokens)
  t = 13
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 256)
  logits2 = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(np.asarray(logits[:, :t + 1]), np.asarray(logits2[:, :t + 1]))
  # The later positions do see the change (the test can fail).
  assert np.abs(np.asarray(logits[:, t + 1:] - logits2[:, t + 1:])).max() > 1e-3


@pytest.mark.parametrize("kw", DECODE_VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_decode_with_cache_equals_full_forward(kw):
  cfg = small_model_config(**dict(kw))
  model, params, tokens = init(cfg, t=16)
  full = model.apply({"params": params}, tokens)
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 24), jnp.int32), decode=True)["cache"]
  cache = jax.tree.map(jnp.zeros_like, cache)
  outs = []
  logits, mutated = model.apply({"params": params, "cache": cache}, tokens[:, :7], decode=True,
                                mutable=["cache"])
  outs.append(logits)
  for i in range(7, 16):  # Then one token at a time.
    logits, mutated = model.apply({"params": params, "cache": mutated["cache"]},
                                  tokens[:, i:i + 1], decode=True, mutable=["cache"])
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=2e-5, rtol=1e-5)
  assert int(mutated["cache"]["index"]) == 16


def test_bf16_compute_with_f32_params_tracks_f32():
  cfg = small_model_config()
  model32, params, tokens = init(cfg)
  model16 = build_model(small_model_config(dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits32 = model32.apply({"params": params}, tokens)
  logits16 = model16.apply({"params": params}, tokens)
  assert logits16.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(logits16, np.float32)).all()
  err = np.abs(np.asarray(logits16, np.float32) - np.asarray(logits32))
  assert err.mean() < 0.02 * np.asarray(logits32).std() + 0.01 and err.max() < 0.3
  grads = jax.grad(lambda p: model16.apply({"params": p}, tokens).astype(jnp.float32).mean())(params)
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_bf16_params_and_compute_train_step_is_finite():
  cfg = small_model_config(dtype="bfloat16", param_dtype="bfloat16")
  model, params, tokens = init(cfg)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  loss = lambda p: model.apply({"params": p}, tokens).astype(jnp.float32).mean()  # noqa: E731
  grads = jax.grad(loss)(params)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_every_parameter_has_logical_axis_names():
  cfg = small_model_config(position="learned")
  model = build_model(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, 8), jnp.int32))["params"])
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim
  scanned = boxed["layers"]["attention"]["query"]["w"]
  assert scanned.names == ("layers", "embed", "heads", "kv")


def test_scan_and_unrolled_layers_compute_the_same_function():
  cfg = small_model_config()
  model, params, tokens = init(cfg)
  loop_model = build_model(small_model_config(scan_layers=False))
  loop_params = {k: v for k, v in params.items() if k != "layers"}
  for i in range(cfg.num_layers):
    loop_params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  np.testing.assert_allclose(loop_model.apply({"params": loop_params}, tokens),
                             model.apply({"params": params}, tokens), atol=1e-5, rtol=1e-5)


def test_dropout_is_active_only_when_not_deterministic():
  cfg = small_model_config(dropout_rate=0.5)
  model, params, tokens = init(cfg)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, tokens)
  np.testing.assert_array_equal(a, b)
  c = model.apply({"params": params}, tokens, deterministic=False,
                  rngs={"dropout": jax.random.PRNGKey(1)})
  assert np.abs(np.asarray(a - c)).max() > 1e-3


def test_moe_model_trains_with_balancing_and_logs_expert_load():
  """Train step of an MoE model: aux losses reach the objective, the balancing bias moves,
  the router gets gradients, the load metrics are consistent."""
  from dsv2_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from dsv2_jax.train.optimizer import build_optimizer  # pylint: disable=g-import-not-at-top
  from dsv2_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
  from dsv2_jax.train.step import jit_train_step  # pylint: disable=g-import-not-at-top
  c = small_config(num_layers=2, moe=dict(MOE, balance_bias_rate=0.01))
  c.train.update(steps=10, warmup_steps=0, learning_rate=1e-2)
  mesh = sharding.make_mesh(c.mesh)
  model, tx = build_model(c.model), build_optimizer(c.train)
  state, shardings = create_train_state(model, tx, 0, 16, mesh)
  step = jit_train_step(model, tx, mesh, shardings)
  tokens = np.random.RandomState(0).randint(0, 256, (2, 16)).astype(np.int32)
  batch = sharding.put_batch({"inputs": tokens, "targets": tokens,
                              "weights": np.ones((2, 16), np.float32)}, mesh)
  router = lambda s: s.params["moe_layers"]["block_0"]["moe"]["router"]  # noqa: E731
  before = jax.tree.map(np.asarray, router(state))
  state, metrics = step(state, batch)
  after = jax.tree.map(np.asarray, router(state))
  assert np.abs(after["gate_in"]["w"] - before["gate_in"]["w"]).max() > 0
  np.testing.assert_allclose(np.abs(after["balance_bias"] - before["balance_bias"]), 0.01,
                             rtol=1e-5)  # Every expert moves by one step (none exactly at the mean).
  assert float(metrics["moe/aux_loss"]) >= 1.0 - 1e-5  # >= 1, = 1 only when uniform.
  assert 0.0 < float(metrics["moe/load_entropy"]) <= 1.0
  assert 1.0 <= float(metrics["moe/load_max_over_mean"]) <= 4.0
  assert float(metrics["moe/dropped_fraction"]) == 0.0
  assert float(metrics["moe/executed_rows"]) >= 2 * 16 * 2


def test_moe_routed_expert_weights_carry_the_expert_axis():
  cfg = small_model_config(moe=MOE)
  boxed = jax.eval_shape(lambda: build_model(cfg).init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 8), jnp.int32))["params"])
  moe_params = boxed["moe_layers"]["block_0"]["moe"]
  assert moe_params["w_in"].names == ("layers", "expert", "embed", None, "expert_mlp")
  assert moe_params["w_out"].names == ("layers", "expert", "expert_mlp", "embed")
  assert moe_params["router"]["gate_out"].names == ("layers", "gate_mlp", "expert")
