"""2 processes x 4 CPU devices on loopback (`jax.distributed`) train like 1 process x 8;
the documented CLI launch trains across 2 processes (slow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(*args: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "tests.parallel.multiprocess_check", *args],
                          stdout=subprocess.PIPE,
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


@pytest.mark.slow
def test_cli_trains_across_two_processes(tmp_path, data_dir):
  """The documented launch: the same `train --distributed` command on each process."""
  port, workdir = str(free_port()), tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "dsv2_jax", "train", "--config", "configs/tiny.py:steps=4",
       "--config.train.log_every=2", "--config.eval.max_batches=1",
       "--config.sample.max_new_tokens=8", f"--config.data.data_dir={data_dir}",
       "--workdir", str(workdir), "--mesh", "data=2,fsdp=2", "--distributed",
       "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
       "--process_id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env, cwd=REPO) for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "held-out" in outs[0][0] and "held-out" not in outs[1][0]  # Process 0 reports.
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines][:4] == [1, 2, 3, 4]  # Written once.
  assert (workdir / "eval.json").exists() and (workdir / "sample.txt").exists()
