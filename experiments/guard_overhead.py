"""What the non-finite guard costs: the train step with and without it, in one run.

The guard (`dsv2_jax.train.step.train_step`, docs/reliability.md) checks that the loss,
the gradient norm and every new parameter are finite and otherwise keeps the old
parameters and optimizer state (one select per state leaf). The trainer also reads the
previous step's skip counter each step (one scalar, one step in flight). Three cases,
interleaved over rounds of `--steps` steps each, each from its own state:

  unguarded        skip_non_finite=False, no host read (the step before this change)
  guarded          the guarded step, no host read
  guarded_lagged   the guarded step + the trainer's read of the step before (as trained)

Reported: median seconds per step, ratios to `unguarded`, and the compiled steps' FLOPs,
bytes accessed (XLA's cost analysis; a loop body counts once) and temp memory. The
paper-scale memory with the guard is in docs/results.md 5.3 (experiments.remat_memory).

  python -m experiments.guard_overhead --out docs/figures/guard_overhead.json
  python -m experiments.guard_overhead --config configs/tiny.py --out /tmp/guard_tiny.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax

from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.train.optimizer import build_optimizer
from dsv2_jax.train.state import create_train_state
from dsv2_jax.train.step import jit_train_step
from experiments import common

REFERENCE = "configs/tiny.py:width=256,seq_len=256,batch_size=8"  # experiments.throughput's.


def run_case(step_fn, state, batch, steps: int, lagged_read: bool):
  """Runs `steps` steps; returns (new state, seconds per step)."""
  start = time.perf_counter()
  previous = None
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    if lagged_read and previous is not None:
      int(jax.device_get(previous["consecutive_skips"]))
    previous = metrics
  jax.block_until_ready(state)
  return state, (time.perf_counter() - start) / steps


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_config_flag(parser, REFERENCE)
  parser.add_argument("--steps", type=int, default=10, help="steps per case per round")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default="-")
  args = common.parse_args(parser, argv)
  config = common.load_config(args.config, args.overrides["config"])

  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, tx = build_model(config.model), build_optimizer(config.train)
  batch = common.random_batch(config, mesh)
  cases: dict[str, Any] = {}
  costs = {}
  for name, guard, lagged in (("unguarded", False, False), ("guarded", True, False),
                              ("guarded_lagged", True, True)):
    state, shardings = create_train_state(model, tx, config.seed, config.data.seq_len, mesh)
    step_fn = jit_train_step(model, tx, mesh, shardings, skip_non_finite=guard)
    compiled = step_fn.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    costs[name] = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
                   "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
    cases[name] = {"fn": step_fn, "state": state, "lagged": lagged}

  def measure(name):
    case = cases[name]
    case["state"], seconds = run_case(case["fn"], case["state"], batch, args.steps,
                                      case["lagged"])
    return seconds

  samples = common.interleaved({name: (lambda n=name: measure(n)) for name in cases},
                               args.rounds)
  median = {name: statistics.median(s) for name, s in samples.items()}
  base = median["unguarded"]
  summary = {name: {"seconds_per_step": median[name], "vs_unguarded": median[name] / base,
                    "bytes_vs_unguarded": costs[name]["bytes_accessed"]
                    / costs["unguarded"]["bytes_accessed"],
                    "temp_bytes_vs_unguarded": costs[name]["temp_bytes"]
                    / costs["unguarded"]["temp_bytes"]} for name in median}
  result = {"command": common.command("experiments.guard_overhead", argv),
            "config": args.config, "steps_per_round": args.steps, "rounds": args.rounds,
            "samples": samples, "cost_analysis": costs, "summary": summary}
  common.write(result, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
