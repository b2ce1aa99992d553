"""The latency model (dsv2_jax/latency.py) against measured times on this machine.

The one place the model can be checked end to end without accelerators: one device, this
CPU as `Hardware` with its peak and memory bandwidth measured in the same run
(`latency.cpu_hardware`: an n x n matmul's FLOP/s; the read bandwidth of a sum over a
512 MiB f32 array), f32 weights (4 bytes). For each model (`--configs`, random init):

  prefill  one forward pass over 1 x `--prompt` tokens (jitted `model.apply`);
  decode   seconds per generated token: (generate `--new` tokens - generate 8 tokens) /
           (`--new` - 8), greedy, KV cache, after the same prompt (the prefill cancels);
           `decode` with per-layer parameters (the default, `generate.unstacked`),
           `decode_scanned` with the scanned stack (unstack=False).

Reported: predicted / measured for each, with the model's bound (compute or memory).
Cases are interleaved over `--rounds` rounds, median.

  python -m experiments.latency_check --out docs/figures/latency_check.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax import latency
from dsv2_jax.infer.generate import generate
from dsv2_jax.model.transformer import build_model
from experiments import common
from experiments.throughput import jax_peak_flops

CONFIGS = ("configs/tiny.py:width=512", "configs/tiny.py:width=1024")


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
  """Bytes/s of a jitted sum over a `mib` MiB f32 array (read once, nothing written)."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return x.size * 4 / common.best_time(lambda: total(x), repeats)


class Case:
  def __init__(self, spec: str, prompt: int, new: int):
    self.config = common.load_config(spec).model
    self.model = build_model(self.config)
    tokens = np.random.RandomState(0).randint(0, 256, (1, prompt)).astype(np.int32)
    self.tokens = jnp.asarray(tokens)
    self.params = nn.meta.unbox(self.model.init(jax.random.PRNGKey(0), self.tokens[:, :8])
                                )["params"]
    self.prompt, self.new = prompt, new
    self.forward = jax.jit(lambda p, t: self.model.apply({"params": p}, t))
    self.forward(self.params, self.tokens).block_until_ready()
    self.gens = {(n, u): self._generate(n, u) for n in (8, new) for u in (True, False)}

  def _generate(self, n: int, unstack: bool):
    run = lambda: np.asarray(generate(self.model, self.params, self.tokens,  # noqa: E731
                                      jax.random.PRNGKey(0), max_new_tokens=n,
                                      temperature=0.0, unstack=unstack))
    run()
    return run

  def prefill_s(self) -> float:
    return common.timed(lambda: self.forward(self.params, self.tokens).block_until_ready())

  def decode_s(self, unstack: bool = True) -> float:
    long = common.timed(self.gens[(self.new, unstack)])
    short = common.timed(self.gens[(8, unstack)])
    return (long - short) / (self.new - 8)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--prompt", type=int, default=512)
  parser.add_argument("--new", type=int, default=72)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="width 128, prompt 64, 1 round.")
  args = parser.parse_args(argv)
  if args.quick:
    args.configs, args.prompt, args.new, args.rounds = "configs/tiny.py", 64, 16, 1
  cases = {spec: Case(spec, args.prompt, args.new) for spec in args.configs.split(",")}
  timers = {"peak": lambda: jax_peak_flops("float32"), "bandwidth": read_bandwidth}
  for spec, case in cases.items():
    timers[f"{spec}|prefill"] = case.prefill_s
    timers[f"{spec}|decode"] = case.decode_s
    timers[f"{spec}|decode_scanned"] = lambda case=case: case.decode_s(unstack=False)
  samples = common.interleaved(timers, args.rounds)
  peak, bandwidth = (statistics.median(samples[k]) for k in ("peak", "bandwidth"))
  hw = latency.cpu_hardware(peak, bandwidth)
  rows = []
  for spec, case in cases.items():
    measured = {kind: statistics.median(samples[f"{spec}|{kind}"])
                for kind in ("prefill", "decode", "decode_scanned")}
    predicted = {
        "prefill": latency.estimate(case.config, hw, latency.Layout(), args.prompt,
                                    bytes_per_param=4),
        "decode": latency.estimate(case.config, hw, latency.Layout(), 1,
                                   context=args.prompt + args.new // 2, bytes_per_param=4)}
    predicted["decode_scanned"] = predicted["decode"]
    for kind in ("prefill", "decode", "decode_scanned"):
      rows.append({"config": spec, "phase": kind, "measured_s": measured[kind],
                   "predicted_s": predicted[kind]["total_s"],
                   "predicted_over_measured": predicted[kind]["total_s"] / measured[kind],
                   "bound": predicted[kind]["per_layer"]["bound"],
                   "parameters": int(sum(x.size for x in jax.tree.leaves(case.params)))})
  result = {"command": common.command("experiments.latency_check", argv),
            "peak_flops": peak, "read_bytes_per_s": bandwidth, "prompt": args.prompt,
            "new_tokens": args.new, "rows": rows,
            "summary": {f"{r['config']} {r['phase']}": round(r["predicted_over_measured"], 3)
                        for r in rows}}
  common.write(result, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
