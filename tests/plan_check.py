"""Run in a fresh process with 8 simulated CPU devices (see test_plan.py).

For each layout in argv (JSON list of mesh-size dicts), plans a small model's train step
and compiles the whole step on that mesh; prints both totals per layout as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

from dsv2_jax import config as config_lib  # noqa: E402
from dsv2_jax import plan  # noqa: E402
from dsv2_jax.parallel import sharding  # noqa: E402


def small_config(model: str):
  c = config_lib.default_config()
  c.model.update(d_model=128, num_layers=4, num_heads=4, ffn_hidden=512, max_seq_len=128)
  if model == "moe":
    c.model.moe.update(num_experts=4, top_k=2, gate_hidden=32, expert_hidden=256)
  c.data.update(seq_len=128, batch_size=8)
  c.eval.batch_size = 8
  return c


def main():
  out = {}
  for model, text in json.loads(sys.argv[1]):
    sizes = sharding.parse_mesh(text)
    result = plan.check_against_compile(small_config(model), sizes)
    out[f"{text}/{model}"] = {k: v for k, v in result.items() if k != "plan"}
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
