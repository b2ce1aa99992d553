"""The planner against whole compiles, on 8 simulated CPU devices (docs/results.md 6.3).

  python -m experiments.plan_vs_compile LAYOUTS_JSON [--out FILE]

LAYOUTS_JSON is a list of [model, mesh] pairs, model `dense` or `moe` (`small_config`),
mesh as `--mesh` takes it, e.g.
  python -m experiments.plan_vs_compile '[["dense","data=2,fsdp=2,tensor=2"],["moe","fsdp=2,expert=4"]]'
For each, `dsv2_jax.plan` plans the train step's per-device memory and the whole step is
compiled on that mesh; the JSON (stdout, or --out) holds both totals and their ratio per
layout. tests/test_plan.py holds the ratio within 10%.
"""

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

from dsv2_jax import config as config_lib  # noqa: E402
from dsv2_jax import plan  # noqa: E402
from dsv2_jax.parallel import sharding  # noqa: E402
from experiments import common  # noqa: E402


def small_config(model: str):
  """Width 128, 4 layers, 8 x 128 tokens per step; `moe`: 4 experts, top-2."""
  c = config_lib.default_config()
  c.model.update(d_model=128, num_layers=4, num_heads=4, ffn_hidden=512, max_seq_len=128)
  if model == "moe":
    c.model.moe.update(num_experts=4, top_k=2, gate_hidden=32, expert_hidden=256)
  c.data.update(seq_len=128, batch_size=8)
  c.eval.batch_size = 8
  return c


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("layouts", help='JSON list of [model, mesh] pairs, e.g. '
                      '\'[["dense","data=2,fsdp=2,tensor=2"]]\'.')
  parser.add_argument("--out", default="-", help="JSON file ('-': stdout).")
  args = parser.parse_args(argv)
  cases = {}
  for model, text in json.loads(args.layouts):
    result = plan.check_against_compile(small_config(model), sharding.parse_mesh(text))
    cases[f"{text}/{model}"] = {k: v for k, v in result.items() if k != "plan"}
  common.write({"command": common.command("experiments.plan_vs_compile", argv),
                "cases": cases}, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
