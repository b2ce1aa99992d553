"""One process of a multi-process run, or the single-process reference (test_multiprocess.py).

  python -m tests.parallel.multiprocess_check --num_processes 2 --process_id I --port P
  python -m tests.parallel.multiprocess_check --num_processes 1

Either way the run has 8 CPU devices in all (4 per process with 2 processes) and a
data=2 x fsdp=2 x tensor=2 mesh across them, and trains 3 steps of a tiny model on the
same global batches. Process 0 prints the losses and gradient norms as one JSON line
after "RESULT " (gloo writes its own lines to stdout).
"""

import argparse
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={8 // args.num_processes}")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dsv2_jax.model.transformer import build_model  # noqa: E402
from dsv2_jax.parallel import distributed, sharding  # noqa: E402
from dsv2_jax.train.optimizer import build_optimizer  # noqa: E402
from dsv2_jax.train.state import create_train_state  # noqa: E402
from dsv2_jax.train.step import jit_train_step  # noqa: E402
from tests.helpers import small_config  # noqa: E402

if args.num_processes > 1:
  distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)
jax.config.update("jax_disable_most_optimizations", True)  # Tiny model: compile fast.

ROWS, LENGTH = 8, 32


def global_batch(mesh, seed: int) -> dict[str, jax.Array]:
  """Every process builds the same host batch and places the rows its devices hold."""
  rng = np.random.RandomState(seed)
  host = {"inputs": rng.randint(0, 256, (ROWS, LENGTH)).astype(np.int32),
          "targets": rng.randint(0, 256, (ROWS, LENGTH)).astype(np.int32),
          "weights": np.ones((ROWS, LENGTH), np.float32)}
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, spec, lambda index, v=v: v[index])
          for k, v in host.items()}


def main():
  c = small_config(ffn_hidden=64, max_seq_len=LENGTH)
  c.train.update(steps=10, warmup_steps=1, learning_rate=1e-2)
  c.mesh = ml_collections.ConfigDict(sharding.parse_mesh("data=2,fsdp=2,tensor=2"))
  mesh = sharding.make_mesh(c.mesh)
  model, tx = build_model(c.model), build_optimizer(c.train)
  state, shardings = create_train_state(model, tx, 0, LENGTH, mesh)
  step = jit_train_step(model, tx, mesh, shardings)
  losses, grad_norms = [], []
  for seed in range(3):
    state, metrics = step(state, global_batch(mesh, seed))
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  if jax.process_index() == 0:
    print("RESULT " + json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
               "local_devices": jax.local_device_count(), "losses": losses,
               "grad_norms": grad_norms}))


if __name__ == "__main__":
  main()
