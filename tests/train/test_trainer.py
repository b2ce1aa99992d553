"""train_and_evaluate: learns real text, resumes bit-identically, and loses nothing on a
non-finite step, a signal, an unreadable checkpoint or a failed checkpoint write."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsv2_jax import config as config_lib
from dsv2_jax.data.tokenizer import ByteTokenizer
from dsv2_jax.infer.generate import generate
from dsv2_jax.parallel import sharding
from dsv2_jax.train import evaluate as evaluate_lib
from dsv2_jax.train import trainer
from dsv2_jax.train.checkpoint import CheckpointError
from dsv2_jax.train.metrics import read_metrics
from dsv2_jax.train.state import abstract_state
from tests.helpers import REPO, tiny_config

_TIMING = ("tokens_per_s", "model_tflops_per_s")


def final_params(workdir):
  config = trainer.load_config(workdir)
  run = trainer.Run(config, workdir)
  state, _, data_state = run.initial_state()
  return jax.device_get(state), data_state


def assert_same_run(a_dir, b_dir):
  """Same final state, data position, metrics and held-out figures, bit for bit."""
  (a, a_data), (b, b_data) = final_params(a_dir), final_params(b_dir)
  assert int(a.step) == int(b.step)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert a_data == b_data
  assert comparable(read_metrics(a_dir)) == comparable(read_metrics(b_dir))
  assert (a_dir / "eval.json").read_text() == (b_dir / "eval.json").read_text()


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
  # The sample is the prompt and exactly the tokens the sampler draws with the run's seed.
  state, _ = final_params(tmp_path)
  prompt = ByteTokenizer().encode(c.sample.prompt)[None]
  new = generate(trainer.Run(c, tmp_path).model, state.params, prompt,
                 jax.random.PRNGKey(c.seed), max_new_tokens=c.sample.max_new_tokens,
                 temperature=c.sample.temperature, top_k=c.sample.top_k)
  continuation = ByteTokenizer().decode(np.asarray(new[0]))
  assert len(continuation) >= 1
  assert (tmp_path / "sample.txt").read_text() == c.sample.prompt + continuation + "\n"
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def resumable_config(data_dir):
  c = tiny_config(data_dir)
  c.model.dropout_rate = 0.1  # The RNG must be restored too.
  c.train.update(steps=6, checkpoint_every=2, log_every=1)
  return c


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
  """A run of `resumable_config` that was never stopped: the reference for resumes."""
  workdir = tmp_path_factory.mktemp("straight")
  trainer.train_and_evaluate(resumable_config(data_dir), workdir)
  return workdir


def test_final_eval_reads_the_whole_split_unless_capped(tmp_path, data_dir):
  c = tiny_config(data_dir)
  c.train.update(steps=2, checkpoint_every=0)
  c.sample.max_new_tokens = 0
  whole = trainer.train_and_evaluate(c, tmp_path / "whole")
  c.eval.final_max_batches = 1
  capped = trainer.train_and_evaluate(c, tmp_path / "capped")
  assert capped["tokens"] <= c.eval.batch_size * c.data.seq_len < whole["tokens"]


def test_stop_and_resume_is_bit_identical(tmp_path, data_dir, straight):
  c = resumable_config(data_dir)
  resumed = tmp_path / "resumed"
  assert trainer.train_and_evaluate(c, resumed, stop_after=3) == trainer.Stopped(3, "stop_after")
  assert isinstance(trainer.train_and_evaluate(c, resumed), dict)
  assert_same_run(straight, resumed)


def test_resume_with_a_different_model_is_refused(tmp_path, data_dir):
  c = tiny_config(data_dir)
  trainer.train_and_evaluate(c, tmp_path, stop_after=3)
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  c.model.num_layers = 3
  with pytest.raises(config_lib.ConfigError, match="different model"):
    trainer.train_and_evaluate(c, tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def spoil(step_dir, how):
  """Makes a checkpoint step unreadable: garbage array files, or a partial write."""
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0
           and "state" in p.parts and not p.name.startswith("_")]
  assert files
  for path in files:
    if how == "garbage":
      path.write_bytes(b"\x00garbage" * 3)
    else:
      path.unlink()


@pytest.mark.parametrize("how", ["garbage", "partial"])
def test_unreadable_latest_checkpoint_falls_back_and_is_kept(tmp_path, data_dir, straight,
                                                             how):
  c = resumable_config(data_dir)
  run = tmp_path / "run"
  trainer.train_and_evaluate(c, run, stop_after=4)
  spoil(run / "checkpoints" / "4", how)
  # Training resumes from step 2 (the newest that restores), ends exactly as the
  # uninterrupted run, and keeps the bad step, moved aside so that step 4 can be rewritten.
  assert isinstance(trainer.train_and_evaluate(c, run), dict)
  assert (run / trainer.UNREADABLE_DIR / "4").is_dir()
  assert_same_run(straight, run)


def test_eval_and_generate_restore_past_unreadable_steps_and_leave_them(tmp_path, data_dir):
  c = tiny_config(data_dir)
  c.train.update(checkpoint_every=2)
  trainer.train_and_evaluate(c, tmp_path, stop_after=4)
  listing = lambda: sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))  # noqa: E731
  spoil(tmp_path / "checkpoints" / "4", "garbage")
  before = listing()
  # What `eval` and `generate` load: the newest step that restores; the bad one stays.
  state, _, _ = trainer.Run(c, tmp_path).initial_state()
  assert int(state.step) == 2 and listing() == before
  spoil(tmp_path / "checkpoints" / "2", "partial")
  before = listing()
  with pytest.raises(CheckpointError, match=r"no checkpoint under .* can be restored"):
    trainer.train_and_evaluate(c, tmp_path)
  assert listing() == before  # Nothing moved or deleted when nothing restores.


def test_non_finite_steps_stop_the_run_with_finite_checkpoints(tmp_path, data_dir):
  c = tiny_config(data_dir)
  c.train.update(learning_rate=1e4, steps=40, checkpoint_every=5, log_every=5)
  with pytest.raises(trainer.TrainingDiverged, match=r"steps \d+-\d+ each had a non-finite"):
    trainer.train_and_evaluate(c, tmp_path)
  metrics = [m for m in read_metrics(tmp_path) if "loss" in m]
  assert metrics[-1]["skipped_steps"] >= c.train.max_skipped_steps
  assert not (tmp_path / "eval.json").exists()
  run = trainer.Run(c, tmp_path)
  steps = run.checkpointer.all_steps()
  assert steps and max(steps) < metrics[-1]["step"]
  for step in steps:  # Every checkpoint written holds finite parameters.
    state, _ = run.checkpointer.restore(step, *restore_target(run))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def restore_target(run):
  """(shardings, abstract state) of `run`, the arguments of `Checkpointer.restore`."""
  boxed = abstract_state(run.model, run.tx, run.config.data.seq_len)
  return sharding.logical_shardings(boxed, run.mesh), nn.meta.unbox(boxed)


def _slow_finalize(monkeypatch, seconds=1.0):
  """Makes every async checkpoint take `seconds` longer to complete."""
  original = ocp.CompositeCheckpointHandler.finalize

  def finalize(self, directory):
    time.sleep(seconds)
    return original(self, directory)
  monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", finalize)


def test_error_path_waits_for_the_checkpoint_in_flight(tmp_path, data_dir, monkeypatch):
  c = tiny_config(data_dir)
  c.train.update(async_checkpointing=True, checkpoint_every=3, eval_every=4)
  _slow_finalize(monkeypatch)

  def broken_eval(*args, **kwargs):
    raise RuntimeError("eval failed")
  monkeypatch.setattr(evaluate_lib, "evaluate", broken_eval)
  with pytest.raises(RuntimeError, match="eval failed"):  # At step 4, step 3 still saving.
    trainer.train_and_evaluate(c, tmp_path)
  assert ocp.utils.checkpoint_steps(tmp_path / "checkpoints") == [3]


@pytest.mark.parametrize("use_async", [pytest.param(False, marks=pytest.mark.slow), True])
def test_failed_checkpoint_write_is_one_error_and_keeps_the_previous(tmp_path, data_dir,
                                                                      monkeypatch, use_async):
  c = tiny_config(data_dir)
  c.train.update(async_checkpointing=use_async)
  original = ocp.CompositeCheckpointHandler.finalize

  def read_only_disk(self, directory):  # Runs in orbax's save thread when async.
    if pathlib.Path(str(directory)).name.split(".")[0] == "6":  # Step 6's (temporary) dir.
      raise OSError(errno.EROFS, "Read-only file system", str(directory))
    return original(self, directory)
  monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", read_only_disk)
  with pytest.raises(CheckpointError, match=r"could not write checkpoint step 6 .* step 3 is "
                     r"intact"):
    trainer.train_and_evaluate(c, tmp_path)
  monkeypatch.undo()
  assert trainer.Run(c, tmp_path).checkpointer.all_steps() == [3]
  state, _ = final_params(tmp_path)
  assert int(state.step) == 3


def _cli_train(workdir, *extra):
  args = [sys.executable, "-m", "dsv2_jax", "train", "--workdir", str(workdir), *PREEMPT_ARGS,
          *extra]
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))


PREEMPT_ARGS = [
    "--config", f"{REPO / 'configs' / 'tiny.py'}:steps=200,seq_len=32,batch_size=4,"
    "dataset=lee_news", "--config.model.d_model=32", "--config.model.num_layers=1",
    "--config.model.ffn_hidden=64", "--config.model.dropout_rate=0.1",
    "--config.train.log_every=1", "--config.train.checkpoint_every=0",
    "--config.eval.max_batches=2", "--config.sample.max_new_tokens=4",
]


# SIGINT takes the same handler as SIGTERM: -m slow.
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=lambda s: s.name)
def test_signal_checkpoints_and_resume_is_bit_identical(tmp_path, data_dir, sig):
  data = f"--config.data.data_dir={data_dir}"
  run = tmp_path / "run"
  proc = _cli_train(run, data)
  deadline = time.time() + 300
  while time.time() < deadline:  # Signal once training is under way.
    metrics = run / "metrics.jsonl"
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  step = int(out.split("stopped at step ")[1].split()[0])
  assert f"({sig.name}) with a checkpoint; run the same command to resume" in out
  assert 5 <= step < 200
  assert trainer.Run(trainer.load_config(run), run).checkpointer.all_steps() == [step]
  if sig == signal.SIGINT:
    return  # The resume is the same for both; checked once.
  resumed = _cli_train(run, data)
  straight = _cli_train(tmp_path / "straight", data)
  for p in (resumed, straight):
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
  assert_same_run(tmp_path / "straight", run)
