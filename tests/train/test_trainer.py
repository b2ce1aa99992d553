"""train_and_evaluate: learns real text, resumes bit-identically, reports bad checkpoints."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from dsv2_jax import config as config_lib
from dsv2_jax.train import trainer
from dsv2_jax.train.checkpoint import CheckpointError
from dsv2_jax.train.metrics import read_metrics
from tests.conftest import tiny_config

_TIMING = ("tokens_per_s", "model_tflops_per_s")


def final_params(workdir):
  config = trainer.load_config(workdir)
  run = trainer.Run(config, workdir)
  state, _, data_state = run.initial_state()
  return jax.device_get(state), data_state


def comparable(metrics):
  return [{k: v for k, v in m.items() if k not in _TIMING} for m in metrics]


def test_loss_falls_on_real_text(tmp_path, data_dir):
  c = tiny_config(data_dir)
  c.model.update(d_model=64, num_heads=4, ffn_hidden=128)
  c.train.update(steps=60, warmup_steps=5, log_every=10, checkpoint_every=0)
  c.eval.max_batches = 4
  result = trainer.train_and_evaluate(c, tmp_path)
  losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5  # ~5.6 nats -> < 3.5 nats
  for key in ("loss", "perplexity", "bits_per_byte", "tokens"):
    assert key in result
  assert json.loads((tmp_path / "eval.json").read_text()) == result
  assert result["bits_per_byte"] < result["unigram_bits_per_byte"]
  assert (tmp_path / "sample.txt").read_text().startswith(c.sample.prompt)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_stop_and_resume_is_bit_identical(tmp_path, data_dir):
  c = tiny_config(data_dir)
  c.model.dropout_rate = 0.1  # The RNG must be restored too.
  c.train.update(steps=6, checkpoint_every=2, log_every=1)
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(c, straight)
  resumed = tmp_path / "resumed"
  assert trainer.train_and_evaluate(c, resumed, stop_after=3) is None
  assert trainer.train_and_evaluate(c, resumed) is not None

  (a, a_data), (b, b_data) = final_params(straight), final_params(resumed)
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert a_data == b_data
  assert comparable(read_metrics(straight)) == comparable(read_metrics(resumed))
  assert (straight / "eval.json").read_text() == (resumed / "eval.json").read_text()


def test_resume_with_a_different_model_is_refused(tmp_path, data_dir):
  c = tiny_config(data_dir)
  trainer.train_and_evaluate(c, tmp_path, stop_after=3)
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  c.model.num_layers = 3
  with pytest.raises(config_lib.ConfigError, match="different model"):
    trainer.train_and_evaluate(c, tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_corrupt_checkpoint_gives_clear_error_and_is_kept(tmp_path, data_dir):
  c = tiny_config(data_dir)
  trainer.train_and_evaluate(c, tmp_path, stop_after=3)
  step_dir = tmp_path / "checkpoints" / "3"
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0
           and "state" in p.parts and not p.name.startswith("_")]
  assert files
  for path in files:
    path.write_bytes(b"\x00garbage" * 3)
  with pytest.raises(CheckpointError, match=r"checkpoint step 3 .* cannot be restored"):
    trainer.train_and_evaluate(c, tmp_path)
  assert step_dir.exists()
