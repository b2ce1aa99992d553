"""Multi-process runs: JAX's own runtime (`jax.distributed`), one process per host.

Every host runs the same command; `jax.distributed.initialize` connects them and
`jax.devices()` then lists every host's devices, so the mesh, the shardings and the
train step are the ones a single host uses. Each process feeds only its own rows
(`sharding.put_batch`) and reads its own share of the documents.

  TPU pod slice, or a cluster whose launcher sets the environment (SLURM, Open MPI,
  Kubernetes): `python -m dsv2_jax train ... --distributed` on every host; JAX detects
  the coordinator, the process count and this process's id.
  Anywhere else (GPU hosts by hand, or CPU processes on one machine):
  `--distributed --coordinator_address HOST0:PORT --num_processes N --process_id I`.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the multi-process runtime; None arguments are detected from the environment.

  Must run before anything touches a device. CPU collectives between processes go
  over gloo (GPU and TPU use their own interconnect).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
