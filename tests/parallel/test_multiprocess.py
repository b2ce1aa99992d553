"""2 processes x 4 CPU devices on loopback (`jax.distributed`) train like 1 process x 8."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.conftest import REPO

CHECK = REPO / "tests" / "parallel" / "multiprocess_check.py"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(*args: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, str(CHECK), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def finish(proc: subprocess.Popen) -> dict | None:
  """Waits for `proc`; its RESULT line as a dict (None if it printed none)."""
  try:
    out, err = proc.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, err[-3000:]
  results = [line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")]
  return json.loads(results[0]) if results else None


def test_two_processes_train_like_one():
  port = str(free_port())
  procs = [launch("--num_processes", "2", "--process_id", str(i), "--port", port)
           for i in range(2)]
  multi, other = [finish(p) for p in procs]
  assert other is None  # Only process 0 reports.
  single = finish(launch("--num_processes", "1"))
  assert (multi["processes"], multi["devices"], multi["local_devices"]) == (2, 8, 4)
  assert (single["processes"], single["devices"]) == (1, 8)
  for key in ("losses", "grad_norms"):
    for a, b in zip(multi[key], single[key]):
      assert abs(a - b) <= 1e-5 * abs(b), (key, multi[key], single[key])
