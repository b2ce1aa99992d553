"""Keep freed host memory for reuse, so XLA:CPU does not page-fault its buffers each step.

XLA:CPU allocates every execution's buffers with malloc and frees them when it returns.
glibc gives large blocks back to the kernel (mmap'ed blocks are unmapped; the per-thread
heaps XLA's worker threads allocate from are trimmed), so the next step touches fresh
pages that the kernel must fault in and zero: about 350 MB per train step at the
reference shape, a fifth of the step (docs/results.md section 11.4). `keep_freed_memory`
asks glibc (mallopt) to serve every block from one heap and keep what is freed:
M_ARENA_MAX = 1, M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB. The cost: resident memory stays
at the process's peak, and threads share one malloc arena, which makes XLA's
(multi-threaded) compiles about 40% slower: a good trade for a training run or a
benchmark, a bad one for the compile-bound test suite (tests/conftest.py opts out).

The CLI (`python -m dsv2_jax`) and the experiments call it at start-up, before JAX starts
its threads. `DSV2_JAX_MALLOC=system` keeps glibc's defaults; other C libraries are left
alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>.
_KEEP = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def keep_freed_memory() -> bool:
  """Sets the mallopt options above; True when glibc accepted them all."""
  if os.environ.get("DSV2_JAX_MALLOC", "keep") == "system":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # Only glibc has both. # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(option, value) == 1 for option, value in _KEEP)
