"""Schedule shape (warmup then linear decay) and the weight-decay mask."""

from __future__ import annotations

import numpy as np

from dsv2_jax import config as config_lib
from dsv2_jax.train.optimizer import decay_mask, learning_rate_schedule


def test_warmup_then_linear_decay():
  t = config_lib.default_config().train
  t.update(steps=100, warmup_steps=10, learning_rate=1e-3, end_lr_fraction=0.1)
  lr = learning_rate_schedule(t)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(55), lr(100)],
                             [0.0, 5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5, atol=1e-9)


def test_decay_mask_skips_norm_scales_and_biases():
  params = {"layers": {"attention_norm": {"scale": np.ones((2, 4))},
                       "ffn": {"up": {"w": np.ones((2, 4, 8))}}},
            "final_norm": {"scale": np.ones(4), "bias": np.zeros(4)},
            "embedder": {"embedding": np.ones((10, 4))}}
  mask = decay_mask(params)
  assert mask["layers"]["attention_norm"]["scale"] is False
  assert mask["final_norm"]["bias"] is False
  assert mask["layers"]["ffn"]["up"]["w"] is True
  assert mask["embedder"]["embedding"] is True
