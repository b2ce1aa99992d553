"""Collective bytes read from HLO text: loop trip counts multiply, shapes give bytes."""

from __future__ import annotations

import pytest

from dsv2_jax.parallel import collectives

HLO = """
HloModule example

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %cp = f32[4,8]{1,0} collective-permute(%x), source_target_pairs={{0,1},{1,0}}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %cp)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: bf16[16,2], y: f32[4,8]) -> f32[4,8] {
  %x = bf16[16,2]{1,0} parameter(0)
  %ag = bf16[32,2]{1,0} all-gather(%x), dimensions={0}
  %y = f32[4,8]{1,0} parameter(1)
  %ar = f32[4,8]{1,0} all-reduce(%y), to_apply=%add
  %init = (s32[], f32[4,8]) tuple(%i0, %ar)
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %r = f32[4,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_bytes_and_counts_follow_shapes_and_trip_counts():
  got = collectives.collective_bytes(HLO)
  assert got["all-gather"] == 32 * 2 * 2  # bf16 result.
  assert got["all-reduce"] == 4 * 8 * 4
  assert got["collective-permute"] == 7 * 4 * 8 * 4  # Inside a 7-trip loop.
  assert got["counts"] == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 0,
                           "all-to-all": 0, "collective-permute": 7}
  assert got["unknown_trip_loops"] == 0


def test_loop_without_trip_count_counts_once_and_is_reported():
  got = collectives.collective_bytes(HLO.replace(', backend_config={"known_trip_count":{"n":"7"}}',
                                                 ""))
  assert got["collective-permute"] == 4 * 8 * 4
  assert got["unknown_trip_loops"] == 1


def test_text_without_entry_is_an_error():
  with pytest.raises(ValueError, match="ENTRY"):
    collectives.collective_bytes("HloModule empty\n")
