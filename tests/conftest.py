"""Shared fixtures: a prepared local-corpus data dir (TFDS), one per test session.

Shared helpers (the repository path, small configs) live in tests/helpers.py.
"""

from __future__ import annotations

import jax
import pytest

# Tiny models compile faster than they run; skip XLA's heavy passes in tests.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """One TFDS data dir for the whole session (shared by xdist workers; prep is locked)."""
  root = tmp_path_factory.getbasetemp()
  if root.name.startswith("popen-gw"):  # xdist: share across workers.
    root = root.parent
  return str(root / "tfds")
