"""Collective traffic of a compiled program, read from its HLO text.

`collective_bytes(compiled.as_text())` sums, per collective kind, the bytes of every
collective's result on one device, times how often it runs: a collective inside a
`while` body counts once per iteration, using the trip count XLA records in the
loop's backend config (`known_trip_count`); nested loops multiply. A loop without a
known trip count counts once and is reported in `unknown_trip_loops`.
"""

from __future__ import annotations

import collections
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")
_WHILE = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CALLS = re.compile(r"\b(?:to_apply|calls|true_computation|false_computation|"
                    r"branch_computations|condition)=\{?%?([\w.\-]+)")


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    count = 1
    for d in filter(None, dims.split(",")):
      count *= int(d)
    total += count * _BYTES[dtype]
  return total


def _kind(line: str) -> str | None:
  for kind in KINDS:
    if f" {kind}(" in line or f" {kind}-start(" in line:
      return kind
  return None


def collective_bytes(hlo: str) -> dict[str, object]:
  """Per-device bytes moved by each collective kind over one run of the program.

  Returns:
    {kind: bytes, ..., 'counts': {kind: executions}, 'unknown_trip_loops': n}.
  """
  bodies: dict[str, list[str]] = collections.defaultdict(list)
  current, entry = None, None
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line.strip())
    if match:
      current = match.group(1)
      if line.lstrip().startswith("ENTRY"):
        entry = current
      continue
    if current is not None:
      bodies[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text.")

  totals = {kind: 0 for kind in KINDS}
  counts = {kind: 0 for kind in KINDS}
  unknown = 0

  def visit(name: str, times: int, seen: tuple[str, ...]) -> None:
    nonlocal unknown
    if name in seen:
      return
    for line in bodies.get(name, ()):
      kind = _kind(line)
      if kind is not None and "=" in line:
        result = line.split("=", 1)[1].split(f" {kind}", 1)[0]
        totals[kind] += times * _shape_bytes(result)
        counts[kind] += times
      loop = _WHILE.search(line)
      if loop:
        trip = _TRIP.search(line)
        unknown += trip is None
        visit(loop.group(1), times * (int(trip.group(1)) if trip else 1), seen + (name,))
      for callee in _CALLS.findall(line):
        visit(callee, times, seen + (name,))

  visit(entry, 1, ())
  return {**totals, "counts": counts, "unknown_trip_loops": unknown}
