"""Shared output of the benchmarks: the JSON result, its plot beside it, the summary on stdout."""

from __future__ import annotations

import json
import os
from typing import Any, Callable


def write(result: dict[str, Any], out: str, plot: Callable[[str], None]) -> None:
  """Writes `result` to `out` ('-': stdout only) and `plot(path)` to out's .png sibling."""
  text = json.dumps(result, indent=2)
  if out == "-":
    print(text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  plot(os.path.splitext(out)[0] + ".png")
  print(json.dumps(result["summary"], indent=2))
