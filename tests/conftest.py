"""Shared fixtures: a prepared local-corpus data dir and tiny configs."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import pytest

from dsv2_jax import config as config_lib

# Tiny models compile faster than they run; skip XLA's heavy passes in tests.
jax.config.update("jax_disable_most_optimizations", True)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """One TFDS data dir for the whole session (shared by xdist workers; prep is locked)."""
  root = tmp_path_factory.getbasetemp()
  if root.name.startswith("popen-gw"):  # xdist: share across workers.
    root = root.parent
  return str(root / "tfds")


def tiny_config(data_dir: str) -> ml_collections.ConfigDict:
  """A 2-layer, width-32 byte LM on the Lee news corpus: compiles and runs in seconds."""
  c = config_lib.default_config()
  c.model.update(d_model=32, num_layers=2, num_heads=4, ffn_hidden=64, max_seq_len=128)
  c.data.update(dataset="lee_news", data_dir=data_dir, seq_len=32, batch_size=4)
  c.train.update(steps=6, warmup_steps=2, learning_rate=3e-3, log_every=2, eval_every=0,
                 checkpoint_every=3, async_checkpointing=False)
  c.eval.update(batch_size=32, max_batches=2)
  c.sample.update(max_new_tokens=8)
  return c


@pytest.fixture
def tiny(data_dir):
  return tiny_config(data_dir)
