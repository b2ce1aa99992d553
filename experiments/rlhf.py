"""PPO and DPO against the reward model (stage 3, SPEC 2.1): the positive-review task.

The anchor is the trl sentiment example: continue the opening of a movie review so a
sentiment reward model likes it. Here the policy is the SFT run (`--policy`, from
experiments/instruction_tuning.py), the reward model the Bradley-Terry run
(`--reward`, from experiments/reward_model.py, trained on fresh-vs-rotten pairs),
prompts the first 16 tokens of Rotten Tomatoes snippets (training movies for
rollouts, held-out movies for evaluation), responses 32 sampled tokens.

Two runs from the same policy, each a trainer workdir under --workdir (resumable):
  ppo   configs/tiny.py:stage=ppo  (clipped PPO, separate value model initialised from
        the reward model, GAE, adaptive KL controller; dsv2_jax/rlhf/ppo.py)
  dpo   configs/tiny.py:stage=dpo  (DPO on pairs of reference samples ranked by the
        reward model; dsv2_jax/rlhf/dpo.py)
Figures on the fixed held-out prompts, at step 0 and every eval point (metrics.jsonl):
mean reward (reward-model score minus its decision threshold), the share of responses
scored positive, KL to the reference per response (nats, sampled estimate), response
length, entropy, and the responses' bits/byte under the reference model (a policy
that games the reward with gibberish shows up there). Samples before and after.

  python -m experiments.rlhf --out docs/figures/rlhf.json
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

from dsv2_jax.train import trainer
from dsv2_jax.train.metrics import read_metrics
from experiments import common

POLICY = "runs/instruction_tuning/sft"
REWARD = "runs/reward_model/reward_mean"
RUNS = {"ppo": "configs/tiny.py:stage=ppo", "dpo": "configs/tiny.py:stage=dpo"}
EVAL_KEYS = ("reward", "positive_share", "kl_per_response", "response_tokens", "entropy",
             "reference_bits_per_byte")
QUICK = "steps=2"


def run_one(spec: str, workdir: pathlib.Path, policy: str, reward_model: str, data_dir: str
            ) -> dict[str, Any]:
  """Trains (or resumes, or reads) one PPO / DPO run; its eval curve and final figures."""
  if not (workdir / "eval.json").exists():
    c = common.load_config(spec, [f"--config.train.init_from={policy}",
                                  f"--config.rlhf.reward_from={reward_model}",
                                  f"--config.data.data_dir={data_dir}"])
    start = time.perf_counter()
    trainer.train_and_evaluate(c, workdir)
    (workdir / "train_seconds.json").write_text(json.dumps(time.perf_counter() - start))
  curve = [{k.removeprefix("eval_"): m[k] for k in m if k.startswith("eval_")} | {"step": m["step"]}
           for m in read_metrics(workdir) if "eval_reward" in m]
  return {"config": spec, "final": json.loads((workdir / "eval.json").read_text()),
          "train_seconds": json.loads((workdir / "train_seconds.json").read_text()),
          "curve": curve, "train": [m for m in read_metrics(workdir) if "reward" in m],
          "samples_before": (workdir / "samples_before.txt").read_text().splitlines()[:8],
          "samples_after": (workdir / "samples.txt").read_text().splitlines()[:8]}


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = (("positive_share", "held-out share scored positive"),
            ("reward", "held-out reward (score - threshold)"),
            ("kl_per_response", "KL to reference (nats / response)"),
            ("reference_bits_per_byte", "responses' bits/byte under the reference"))
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  for ax, (key, title) in zip(axes.flat, panels):
    for name, r in result["runs"].items():
      ax.plot([p["step"] for p in r["curve"]], [p[key] for p in r["curve"]], marker="o",
              label=name)
    ax.set_title(title)
    ax.set_xlabel("step (one batch of prompts)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
  parser = common.chain_parser(__doc__, "runs/rlhf")
  parser.add_argument("--policy", default=POLICY, help="The SFT (or stage-1) workdir.")
  parser.add_argument("--reward", default=REWARD, help="The reward model's workdir.")
  parser.add_argument("--runs", default=",".join(RUNS), help="Which of ppo, dpo.")
  parser.add_argument("--args", default="", help="Arguments appended to every run's config "
                      "spec, e.g. steps=50.")
  parser.add_argument("--quick", action="store_true", help=f"Smoke run: {QUICK}.")
  args = parser.parse_args(argv)
  for path, producer in ((args.policy, "experiments.instruction_tuning"),
                         (args.reward, "experiments.reward_model")):
    if not (pathlib.Path(path) / "eval.json").is_file():
      sys.exit(f"{path} is not a finished run: run `python -m {producer}` first, or pass "
               "another workdir.")
  data_dir, root = common.chain_dirs(args)
  extra = ",".join(filter(None, [args.args, QUICK if args.quick else ""]))
  runs = {name: run_one(common.with_args(RUNS[name], extra) if extra else RUNS[name],
                        root / name, args.policy, args.reward, data_dir)
          for name in args.runs.split(",") if name}
  result = {"command": common.command("experiments.rlhf", argv), "policy": args.policy,
            "reward_model": args.reward, "runs": runs,
            "summary": {name: {"before": {k: round(r["curve"][0][k], 4) for k in EVAL_KEYS},
                               "after": {k: round(r["final"][k], 4) for k in EVAL_KEYS},
                               "train_minutes": round(r["train_seconds"] / 60, 1)}
                        for name, r in runs.items()}}
  common.write(result, args.out, plot=lambda path: plot(result, path))


if __name__ == "__main__":
  main(sys.argv[1:])
