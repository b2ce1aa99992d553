"""Remat policies: same gradients as no remat; `layered` keeps exactly Q, K and the FFN."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsv2_jax import config as config_lib
from dsv2_jax.model import remat
from dsv2_jax.model.transformer import DecoderBlock
from tests.helpers import DEEPSEEK_MOE, MLA, MOE, init, small_model_config, tiny_config

DSA_MOE = dict(attention="dsa", dsa=dict(window=4, block=4, budget_value=0.3), moe=MOE)
V2 = dict(mla=dict(MLA, q_lora_rank=10), moe=DEEPSEEK_MOE)  # The DeepSeek-V2 layout.
POLICY_CASES = [("full", ""), ("dots", ""), ("layered", ""), ("offload", ""),
                ("custom", "value,ffn_down,moe_out")]


def grads(cfg, tokens_seed=0):
  model, params, tokens = init(cfg, t=24, seed=tokens_seed)

  def loss(p):
    logits = model.apply({"params": p}, tokens).astype(jnp.float32)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("model_kw,policies", [
    (dict(), POLICY_CASES),
    # DSA + GMoE under -m slow (its residuals are checked by the default suite below).
    pytest.param(DSA_MOE, POLICY_CASES, marks=pytest.mark.slow),
    pytest.param(V2, POLICY_CASES, marks=pytest.mark.slow),
], ids=["dense", "dsa_moe_every_policy", "mla_deepseek_moe_every_policy"])
def test_every_policy_gives_the_gradients_of_no_remat(model_kw, policies):
  reference = grads(small_model_config(**model_kw))
  for name, names in policies:
    got = grads(small_model_config(**model_kw, remat_policy=name, remat_names=names))
    # Recomputation reorders float sums: agree to 1e-4 of each tensor's scale.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))), err_msg=name), got, reference)
  # The comparison is sharp enough to see a different input.
  other = grads(small_model_config(**model_kw), tokens_seed=1)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(other), jax.tree.leaves(reference))) > 1e-4


def block_residuals(policy: str, names: str = "", **model_kw) -> list[str]:
  """What the backward pass of one remat'd decoder block keeps, one line per residual."""
  cfg = ml_collections.FrozenConfigDict(small_model_config(**model_kw, remat_policy=policy,
                                                          remat_names=names))
  block_cls = DecoderBlock if policy == "none" else nn.remat(
      DecoderBlock, policy=remat.policy(policy, names))
  block = block_cls(cfg, moe=bool(cfg.moe.num_experts))
  b, t = 2, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (b * t, cfg.d_model))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = block.init(jax.random.PRNGKey(1), x, positions)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(
        lambda p, x: jnp.sum(block.apply(p, x, positions)[0]), params, x)  # Linear: no residual.
  return out.getvalue().splitlines()


def named(lines: list[str]) -> set[str]:
  return {m.group(1) for line in lines for m in [re.search(r"named '(\w+)'", line)] if m}


def computed(lines: list[str]) -> list[str]:
  """Residuals that are neither inputs (arguments, constants) nor tagged."""
  return [l for l in lines if "from the argument" not in l and "from a constant" not in l
          and "named '" not in l]


def test_layered_keeps_q_k_and_the_ffn_and_recomputes_v():
  lines = block_residuals("layered")
  assert named(lines) == {"query", "key", "ffn_gate", "ffn_up", "ffn_hidden"}
  # Nothing else is kept, so V (and the attention probabilities) must be recomputed.
  assert computed(lines) == []
  # Without remat the same block keeps V, its probabilities and more, untagged.
  plain = block_residuals("none")
  assert len(computed(plain)) > 5


def test_layered_on_a_dsa_moe_block_keeps_selection_routing_and_expert_activations():
  lines = block_residuals("layered", **DSA_MOE)
  kept = named(lines)
  assert {"query", "key", "dsa_selection", "moe_routing", "moe_rows", "moe_expert_pre",
          "moe_expert_out"} <= kept <= set(remat.LAYERED)
  assert "value" not in kept and computed(lines) == []


def test_layered_on_an_mla_block_keeps_its_latents_q_and_k_and_recomputes_v():
  lines = block_residuals("layered", **V2)
  # key_rope is allowed but not needed: K (which holds it) is kept, and RoPE's backward
  # pass needs only sin and cos.
  assert named(lines) == {"query", "key", "kv_latent", "query_latent",
                          "moe_routing", "moe_rows", "moe_expert_pre", "moe_expert_out",
                          "ffn_gate", "ffn_up", "ffn_hidden"}  # (ffn_*: the shared expert)
  assert computed(lines) == []
  full = block_residuals("custom", "kv_latent,key_rope", **V2)
  assert named(full) == {"kv_latent", "key_rope"} and computed(full) == []


def test_full_keeps_only_inputs_and_custom_keeps_what_it_lists():
  assert named(block_residuals("full")) == set() and computed(block_residuals("full")) == []
  custom = block_residuals("custom", "value,ffn_hidden")
  assert named(custom) == {"value", "ffn_hidden"} and computed(custom) == []


def test_offload_sends_the_layered_residuals_to_host_and_back():
  cfg = ml_collections.FrozenConfigDict(small_model_config())
  block = nn.remat(DecoderBlock, policy=remat.policy("offload"))(cfg)
  x = jnp.ones((32, cfg.d_model))
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  params = block.init(jax.random.PRNGKey(0), x, positions)
  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda p: jnp.sum(block.apply(p, x, positions)[0] ** 2)))(params))
  to_host = re.findall(r"device_put\[[^\]]*MemorySpace\.Host", jaxpr)
  to_device = re.findall(r"device_put\[[^\]]*MemorySpace\.Device", jaxpr)
  # Q, K, gate, up, hidden: five residuals out and five back in.
  assert len(to_host) == len(to_device) == 5


def test_every_tag_in_the_code_is_registered_and_every_registered_tag_is_used():
  source = "".join(p.read_text() for p in
                   pathlib.Path(remat.__file__).parent.glob("*.py"))
  used = set(re.findall(r"checkpoint_name\([^()]*(?:\([^()]*\))?[^()]*,\s*\"(\w+)\"\)", source))
  assert used == set(remat.TAGS)
  assert set(remat.LAYERED) <= set(remat.TAGS)


BAD_REMAT = [
    (dict(remat_policy="custom", remat_names="query,vaule"),
     r"model.remat_names has unknown names \['vaule'\]"),
    (dict(remat_policy="custom"), r"model.remat_policy='custom' needs model.remat_names"),
    (dict(remat_policy="layered", remat_names="query"),
     r"model.remat_names='query' is only read by model.remat_policy='custom'"),
]


@pytest.mark.parametrize("fields,message", BAD_REMAT)
def test_bad_remat_settings_fail_validation_naming_the_field(tmp_path, fields, message):
  c = tiny_config(str(tmp_path))
  c.model.update(fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_offload_without_host_memory_fails_validation(tmp_path, monkeypatch):
  c = tiny_config(str(tmp_path))
  c.model.remat_policy = "offload"
  config_lib.validate(c)  # This CPU has a pinned_host memory kind.
  monkeypatch.setattr(remat, "supports_offload", lambda device=None: False)
  with pytest.raises(config_lib.ConfigError, match=r"remat_policy='offload' needs a "
                     r"'pinned_host' memory kind.*use 'layered'"):
    config_lib.validate(c)
