"""Distributed inference (SPEC 3.2): tensor x pipeline parallel generation, side by side.

Generates greedily from the same prompts with `--config`'s model (default configs/tiny.py:
4 layers, random init) on 8 simulated CPU devices under several layouts, and on one
device, and records per layout:
  equal_to_single   the generated tokens equal the single-device run's
  memory            per-device bytes from `memory_analysis` of the compiled generate
                    program (arguments + outputs - aliased + temp)
  collective_bytes  per-device bytes of each collective kind over one generate call and
                    per decode step (one new token, compiled alone), read from the
                    compiled HLO with loop trip counts (`parallel.collectives`)
  bubble_fraction   (S - 1) / (M + S - 1) of the GPipe schedule (S stages, M microbatches)
  latency           median ms per generate call and per token, layouts interleaved,
                    and the ratio to one device. On CPU the devices are simulated: all 8
                    share the same 2 cores, so latency here measures overheads, not the
                    speedup of real accelerators (the article's 1200 -> 380 ms claim
                    needs 8 real accelerators).

  python -m experiments.parallel_inference --out docs/figures/parallel_inference.json
  python -m experiments.parallel_inference --config configs/tiny.py:moe=8x2 --out /tmp/pi_moe.json
  python -m experiments.parallel_inference --quick --out /tmp/parallel_inference.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Simulate 8 CPU devices (set before JAX starts).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dsv2_jax.infer.generate import generate, init_cache  # noqa: E402
from dsv2_jax.model.transformer import build_model  # noqa: E402
from dsv2_jax.parallel import collectives, pipeline, sharding  # noqa: E402
from dsv2_jax.train.optimizer import build_optimizer  # noqa: E402
from dsv2_jax.train.state import create_train_state  # noqa: E402
from experiments import common  # noqa: E402

LAYOUTS = {
    "single": "data=1",
    "tp4_dp2": "data=2,tensor=4",
    "pp4_dp2": "data=2,stage=4",
    "tp2_pp2_dp2": "data=2,tensor=2,stage=2",
    "tp2_pp4": "tensor=2,stage=4",
}


class Layout:
  """One layout's model, parameters (same seed everywhere) and compiled programs."""

  def __init__(self, name: str, args):
    self.name = name
    c = common.load_config(args.config, args.overrides["config"])
    c.model.update(scan_unroll=1)  # A rolled layer scan, as the pipeline stages run it.
    c.mesh = ml_collections.ConfigDict(sharding.parse_mesh(LAYOUTS[name]))
    devices = jax.devices()[:1] if name == "single" else jax.devices()
    self.mesh = sharding.make_mesh(c.mesh, devices)
    self.sizes = dict(self.mesh.shape)
    self.model = build_model(c.model)
    state, _ = create_train_state(self.model, build_optimizer(c.train), 0, args.prompt_len,
                                  self.mesh)
    self.params = state.params
    self.prompts = jnp.asarray(np.random.RandomState(0).randint(
        0, 256, (args.batch, args.prompt_len)), jnp.int32)
    self.kwargs = dict(max_new_tokens=args.new_tokens, temperature=0.0, top_k=0,
                       mesh=None if name == "single" else self.mesh)
    self.rng = jax.random.PRNGKey(0)
    self.compiled = generate.lower(self.model, self.params, self.prompts, self.rng,
                                   **self.kwargs).compile()

  def run(self) -> np.ndarray:
    return np.asarray(self.compiled(self.params, self.prompts, self.rng))

  def time_ms(self) -> float:
    return 1e3 * common.timed(lambda: self.compiled(self.params, self.prompts, self.rng))

  def decode_step_hlo(self, args) -> str:
    """HLO of one decode step (a token for every row, given a filled cache)."""
    cache = init_cache(self.model, args.batch, args.prompt_len + args.new_tokens)
    token = self.prompts[:, :1]

    def step(params, cache, token):
      with sharding.activation_rules(self.mesh):
        return self.model.apply({"params": params, "cache": cache}, token, decode=True,
                                mutable=["cache"])

    return jax.jit(step).lower(self.params, cache, token).compile().as_text()

  def record(self, args) -> dict:
    m = self.compiled.memory_analysis()
    stages = self.sizes["stage"]
    ways = self.sizes["data"] * self.sizes["fsdp"] * self.sizes["expert"]
    micro = pipeline.default_microbatches(stages, args.batch, ways) if stages > 1 else 1
    return {
        "layout": self.name, "mesh": self.sizes,
        "memory_bytes_per_device": int(m.argument_size_in_bytes + m.output_size_in_bytes
                                       - m.alias_size_in_bytes + m.temp_size_in_bytes),
        "temp_bytes_per_device": int(m.temp_size_in_bytes),
        "collective_bytes_per_generate": collectives.collective_bytes(self.compiled.as_text()),
        "collective_bytes_per_decode_step": collectives.collective_bytes(
            self.decode_step_hlo(args)),
        "pipeline_microbatches": micro,
        "bubble_fraction": pipeline.bubble_fraction(stages, micro) if stages > 1 else 0.0,
    }


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  common.add_config_flag(parser, "configs/tiny.py")
  parser.add_argument("--batch", type=int, default=8, help="prompts generated together")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds, interleaved")
  parser.add_argument("--layouts", default=",".join(LAYOUTS))
  parser.add_argument("--quick", action="store_true", help="short prompts, 2 rounds")
  args = common.parse_args(parser, argv)
  if args.quick:
    args.prompt_len, args.new_tokens, args.rounds = 16, 8, 2
  names = args.layouts.split(",")
  if names[0] != "single":
    names.insert(0, "single")

  layouts = {}
  for name in names:
    start = time.perf_counter()
    layouts[name] = Layout(name, args)
    print(f"{name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
  reference = layouts["single"].run()
  samples = common.interleaved({name: layout.time_ms for name, layout in layouts.items()},
                               args.rounds)

  records = []
  for name, layout in layouts.items():
    record = layout.record(args)
    record["equal_to_single"] = bool(np.array_equal(layout.run(), reference))
    record["generate_ms"] = statistics.median(samples[name])
    record["generate_ms_samples"] = samples[name]
    record["ms_per_token"] = record["generate_ms"] / args.new_tokens
    records.append(record)
  base = records[0]
  for record in records:
    record["latency_vs_single"] = record["generate_ms"] / base["generate_ms"]
    record["memory_vs_single"] = (record["memory_bytes_per_device"]
                                  / base["memory_bytes_per_device"])
    step = record["collective_bytes_per_decode_step"]
    print(f"{record['layout']:>12}: equal {record['equal_to_single']}  "
          f"memory/device {record['memory_vs_single']:.2f}x  "
          f"collectives/decode step {sum(step[k] for k in collectives.KINDS) / 1024:.1f} KiB  "
          f"bubble {record['bubble_fraction']:.2f}  latency {record['latency_vs_single']:.2f}x")

  result = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "simulated_devices": jax.default_backend() == "cpu",
      "note": ("CPU: the 8 devices are simulated on the same cores; latency ratios show "
               "overheads, not accelerator speedups.") if jax.default_backend() == "cpu"
      else "",
      "command": common.command("experiments.parallel_inference", argv),
      "config": args.config, "config_overrides": args.overrides["config"], "batch": args.batch,
      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
      "records": records,
  }
  common.write(result, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
