"""Train step: gradient accumulation over microbatches equals one step on the whole batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dsv2_jax import config as config_lib
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.train.optimizer import build_optimizer
from dsv2_jax.train.state import create_train_state
from dsv2_jax.train.step import jit_train_step
from tests.conftest import tiny_config


def one_step(config, batch, accum_steps):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, tx = build_model(config.model), build_optimizer(config.train)
  state, shardings = create_train_state(model, tx, 0, config.data.seq_len, mesh)
  step = jit_train_step(model, tx, mesh, shardings, accum_steps)
  return step(state, sharding.put_batch(batch, mesh))


def test_accumulated_microbatches_equal_the_whole_batch(tmp_path):
  c = tiny_config(str(tmp_path))
  c.data.batch_size = 8
  rng = np.random.RandomState(0)
  b, t = 8, c.data.seq_len
  weights = np.ones((b, t), np.float32)
  weights[:2, t // 2:] = 0.0  # Padding in the first microbatches only: tokens, not rows, count.
  batch = {"inputs": rng.randint(0, 256, (b, t)).astype(np.int32),
           "targets": rng.randint(0, 256, (b, t)).astype(np.int32), "weights": weights}
  whole, whole_metrics = one_step(c, batch, 1)
  for accum in (4,):  # 2 microbatches on a mesh: tests/parallel/test_layouts.py.
    state, metrics = one_step(c, batch, accum)
    np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state.params, whole.params)
  # Averaging the microbatches' mean losses instead would miss the padding (can fail).
  first = one_step(c, {k: v[:4] for k, v in batch.items()}, 1)[1]["loss"]
  second = one_step(c, {k: v[4:] for k, v in batch.items()}, 1)[1]["loss"]
  assert abs((first + second) / 2 - whole_metrics["loss"]) > 10 * 1e-5 * whole_metrics["loss"]


@pytest.mark.parametrize("accum", [0, 3])
def test_grad_accum_steps_must_divide_the_batch(tmp_path, accum):
  c = tiny_config(str(tmp_path))
  c.train.grad_accum_steps = accum
  with pytest.raises(config_lib.ConfigError, match=r"train.grad_accum_steps=.* must be >= 1 "
                     r"and divide data.batch_size=4"):
    config_lib.validate(c)
