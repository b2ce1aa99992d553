"""Instruction tuning (stage 3, SPEC 2.1): what supervised fine-tuning on chat examples buys.

The chain: a stage-1 model (`--base`, default `configs/tiny.py`: 1,000 steps on
Wikipedia) -> SFT (`--sft`, default `configs/tiny.py:stage=sft`: chatterbot Q/A pairs +
the World English Bible instruction set, chat template, loss on responses only, first-fit
packed rows). Both are trainer workdirs under --workdir and resume.

Measured on the held-out splits (chatterbot: whole held-out topics; bible_quotes:
held-out verses, no verse in any training example), for the base model and the SFT
model, each example alone in a row, in the chat template:
  response bits/byte   NLL of the response tokens (and the closing end-of-turn, which
                       stands for 0 bytes) / the response's UTF-8 bytes;
  exact match          every response token, and the end-of-turn, is the model's argmax
                       given the true prefix. That is exactly "greedy decoding reproduces
                       the response and stops", computed in one forward pass.
per dataset and, for bible_quotes, per task: `repeat` (copy a verse given in the
prompt: solvable from context), `quote` (verse from its reference) and `reference`
(reference from the verse), both of which need the verse memorised.
Plus greedy samples (`Run.sample`, temperature 0) for a few held-out prompts.

  python -m experiments.instruction_tuning --out docs/figures/instruction_tuning.json
"""

from __future__ import annotations

import collections
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.data import chat, sources
from dsv2_jax.train import trainer
from experiments import common

BASE = "configs/tiny.py"
SFT = "configs/tiny.py:stage=sft"
EVAL_SETS = ("chatterbot", "bible_quotes")
QUICK = dict(base="steps=20", sft="steps=10", max_examples=64)


def held_out_examples(dataset: str, data_dir: str, max_examples: int
                      ) -> list[dict[str, str]]:
  """prompt / response / task of the validation split (the first `max_examples` if > 0)."""
  source = sources.data_source(dataset, "validation", data_dir)
  n = len(source) if not max_examples else min(max_examples, len(source))
  # An even spread over the split (it is ordered by task for bible_quotes).
  picks = np.linspace(0, len(source) - 1, n).round().astype(int) if n < len(source) \
      else range(len(source))
  out = []
  for i in picks:
    r = source[int(i)]
    out.append({"prompt": sources.as_text(r["prompt"]),
                "response": sources.as_text(r["response"]),
                "task": sources.as_text(r["task"]) if "task" in r else dataset})
  return out


def score_examples(run: trainer.Run, params: Any, examples: list[dict[str, str]],
                   batch_size: int = 32) -> list[dict[str, float]]:
  """Per example: response NLL (nats), response bytes, exact match (teacher-forced argmax)."""
  tokenizer, model = run.tokenizer, run.model
  rendered = [chat.render_example(tokenizer, ex["prompt"], ex["response"]) for ex in examples]
  t = -(-max(len(tokens) for tokens, _ in rendered) // 64) * 64  # One shape for all rows.
  if t > run.config.model.max_seq_len:
    raise ValueError(f"a held-out example is {t} tokens, longer than the model takes.")

  @jax.jit
  def forward(p, inputs, targets, weights):
    logits = model.apply({"params": p}, inputs).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    hit = (jnp.argmax(logits, -1) == targets) | (weights == 0)
    return jnp.sum(nll * weights, -1), jnp.all(hit, -1)

  out = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    rows = np.full((batch_size, t + 1), tokenizer.pad_id, np.int32)
    weights = np.zeros((batch_size, t + 1), np.float32)
    nbytes = []
    for i, (tokens, w) in enumerate(rendered[start:start + batch_size]):
      rows[i, :len(tokens)], weights[i, :len(w)] = tokens, w
      nbytes.append(int(np.sum(tokenizer.token_num_bytes[tokens] * w)))
    nll, hit = jax.device_get(forward(params, rows[:, :-1], rows[:, 1:], weights[:, 1:]))
    out += [{"nll": float(nll[i]), "bytes": nbytes[i], "exact": bool(hit[i])}
            for i in range(len(chunk))]
  return out


def summarize(examples: list[dict[str, str]], scores: list[dict[str, float]]
              ) -> dict[str, dict[str, float]]:
  """Response bits/byte and exact match, overall ('all') and per task."""
  groups = collections.defaultdict(list)
  for ex, s in zip(examples, scores):
    groups[ex["task"]].append(s)
    groups["all"].append(s)
  return {task: {"response_bits_per_byte": sum(s["nll"] for s in g) / math.log(2)
                 / max(1, sum(s["bytes"] for s in g)),
                 "exact_match": float(np.mean([s["exact"] for s in g])), "examples": len(g)}
          for task, g in sorted(groups.items())}


def main(argv: list[str]) -> None:
  parser = common.chain_parser(__doc__, "runs/instruction_tuning")
  parser.add_argument("--base", default=BASE, metavar="FILE[:args]", help="Stage 1.")
  parser.add_argument("--sft", default=SFT, metavar="FILE[:args]", help="The SFT stage.")
  parser.add_argument("--max_examples", type=int, default=0,
                      help="Held-out examples per dataset (0: all).")
  parser.add_argument("--samples", type=int, default=3, help="Greedy samples per dataset.")
  parser.add_argument("--quick", action="store_true", help=f"Smoke run: {QUICK}.")
  args = parser.parse_args(argv)
  if args.quick:
    args.base = common.with_args(args.base, QUICK["base"])
    args.sft = common.with_args(args.sft, QUICK["sft"])
    args.max_examples = QUICK["max_examples"]
  data_dir, root = common.chain_dirs(args)

  runs = {"base": common.train_stage(args.base, root / "base", data_dir)}
  runs["sft"] = common.train_stage(args.sft, root / "sft", data_dir,
                                   init_from=str(root / "base"))
  # Both models are scored under the SFT run's config (its rows and chat template).
  sft_run = trainer.Run(trainer.load_config(root / "sft"), root / "sft")
  params = {name: trainer.Run(trainer.load_config(root / name), root / name)
            .initial_state()[0].params for name in ("base", "sft")}
  results: dict[str, Any] = {}
  samples: dict[str, Any] = {}
  for dataset in EVAL_SETS:
    examples = held_out_examples(dataset, data_dir, args.max_examples)
    for name, p in params.items():
      results.setdefault(name, {})[dataset] = summarize(
          examples, score_examples(sft_run, p, examples))
      print(f"{name} {dataset}: {results[name][dataset]['all']}", flush=True)
    picks = [examples[i] for i in np.linspace(0, len(examples) - 1, args.samples)
             .round().astype(int)]
    for ex in picks:
      row = {"prompt": ex["prompt"], "reference": ex["response"], "task": ex["task"]}
      for name, p in params.items():
        text = sft_run.sample(p, ex["prompt"], max_new_tokens=120, temperature=0.0, top_k=0)
        row[name] = text[len(ex["prompt"]) + 1:]  # Run.sample: prompt, newline, response.
      samples.setdefault(dataset, []).append(row)

  result = {
      "command": common.command("experiments.instruction_tuning", argv),
      "runs": runs, "held_out": results, "samples": samples,
      "summary": {name: {f"{d}/{task}": {k: round(v, 4) for k, v in r.items()
                                          if k != "examples"}
                         for d in EVAL_SETS for task, r in results[name][d].items()}
                  for name in results},
  }
  common.write(result, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
