"""Shared fixtures: a prepared local-corpus data dir (TFDS), one per test session.

Shared helpers (the repository path, small configs) live in tests/helpers.py.
"""

from __future__ import annotations

import os

import jax
import pytest

# Tests are compile-bound: keep glibc's malloc defaults in every test process and the
# subprocesses they start. dsv2_jax.host_memory's setting (taken by the CLI and the
# experiments) makes steps faster but XLA's compiles ~40% slower (docs/performance.md);
# tests/test_host_memory.py sets it explicitly where it is the subject.
os.environ.setdefault("DSV2_JAX_MALLOC", "system")

# Tiny models compile faster than they run; skip XLA's heavy passes in tests.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """One TFDS data dir for the whole session (shared by xdist workers; prep is locked)."""
  root = tmp_path_factory.getbasetemp()
  if root.name.startswith("popen-gw"):  # xdist: share across workers.
    root = root.parent
  return str(root / "tfds")
