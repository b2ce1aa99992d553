"""Mesh construction, logical-axis rules, and sharded training == single device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from dsv2_jax.parallel import sharding
from tests.conftest import REPO


def mesh_cfg(**sizes):
  return ml_collections.ConfigDict(sizes)


def test_fill_axis_takes_the_remaining_devices():
  assert sharding.mesh_shape(mesh_cfg(data=-1, tensor=2), 8) == dict(
      data=4, fsdp=1, tensor=2, expert=1, stage=1)


@pytest.mark.parametrize("sizes,devices,message", [
    (dict(data=3), 8, "has 3 devices but 8 are available"),
    (dict(data=-1, tensor=3), 8, "does not divide the 8 devices"),
    (dict(data=-1, fsdp=-1), 8, "only one mesh axis may be -1"),
    (dict(pipeline=2), 2, "unknown"),
])
def test_bad_mesh_is_explained(sizes, devices, message):
  with pytest.raises(sharding.MeshError, match=message):
    sharding.mesh_shape(mesh_cfg(**sizes), devices)


def test_rules_only_name_known_mesh_axes():
  for _, target in sharding.LOGICAL_AXIS_RULES:
    targets = target if isinstance(target, tuple) else (target,)
    assert all(t is None or t in sharding.MESH_AXES for t in targets)


def test_sharded_training_matches_single_device_on_8_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "parallel" / "multidevice_check.py")],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert out["devices"] == 8
  single = out["losses"]["single"]
  for name, losses in out["losses"].items():
    for a, b in zip(losses, single):
      assert abs(a - b) <= 1e-4 * abs(b), (name, losses, single)
  # Parameters (and their Adam moments) are really sharded by the logical rules.
  shards = out["shards"]
  assert shards["single"]["query"] == [2, 32, 4, 8]
  assert shards["dp8"]["query"] == [2, 32, 4, 8]  # Data parallel: replicated.
  assert shards["fsdp8"]["query"] == [2, 4, 4, 8]  # embed over fsdp.
  assert shards["fsdp8"]["mu_up"] == [2, 4, 64]
  assert shards["dp2_fsdp2_tp2"]["up"] == [2, 16, 32]  # embed over fsdp, mlp over tensor.
