"""keep_freed_memory: XLA:CPU's buffers stop page-faulting fresh memory on every call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO

# Runs a jitted function with a 64 MiB result 10 times (each result freed before the next
# call) and prints the minor page faults of those calls, in KiB.
PROBE = textwrap.dedent("""
    import resource, sys
    from dsv2_jax import host_memory
    print("kept", host_memory.keep_freed_memory())
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.outer(jnp.exp(x), x))
    x = jnp.ones((4096,))
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
      f(x).block_until_ready()
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
  # 10 calls x 64 MiB: glibc's defaults fault most of it in again each call.
  assert int(system["faults_kib"]) > 100 * 1024
  assert int(kept["faults_kib"]) < int(system["faults_kib"]) / 4
