"""Remat policies: compiled memory, compiled FLOPs and step time of one train step.

For every `model.remat_policy` (SPEC 2.2, dsv2_jax/model/remat.py) this compiles and runs
one optimizer step of two models, each `--config` plus config arguments:
  dense     `--config` (default configs/tiny.py:seq_len=1024,batch_size=2: the README
            job's 2,048 tokens per step)
  dsa_moe   the same plus `attention=dsa,moe=8x2` (DSA; 8 experts, top-2, expert hidden
            256: the dense model's active FFN parameters)
with `remat=POLICY` appended, and records, each also as a ratio to `none`:
  temp_bytes  `memory_analysis().temp_size_in_bytes`, layers under nn.scan with
              scan_unroll=1 (a fully unrolled scan lets XLA:CPU schedule the recompute
              early and the saving vanishes; `--unroll` measures that)
  flops       `cost_analysis()['flops']` of the same step with unscanned layers, since a
              scan body's FLOPs count once
  step_ms     median milliseconds per step of the scanned step, policies interleaved
XLA counts a while-loop body once, and the GMoE experts (tiled dispatch) and DSA's global
attention run in loops: the dsa_moe and paper FLOPs miss those iterations (LOOP_NOTE).
The `custom` case keeps the layered names plus V: the price of recomputing V.

`paper` adds the per-device memory of `--paper_config` (configs/paper_175b.py: bf16,
4,096 tokens per sequence) on 8 simulated devices as a tensor-parallel mesh (tensor=8, one
sequence per replica), from abstract shapes: the parameters and optimizer state per device
from their shardings; temp memory compiled at 1 and 2 layers and extrapolated linearly to
45 (the layers are a scan, so temp memory is affine in depth); FLOPs likewise, from the
lowered HLO of the unscanned step (within 3% of the compiled count on the small models;
compiling it is too heavy here). It runs in a subprocess, which simulates the devices.

  python -m experiments.remat_memory --out docs/figures/remat_memory.json
  python -m experiments.remat_memory --models "" --out docs/figures/remat_memory_paper.json
  python -m experiments.remat_memory --config configs/tiny.py:seq_len=512,batch_size=4,layers=2 --out /tmp/remat.json
  python -m experiments.remat_memory --quick --out /tmp/remat_quick.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dsv2_jax import config as config_lib
from dsv2_jax import plan
from dsv2_jax.model import remat
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.train import state as state_lib
from dsv2_jax.train.optimizer import build_optimizer
from experiments import common

POLICIES = remat.POLICIES
CUSTOM_NAMES = "value"  # Added to remat.LAYERED for the `custom` case.
MODELS = {"dense": "", "dsa_moe": "attention=dsa,moe=8x2"}  # Config arguments.
QUICK = "seq_len=256,batch_size=8,layers=2"  # --quick: appended to --config.
PAPER_DEVICES = 8
LOOP_NOTE = ("flops: XLA's cost_analysis counts a while-loop body once. The dsa_moe and "
             "paper_175b models run the GMoE expert matmuls (tiled dispatch) and DSA's global "
             "attention in loops, so their flops miss all but one iteration of each loop; "
             "step_ms is the measure of their compute.")


def model_config(args, model: str, policy: str, scan: bool, unroll: int):
  """`--config` + the model's arguments + `remat=policy`; the layers scanned or written out."""
  spec = common.with_args(args.config, QUICK if args.quick else "", MODELS[model],
                          f"remat={policy}")
  c = common.load_config(spec, args.overrides["config"], validate=False)
  c.model.update(scan_layers=scan, scan_unroll=unroll)
  if policy == "custom":
    c.model.remat_names = ",".join(remat.LAYERED + (CUSTOM_NAMES,))
  config_lib.validate(c)
  return c


def lower_step(config, mesh) -> jax.stages.Lowered:
  """The train step lowered on abstract shapes (activation rules on): nothing allocated."""
  return plan.lower_train_step(config, mesh)


def flops_of(stage: jax.stages.Lowered | jax.stages.Compiled) -> float:
  cost = stage.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


class Case:
  """One compiled train step on random tokens: its compiled stats and a timer."""

  def __init__(self, config):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    self.compiled = lower_step(config, mesh).compile()
    model, tx = build_model(config.model), build_optimizer(config.train)
    self.state, _ = state_lib.create_train_state(model, tx, 0, config.data.seq_len, mesh)
    self.batch = common.random_batch(config, mesh)

  def memory(self) -> dict[str, int]:
    m = self.compiled.memory_analysis()
    return {"temp_bytes": int(m.temp_size_in_bytes),
            "host_temp_bytes": int(m.host_temp_size_in_bytes)}

  def step_ms(self, steps: int) -> float:
    """Milliseconds per step over `steps` consecutive steps (one host sync at the end)."""

    def steps_in_a_row():
      for _ in range(steps):
        self.state, metrics = self.compiled(self.state, self.batch)
      return self.state, metrics

    return 1e3 * common.timed(steps_in_a_row) / steps


def unscanned_flops(config, compiled: bool) -> float:
  """FLOPs of the step with every layer written out (compiled, or from the lowered HLO)."""
  lowered = lower_step(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  return flops_of(lowered.compile() if compiled else lowered)


def measure_models(args) -> list[dict[str, Any]]:
  """Compiles every (model, policy); times them interleaved; one record each."""
  cases, records = {}, []
  for model in args.models.split(","):
    for policy in args.policies.split(","):
      start = time.perf_counter()
      config = model_config(args, model, policy, True, args.unroll)
      scanned = Case(config)
      unscanned = model_config(args, model, policy, False, 1)
      record = {"model": model, "policy": policy, "seq_len": config.data.seq_len,
                "batch_size": config.data.batch_size, "num_layers": config.model.num_layers,
                "scan_unroll": args.unroll, **scanned.memory(),
                "flops": unscanned_flops(unscanned, compiled=not args.quick),
                "flops_from": "lowered HLO" if args.quick else "compiled",
                "flops_scan_body_once": flops_of(scanned.compiled)}
      if policy == "custom":
        record["remat_names"] = "layered + " + CUSTOM_NAMES
      print(f"{model}/{policy}: temp {record['temp_bytes'] / 2**20:.1f} MiB, "
            f"{record['flops'] / 1e9:.2f} GFLOP ({time.perf_counter() - start:.0f} s)",
            flush=True)
      cases[(model, policy)] = scanned
      records.append(record)
  samples = common.interleaved(
      {key: functools.partial(case.step_ms, args.steps) for key, case in cases.items()},
      args.rounds)
  for record in records:
    times = samples[(record["model"], record["policy"])]
    record["step_ms"] = statistics.median(times)
    record["step_ms_samples"] = times
  add_ratios(records, ("temp_bytes", "flops", "step_ms"), "model")
  return records


def add_ratios(records: list[dict[str, Any]], fields: tuple[str, ...], group: str) -> None:
  """Adds `<field>_vs_none` to each record, against its group's `none` record."""
  for record in records:
    base = next((r for r in records if r[group] == record[group] and r["policy"] == "none"),
                None)
    for field in fields:
      if base is not None and base[field]:
        record[f"{field}_vs_none"] = record[field] / base[field]


# --- paper scale (runs in a subprocess with simulated devices) -------------------------------

def paper_memory(spec: str, policy: str, num_layers: int, seq_len: int) -> dict[str, Any]:
  """Per-device bytes of one train step of the paper config `spec` on a tensor=8 mesh."""
  c = common.load_config(common.with_args(spec, f"remat={policy}"))
  full_layers = c.model.num_layers
  c.model.update(num_layers=num_layers, max_seq_len=seq_len)
  c.data.update(batch_size=1, seq_len=seq_len)
  c.mesh.update(data=1, tensor=PAPER_DEVICES)
  config_lib.validate(c)
  mesh = sharding.make_mesh(c.mesh)

  compiled = lower_step(c, mesh).compile()
  m = compiled.memory_analysis()
  c.model.scan_layers = False  # FLOPs of every layer; lowering only (compiling is heavy).
  flops = flops_of(lower_step(c, mesh))
  full_model = c.model.copy_and_resolve_references()
  full_model.num_layers = full_layers
  full_state = state_lib.abstract_state(build_model(full_model), build_optimizer(c.train),
                                        seq_len)
  return {"temp_bytes": int(m.temp_size_in_bytes), "flops": flops, "full_layers": full_layers,
          "state_bytes": per_device_bytes(full_state, mesh)}


def per_device_bytes(abstract: Any, mesh) -> int:
  """Bytes one device holds of a tree of boxed abstract arrays under the logical rules."""
  shardings = sharding.logical_shardings(abstract, mesh)
  leaves = zip(jax.tree.leaves(nn.meta.unbox(abstract)), jax.tree.leaves(shardings))
  return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize for a, s in leaves)


def paper_records(spec: str, policies: list[str], seq_len: int) -> list[dict[str, Any]]:
  """Runs `paper_memory` at 1 and 2 layers per policy in a subprocess; extrapolates."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={PAPER_DEVICES}")
  records = []
  for policy in policies:
    out = subprocess.run(
        [sys.executable, "-m", "experiments.remat_memory", "--paper_config", spec,
         "--paper_part", f"{policy},{seq_len}", "--out", "-"],
        env=env, cwd=common.REPO, check=True, capture_output=True, text=True).stdout
    got = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    full = got[1]["full_layers"]
    at_depth = lambda key: got[1][key] + (full - 1) * (got[2][key] - got[1][key])  # noqa: E731
    per_layer = got[2]["temp_bytes"] - got[1]["temp_bytes"]
    temp = at_depth("temp_bytes")
    records.append({
        "model": "paper_175b", "policy": policy, "mesh": f"tensor={PAPER_DEVICES}",
        "seq_len": seq_len, "sequences_per_replica": 1, "num_layers": full,
        "temp_bytes_1_layer": got[1]["temp_bytes"], "temp_bytes_2_layers": got[2]["temp_bytes"],
        "temp_bytes_per_layer": per_layer, "temp_bytes": temp,
        "state_bytes": got[1]["state_bytes"], "total_bytes": temp + got[1]["state_bytes"],
        "flops": at_depth("flops"), "flops_from": "lowered HLO, 1 and 2 layers unscanned"})
    print(f"paper_175b/{policy}: temp {temp / 2**30:.1f} GiB per device "
          f"({per_layer / 2**30:.2f} GiB per layer), state "
          f"{got[1]['state_bytes'] / 2**30:.1f} GiB", flush=True)
  add_ratios(records, ("temp_bytes", "total_bytes", "flops"), "model")
  return records


# --- output ---------------------------------------------------------------------------------

def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
  summary = {}
  for r in records:
    key = f"{r['model']}/{r['policy']}"
    summary[key] = {k: round(r[k], 3) for k in
                    ("temp_bytes_vs_none", "flops_vs_none", "step_ms_vs_none") if k in r}
  return summary


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.8))
  markers = {"dense": "o", "dsa_moe": "s", "paper_175b": "^"}  # Paper: FLOPs when counted.
  for model, marker in markers.items():
    rows = [r for r in result["records"] if r["model"] == model and "flops_vs_none" in r]
    if not rows:
      continue
    ax.scatter([r["flops_vs_none"] for r in rows], [r["temp_bytes_vs_none"] for r in rows],
               marker=marker, s=50, label=f"{model} (seq {rows[0]['seq_len']})")
    points: dict[tuple[float, float], list[str]] = {}  # Policies that land together.
    for r in rows:
      name = "custom (layered + V)" if r["policy"] == "custom" else r["policy"]
      points.setdefault((round(r["flops_vs_none"], 2), round(r["temp_bytes_vs_none"], 2)),
                        []).append(name)
    for (x, y), names in points.items():
      ax.annotate(" = ".join(names), (x, y), textcoords="offset points",
                  xytext=(6, 6 if marker == "o" else -10), fontsize=8)
  ax.scatter([1.18], [0.58], marker="*", s=160, color="k", label="article: -42% memory, +18%")
  ax.set_xlabel("train-step FLOPs / none (cost_analysis, unscanned)")
  ax.set_ylabel("temp memory / none (memory_analysis, scanned)")
  ax.set_title(f"Remat policies, one train step ({result['device']})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file ('-' for stdout).")
  common.add_config_flag(parser, "configs/tiny.py:seq_len=1024,batch_size=2",
                         help_text="The dense model.")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--policies", default=",".join(POLICIES))
  parser.add_argument("--unroll", type=int, default=1, help="scan_unroll of the scanned step.")
  parser.add_argument("--rounds", type=int, default=5, help="Interleaved timing rounds.")
  parser.add_argument("--steps", type=int, default=3, help="Steps timed per round.")
  parser.add_argument("--paper_policies", default=None,
                      help="Policies for the paper-scale memory (default none,full,dots,"
                      "layered; '' skips it, as --quick does).")
  parser.add_argument("--paper_config", default="configs/paper_175b.py", metavar="FILE[:args]")
  parser.add_argument("--paper_seq_len", type=int, default=4096)
  parser.add_argument("--quick", action="store_true",
                      help=f"none and layered with {QUICK} appended to --config, 1 round, "
                      "FLOPs from the lowered HLO; no paper scale (< 2 min).")
  parser.add_argument("--paper_part", help=argparse.SUPPRESS)  # Internal: policy,seq_len.
  args = common.parse_args(parser, argv)
  if args.paper_part:
    policy, seq_len = args.paper_part.split(",")
    print(json.dumps({layers: paper_memory(args.paper_config, policy, layers, int(seq_len))
                      for layers in (1, 2)}))
    return
  if args.quick:
    args.rounds, args.steps = 1, 1
    args.policies = "none,layered"
  if args.paper_policies is None:
    args.paper_policies = "" if args.quick else "none,full,dots,layered"
  records = measure_models(args) if args.models else []
  if args.paper_policies:
    records += paper_records(args.paper_config, args.paper_policies.split(","),
                             args.paper_seq_len)
  result = {"command": common.command("experiments.remat_memory", argv),
            "device": jax.devices()[0].device_kind, "config": args.config,
            "config_overrides": args.overrides["config"], "notes": [LOOP_NOTE],
            "records": records, "summary": summarise(records)}
  common.write(result, args.out, lambda path: plot(result, path))


if __name__ == "__main__":
  main(sys.argv[1:])
