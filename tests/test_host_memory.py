"""keep_freed_memory: XLA:CPU's buffers stop page-faulting fresh memory on every call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO

# Runs 5 train steps of a small byte LM (after 3 to warm up) and prints the minor page
# faults of those 5 steps, in KiB.
PROBE = textwrap.dedent("""
    import resource
    from dsv2_jax import host_memory
    print("kept", host_memory.keep_freed_memory())
    from experiments import common, throughput
    config = throughput.with_dtype(common.load_config(
        "configs/tiny.py:width=128,layers=2,seq_len=256,batch_size=16"), "float32")
    step = throughput.JaxStep(config)
    step.run(3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step.run(5)
    print("faults_kib", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4)
""")


def probe(malloc: str) -> dict[str, str]:
  env = {**os.environ, "DSV2_JAX_MALLOC": malloc, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True).stdout
  return dict(line.split(" ", 1) for line in out.strip().splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
  kept, system = probe("keep"), probe("system")
  if kept["kept"] != "True":
    pytest.skip("not glibc: mallopt unavailable")
  assert system["kept"] == "False"
  # glibc's defaults fault each step's buffers in again (about 200 MB per step here).
  assert int(system["faults_kib"]) > 200 * 1024, system
  assert int(kept["faults_kib"]) < int(system["faults_kib"]) / 2, (kept, system)
