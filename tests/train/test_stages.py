"""Stages: `train.init_from` starts a run from another run's final parameters.

Checked: the child starts from exactly the parent's parameters (across a mesh change,
in a process with 4 simulated devices), with a fresh optimizer; the workdir records
its parent and `info` shows the chain; shape mismatches and missing parents are one
line; a resumed child ignores init_from. A reward model (scalar head) from a language
model takes the trunk bit-equal and keeps its freshly initialised score head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsv2_jax.train import stages, trainer
from tests.helpers import REPO, tiny_config


def _state(workdir):
  run = trainer.Run(trainer.load_config(workdir), workdir)
  return jax.device_get(run.initial_state()[0])


@pytest.fixture(scope="module")
def parent(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("stage1")
  c = tiny_config(data_dir)
  c.sample.max_new_tokens = 0
  trainer.train_and_evaluate(c, workdir)
  return workdir


def child_config(data_dir, parent_dir, **model):
  """Stage 2 of the tiny config: twice the length, position interpolation x2."""
  c = tiny_config(data_dir)
  c.sample.max_new_tokens = 0
  c.data.update(seq_len=64, packing="document")
  c.model.update(rope_scaling="linear", rope_scale=2.0, **model)
  c.train.update(init_from=str(parent_dir), steps=2, checkpoint_every=0, learning_rate=1e-9,
                 weight_decay=0.0)
  return c


def test_child_starts_from_the_parent_and_records_the_chain(tmp_path, data_dir, parent):
  child = tmp_path / "stage2"
  trainer.train_and_evaluate(child_config(data_dir, parent), child)
  before, after = _state(parent), _state(child)
  assert int(after.step) == 2
  # A 1e-9 learning rate moves nothing visible: the child's parameters are the parent's.
  for x, y in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  # Fresh optimizer: Adam's step count is the child's, not the parent's 6 + 2.
  counts = [int(x) for x in jax.tree.leaves(after.opt_state) if np.ndim(x) == 0]
  assert counts and max(counts) == 2
  record = json.loads((child / stages.PARENT_FILE).read_text())
  assert record["step"] == 6 and record["config_hash"] == stages.config_hash(parent)
  chain = stages.lineage(child)
  assert [e["path"] for e in chain] == [str(parent.resolve()), str(child.resolve())]
  assert chain[1]["init_from"]["step"] == 6 and chain[1]["rope_scaling"] == "linear"
  proc = subprocess.run([sys.executable, "-m", "dsv2_jax", "info", "--workdir", str(child)],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "stages (oldest first)" in proc.stdout and "from step 6 of run 1" in proc.stdout


def test_shape_mismatch_and_missing_parent_are_one_line(tmp_path, data_dir, parent):
  c = child_config(data_dir, parent, d_model=64)
  with pytest.raises(stages.StageError, match=r"embedder/embedding is \[258, 32\] in the "
                     r"parent and \[258, 64\] here"):
    trainer.train_and_evaluate(c, tmp_path / "wide")
  assert not list((tmp_path / "wide").glob("checkpoints/*"))
  c = child_config(data_dir, tmp_path / "nowhere")
  with pytest.raises(stages.StageError, match="config.json not found"):
    trainer.train_and_evaluate(c, tmp_path / "orphan")


def test_resumed_child_ignores_init_from(tmp_path, data_dir, parent):
  child = tmp_path / "stage2"
  c = child_config(data_dir, parent)
  trainer.train_and_evaluate(c, child, stop_after=1)
  after_one = _state(child)
  (parent / "config.json").rename(parent / "config.json.away")  # The parent is not read again.
  try:
    trainer.train_and_evaluate(c, child)
  finally:
    (parent / "config.json.away").rename(parent / "config.json")
  assert int(_state(child).step) == 2 and int(after_one.step) == 1


def test_init_from_across_meshes(tmp_path):
  """Parent trained FSDP over 4 devices, child on data 2 x tensor 2: same parameters."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-m", "tests.train.stages_mesh_check", str(tmp_path)],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"devices": 4, "equal": True}


def reward_config(data_dir, parent_dir, **model):
  """A reward model (scalar head) on review pairs, from the tiny LM `parent_dir`."""
  c = tiny_config(data_dir)
  c.sample.max_new_tokens = 0
  c.model.update(head="scalar", **model)
  c.data.update(dataset="rotten_tomatoes", format="preference", packing="none")
  c.train.update(init_from=str(parent_dir), steps=2, checkpoint_every=0, learning_rate=1e-9,
                 weight_decay=0.0)
  return c


def _trunk(params):
  return {k: v for k, v in params.items() if k not in stages.HEAD_PARAMS}


def test_scalar_child_restores_the_trunk_bit_equal_and_keeps_its_fresh_head(tmp_path, data_dir,
                                                                            parent):
  run = trainer.Run(reward_config(data_dir, parent), tmp_path / "reward")
  state, shardings, _ = run.initial_state()  # Fresh: what training starts from.
  fresh = jax.device_get(state.params)
  params, record = stages.init_params(str(parent), state.params, shardings.params)
  params, before = jax.device_get(params), _state(parent).params
  assert "head" in before and "head" not in params and record["new_head"] == ["score_head"]
  assert set(params) == set(fresh)
  trunk, parent_trunk = _trunk(params), _trunk(before)
  assert jax.tree.structure(trunk) == jax.tree.structure(parent_trunk)
  for x, y in zip(jax.tree.leaves(trunk), jax.tree.leaves(parent_trunk)):
    np.testing.assert_array_equal(x, y)
  # The trunk really moved away from a fresh init (the comparison can fail).
  assert any(not np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(trunk), jax.tree.leaves(_trunk(fresh))))
  np.testing.assert_array_equal(params["score_head"]["w"], fresh["score_head"]["w"])


def test_reward_model_trains_from_a_language_model(tmp_path, data_dir, parent):
  """End to end: check_parent, pairs, the Bradley-Terry step, held-out accuracy, parent.json."""
  child = tmp_path / "reward"
  trainer.train_and_evaluate(reward_config(data_dir, parent), child)
  after = _state(child)
  assert int(after.step) == 2
  before = _trunk(_state(parent).params)
  for x, y in zip(jax.tree.leaves(_trunk(after.params)), jax.tree.leaves(before)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  record = json.loads((child / stages.PARENT_FILE).read_text())
  assert record["new_head"] == ["score_head"] and record["step"] == 6
  result = json.loads((child / "eval.json").read_text())
  assert 0.0 <= result["pairwise_accuracy"] <= 1.0 and np.isfinite(result["loss"])


def test_scalar_child_of_another_width_names_the_parameter(tmp_path, data_dir, parent):
  c = reward_config(data_dir, parent, d_model=64)
  with pytest.raises(stages.StageError, match=r"embedder/embedding is \[258, 32\] in the "
                     r"parent and \[258, 64\] here"):
    trainer.train_and_evaluate(c, tmp_path / "wide")
  assert not list((tmp_path / "wide").glob("checkpoints/*"))
  # init_params itself (past check_parent) refuses too, before reading any checkpoint.
  run = trainer.Run(c, tmp_path / "wide2")
  state, shardings, _ = run.initial_state()
  with pytest.raises(stages.StageError, match=r"embedder/embedding is \[258, 32\]"):
    stages.init_params(str(parent), state.params, shardings.params)
