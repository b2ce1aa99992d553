"""The qwix engine (quant.engine='qwix') against ours: with the same calibration, qwix's
model-level QAT and our per-channel / Kx1 fake quantization give the same logits; qwix
cannot express 4x4 blocks or the GMoE's experts, which is a config error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax import config as config_lib
from dsv2_jax.quant import qat as qat_lib, qwix_baseline, rules as rules_lib
from tests import helpers


@pytest.mark.parametrize("text", ["ffn=int8:channel,attention=int8:channel",
                                  "ffn=int8:8x1,head=int8:channel"])
def test_qwix_and_ours_round_the_same(text):
  cfg = helpers.small_model_config(tie_embeddings=False)
  model, params, tokens = helpers.init(cfg)
  rules = rules_lib.parse(text, "4x4")
  theirs = qwix_baseline.wrap(model, rules).apply({"params": params}, tokens)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])
  ours = model.apply({"params": qat_lib.QAT(rules_lib.plan(rules, boxed)).weights(params)},
                     tokens)
  plain = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=2e-5)
  assert np.abs(np.asarray(ours) - np.asarray(plain)).max() > 1e-3  # Rounding happened.


@pytest.mark.parametrize("rules,message", [("ffn=int8:4x4", "int8:channel, int8:Kx1"),
                                           ("ffn=bf16", "int8:channel, int8:Kx1"),
                                           ("experts=int8:channel", "GMoE")])
def test_what_qwix_cannot_express_is_a_config_error(rules, message):
  c = config_lib.default_config()
  c.quant.update(engine="qwix", rules=rules)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)
