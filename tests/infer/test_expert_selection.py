"""Selective expert loading (dsv2_jax/infer/expert_selection.py).

Checked: keeping all E experts is the full model exactly; the profile counts every
top-k pick of every token; kept experts are the most used, per layer; a kept model
routes only among them with the gate renormalised over them (oracle: the full model
with the dropped experts' logits pushed to -inf by a bias); bad --experts_keep values
are one line, exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.infer import expert_selection as es
from dsv2_jax.model.transformer import build_model
from tests import helpers
from tests.helpers import REPO

MOE = dict(helpers.MOE, num_experts=6)


def setup(seed=0):
  cfg = helpers.small_model_config(moe=MOE)
  model, params, tokens = helpers.init(cfg, t=16, b=4, seed=seed)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])
  return cfg, model, params, tokens, boxed


def test_profile_counts_every_pick():
  cfg, model, params, tokens, _ = setup()
  counts = es.profile(model, params, [{"inputs": np.asarray(tokens)}] * 3)
  (path, c), = counts.items()
  assert path.endswith("/moe") and c.shape == (cfg.num_layers, 6)
  np.testing.assert_array_equal(c.sum(-1), 3 * tokens.size * MOE["top_k"])


def test_keeping_every_expert_is_the_full_model():
  cfg, model, params, tokens, boxed = setup()
  counts = es.profile(model, params, [{"inputs": np.asarray(tokens)}])
  kept = es.kept_experts(counts, 6)
  same = es.keep_experts(params, boxed, kept)
  jax.tree.map(np.testing.assert_array_equal, same, params)
  np.testing.assert_array_equal(np.asarray(model.apply({"params": same}, tokens)),
                                np.asarray(model.apply({"params": params}, tokens)))


def test_kept_experts_are_the_most_used_per_layer():
  counts = {"m": np.array([[5, 1, 9, 0, 3, 9], [0, 0, 1, 2, 3, 4]])}
  np.testing.assert_array_equal(es.kept_experts(counts, 3)["m"], [[0, 2, 5], [3, 4, 5]])


def test_kept_model_routes_among_kept_experts_only():
  """Oracle: the full model whose balance bias is -1e9 on the dropped experts selects
  only kept ones; with the gate renormalised (moe.renormalize, top-k weights summing to
  1) the outputs are the same."""
  cfg = helpers.small_model_config(moe=dict(MOE, renormalize=True, balance_bias_rate=1e-3))
  model, params, tokens = helpers.init(cfg, t=16, b=4)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])
  kept = {"moe_layers/block_0/moe": np.array([[0, 2, 3], [1, 4, 5]], np.int32)}
  small = build_model(es.kept_model_config(cfg, 3))
  got = small.apply({"params": es.keep_experts(params, boxed, kept)}, tokens)
  bias = np.full((2, 6), -1e9, np.float32)
  for layer, idx in enumerate(kept["moe_layers/block_0/moe"]):
    bias[layer, idx] = 0.0
  router = params["moe_layers"]["block_0"]["moe"]["router"]
  oracle = jax.tree.map(lambda x: x, params)
  oracle["moe_layers"]["block_0"]["moe"]["router"] = {**router, "balance_bias": bias}
  want = model.apply({"params": oracle}, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [0, 1, 7])
def test_kept_model_config_bounds(keep):
  with pytest.raises(ValueError, match=r"must be in \[moe.top_k=2, moe.num_experts=6\]"):
    es.kept_model_config(helpers.small_model_config(moe=MOE), keep)
  with pytest.raises(ValueError, match="needs an MoE run"):
    es.kept_model_config(helpers.small_model_config(), 2)


def test_cli_experts_keep_above_the_expert_count_exits_2(tmp_path, data_dir):
  from dsv2_jax.train import trainer
  c = helpers.tiny_config(data_dir)
  c.model.moe.update(MOE)
  c.train.update(steps=1, warmup_steps=0, checkpoint_every=0)
  c.sample.max_new_tokens = 0
  trainer.train_and_evaluate(c, tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dsv2_jax", "eval", "--workdir",
                         str(tmp_path / "run"), "--experts_keep", "7"], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
  assert "--experts_keep=7 must be in [moe.top_k=2, moe.num_experts=6]" in proc.stderr


def test_kept_model_config_refuses_group_limited_routing():
  with pytest.raises(ValueError, match="routes within groups"):
    es.kept_model_config(helpers.small_model_config(moe=helpers.DEEPSEEK_MOE), 4)
