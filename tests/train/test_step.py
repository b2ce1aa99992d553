"""Train step: gradient accumulation equals one step on the whole batch; a non-finite step
is skipped without touching parameters, optimizer state or the MoE balancing bias."""

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
from tests.helpers import tiny_config


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


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe_balance_bias"])
def test_non_finite_step_is_skipped_and_counted(tmp_path, moe):
  c = tiny_config(str(tmp_path))
  c.train.warmup_steps = 0  # A nonzero learning rate at the first applied step.
  if moe:  # The balancing bias moves outside the optimizer: it must be held back too.
    c.model.moe.update(num_experts=4, top_k=2, gate_hidden=8, expert_hidden=16,
                       balance_bias_rate=0.1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  model, tx = build_model(c.model), build_optimizer(c.train)
  state, shardings = create_train_state(model, tx, 0, c.data.seq_len, mesh)
  step = jit_train_step(model, tx, mesh, shardings)
  rng = np.random.RandomState(0)
  b, t = c.data.batch_size, c.data.seq_len
  good = {"inputs": rng.randint(0, 256, (b, t)).astype(np.int32),
          "targets": rng.randint(0, 256, (b, t)).astype(np.int32),
          "weights": np.ones((b, t), np.float32)}
  bad = dict(good, weights=np.where(np.arange(t) == 3, np.nan, 1.0).astype(np.float32)
             * np.ones((b, 1), np.float32))
  before = jax.device_get(state)  # The step donates its input state.
  state, metrics = step(state, sharding.put_batch(bad, mesh))
  after = jax.device_get(state)
  assert not np.isfinite(metrics["loss"])
  assert (int(after.step), int(metrics["skipped_steps"]), int(metrics["consecutive_skips"])
          ) == (1, 1, 1)
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state),
               (before.params, before.opt_state))
  assert not np.array_equal(after.rng, before.rng)  # The step itself moved on.
  state, metrics = step(state, sharding.put_batch(good, mesh))
  assert (int(metrics["skipped_steps"]), int(metrics["consecutive_skips"])) == (1, 0)
  changed = jax.tree.map(lambda x, y: not np.array_equal(x, y),
                         jax.device_get(state.params), before.params)
  assert all(jax.tree.leaves(changed))  # Every parameter (the bias too) moved this time.
