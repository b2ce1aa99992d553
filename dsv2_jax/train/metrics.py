"""Metric sinks: `metrics.jsonl` (one JSON object per line) and TensorBoard events.

At start, lines logged after the step the run starts from are dropped (all of them
for a fresh start): the resumed run logs those steps again, with the same values, so
the file reads as one run.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping


def _plain(value: Any) -> Any:
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/`.

  enabled=False (every process but the first of a multi-process run) writes nothing.
  """

  def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0,
               tensorboard: bool = True, enabled: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._file, self._tb = None, None
    if not enabled:
      return
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    if self._file is None:
      return
    record = {"step": int(step)}
    record.update({f"{prefix}{k}": _plain(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
