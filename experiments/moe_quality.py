"""GMoE quality: a small MoE against a dense model of equal active parameters, same budget.

Each variant is `--config` (default configs/tiny.py: D = 128, 4 layers, byte tokens, the
Wikipedia excerpt) plus one config argument, trained with the same data order, steps,
seed and learning rate through `train_and_evaluate`:
  dense         the config as given: SwiGLU FFN of hidden 512 in every layer
  moe           `moe=ExK` (--moe, default 8x2): E experts, top-k, expert hidden 512 / k
                (the same active FFN parameters), 2-layer MLP gate, Switch
                load-balancing loss (weight 0.01) and z-loss
  moe_lossfree  `moe=ExK,lossfree`: the same MoE balanced by DeepSeek-V3's bias instead
                of the loss
We report held-out loss, perplexity and bits/byte over the whole validation split, and the
expert load on the last training steps: the busiest expert's share relative to the mean
(max over layers; 1 = perfectly even) and the normalised load entropy.

  python -m experiments.moe_quality --out docs/figures/moe_quality.json
  python -m experiments.moe_quality --config configs/tiny.py:steps=300 --moe 16x4 --out /tmp/moe.json
  python -m experiments.moe_quality --quick --out /tmp/moe_quality_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax

from dsv2_jax import info
from dsv2_jax.train import trainer
from experiments import common

VARIANTS = {  # Name -> configs/tiny.py arguments appended to --config ({moe}: --moe).
    "dense": "",
    "moe": "moe={moe}",
    "moe_lossfree": "moe={moe},lossfree",
}


def variant_config(name: str, args):
  spec = common.with_args(args.config, VARIANTS[name].format(moe=args.moe), args.quick_args)
  c = common.load_config(spec, args.overrides["config"])
  c.data.data_dir = args.data_dir
  c.sample.max_new_tokens = 0  # Protocol: one final eval over the whole split, no sample.
  c.train.update(checkpoint_every=0, eval_every=0)
  return c


def load_stats(workdir: str, tail: float = 0.1) -> dict[str, float]:
  """Mean of the MoE load metrics over the last `tail` of the logged training steps."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  rows = [r for r in rows if "moe/load_max_over_mean" in r]
  if not rows:
    return {}
  last = rows[-max(1, int(len(rows) * tail)):]
  keys = ("moe/load_max_over_mean", "moe/load_entropy", "moe/aux_loss", "moe/dropped_fraction")
  out = {k.split("/")[1]: sum(r[k] for r in last) / len(last) for k in keys}
  out["load_max_over_mean_worst"] = max(r["moe/load_max_over_mean"] for r in last)
  out["logged_steps"] = [last[0]["step"], last[-1]["step"]]
  return out


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  common.add_config_flag(parser, "configs/tiny.py")
  parser.add_argument("--moe", default="8x2", help="EXPERTSxTOP_K of the MoE variants.")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--data_dir", default="~/tensorflow_datasets")
  parser.add_argument("--workdir", default="runs/moe_quality")
  parser.add_argument("--resume", default="",
                      help="A run folder (WORKDIR/TIMESTAMP) whose finished variants are reused.")
  parser.add_argument("--quick", action="store_true", help="20 steps of each variant.")
  args = common.parse_args(parser, argv)
  args.quick_args = "steps=20" if args.quick else ""
  args.data_dir = os.path.expanduser(args.data_dir)
  moe = variant_config("moe", args)  # Steps and experts for the record.
  root = args.resume or os.path.join(args.workdir, time.strftime("%Y%m%d-%H%M%S"))
  results: dict[str, Any] = {}
  for name in args.variants.split(","):
    workdir = os.path.join(root, name)
    saved = os.path.join(workdir, "result.json")
    if args.resume and os.path.exists(saved):  # Finished in the run being resumed.
      with open(saved) as f:
        results[name] = json.load(f)
      print(f"{name} (from {saved}): {json.dumps(results[name])}", flush=True)
      continue
    c = variant_config(name, args)
    report = info.model_info(c)
    start = time.perf_counter()
    result = trainer.train_and_evaluate(c, workdir)
    result.update(train_seconds=time.perf_counter() - start, total_params=report["total_params"],
                  active_params=report["active_params"], load=load_stats(workdir))
    with open(saved, "w") as f:
      json.dump(result, f)
    results[name] = result
    print(f"{name}: {json.dumps(result)}", flush=True)
  summary = {f"perplexity_ratio_{name}_over_dense": results[name]["perplexity"]
             / results["dense"]["perplexity"] for name in results
             if "dense" in results and name != "dense"}
  out = {"command": common.command("experiments.moe_quality", argv),
         "device": jax.devices()[0].device_kind, "config": args.config,
         "config_overrides": args.overrides["config"], "steps": moe.train.steps,
         "experts": moe.model.moe.num_experts, "top_k": moe.model.moe.top_k, "results": results,
         "summary": summary}
  common.write(out, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
