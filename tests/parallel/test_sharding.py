"""Mesh construction, presets and the logical-axis rules (layouts: test_layouts.py)."""

from __future__ import annotations

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec

from dsv2_jax.parallel import sharding


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


@pytest.mark.parametrize("text,expected", [
    ("fsdp", dict(fsdp=-1)),
    ("pp4_dp", dict(data=-1, stage=4)),
    ("data=2,tensor=4", dict(data=2, tensor=4)),
    (" expert=4 , data=-1 ", dict(data=-1, expert=4)),
])
def test_parse_mesh_accepts_presets_and_axis_sizes(text, expected):
  assert sharding.parse_mesh(text) == {a: expected.get(a, 1) for a in sharding.MESH_AXES}


@pytest.mark.parametrize("text", ["tensr=2", "data=two", "data", "zero9"])
def test_parse_mesh_explains_bad_input(text):
  with pytest.raises(sharding.MeshError, match="AXIS=SIZE"):
    sharding.parse_mesh(text)


def test_presets_name_only_mesh_axes():
  for sizes in sharding.PRESETS.values():
    assert set(sizes) <= set(sharding.MESH_AXES)


def test_axes_that_do_not_divide_a_dimension_are_dropped():
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "tensor"))
  spec = PartitionSpec(("data", "tensor"), "tensor", None)
  # 6 rows: data (2) divides, data x tensor (8) does not; 3 columns: tensor (4) does not.
  assert sharding.fit_spec(spec, (6, 3, 5), mesh) == PartitionSpec("data", None, None)
  assert sharding.fit_spec(spec, (16, 8, 5), mesh) == PartitionSpec(
      ("data", "tensor"), "tensor", None)
