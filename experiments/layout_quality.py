"""Held-out quality of the DeepSeek-V2 layout against the article's, at equal active size.

Each variant is a config trained with `train_and_evaluate` for its default budget
(1,000 steps of 16 x 128 byte tokens on the Wikipedia excerpt, configs/tiny.py's
schedule), once per seed of `--seeds` (the seed sets the init and the data order):
  article_gmoe      configs/tiny.py:moe=8x2 -- MHA, 8 experts top-2 of hidden 256, MLP gate
  deepseek_v2       configs/deepseek_v2.py:tiny -- MLA (latent 64, RoPE 16, query latent
                    96), 1 dense layer, then 2 shared + 32 routed experts of hidden 64,
                    top-6 within 2 of 4 groups, weights x 16
  deepseek_v2_lite  configs/deepseek_v2_lite.py:tiny -- full-rank queries, greedy top-6,
                    weights x 1
  article_dsa_gmoe  configs/tiny.py:attention=dsa,moe=8x2 -- the article's whole design
All have 1.14-1.16M active parameters (`info`). Reported: held-out bits/byte over the whole
validation split per seed, the mean and its standard error, and each variant's difference
from article_gmoe over the seeds both ran. Runs are resumable: a workdir with eval.json is
read, not retrained (`--workdir`, one folder per variant and seed).

  python -m experiments.layout_quality --out docs/figures/layout_quality.json
  python -m experiments.layout_quality --variants article_gmoe,deepseek_v2 --seeds 0 \
      --steps 50 --out /tmp/layout_quality.json   # a smoke run
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from dsv2_jax import info
from experiments import common

VARIANTS = {
    "article_gmoe": "configs/tiny.py:moe=8x2",
    "deepseek_v2": "configs/deepseek_v2.py:tiny",
    "deepseek_v2_lite": "configs/deepseek_v2_lite.py:tiny",
    "article_dsa_gmoe": "configs/tiny.py:attention=dsa,moe=8x2",
}
BASELINE = "article_gmoe"


def mean_se(values: list[float]) -> tuple[float, float | None]:
  if len(values) < 2:
    return values[0], None
  return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def main(argv: list[str]) -> None:
  parser = common.chain_parser(__doc__, "runs/layout_quality")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=0, help="train.steps (0: the configs')")
  args = parser.parse_args(argv)
  data_dir, root = common.chain_dirs(args)
  seeds = [int(s) for s in args.seeds.split(",")]
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  result: dict[str, Any] = {"variants": {}, "command": common.command(
      "experiments.layout_quality", argv)}
  for name in names:
    spec = common.with_args(VARIANTS[name], f"steps={args.steps}" if args.steps else "")
    report = info.model_info(common.load_config(spec))
    runs = {}
    for seed in seeds:  # Seed after seed per variant: each run resumes on its own.
      runs[seed] = common.train_stage(spec, root / name / f"seed{seed}", data_dir,
                                      overrides=[f"--config.seed={seed}"])
    bpb = [runs[s]["bits_per_byte"] for s in seeds]
    mean, se = mean_se(bpb)
    result["variants"][name] = {
        "config": spec, "active_params": report["active_params"],
        "total_params": report["total_params"], "bits_per_byte": dict(zip(seeds, bpb)),
        "mean_bits_per_byte": mean, "standard_error": se,
        "train_seconds": {s: runs[s]["train_seconds"] for s in seeds}}
  if BASELINE in result["variants"]:
    base = result["variants"][BASELINE]["bits_per_byte"]
    for name, row in result["variants"].items():
      diffs = [row["bits_per_byte"][s] - base[s] for s in seeds]
      row["minus_baseline"], row["minus_baseline_se"] = mean_se(diffs)
  keys = ("mean_bits_per_byte", "standard_error", "minus_baseline", "minus_baseline_se",
          "active_params")
  result["summary"] = {name: {k: row[k] for k in keys if k in row}
                       for name, row in result["variants"].items()}
  common.write(result, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
