"""DSA quality: held-out perplexity against dense attention, and pass-key retrieval.

Part `lm`. The same byte-level model, `--lm_config` (default configs/tiny.py at sequence
length 1024, batch 4, 400 steps), is trained on the Wikipedia excerpt with
`attention=dense` and with `attention=dsa` (W = 32, P = 32, p = 15%, entropy score).
Data order, steps and seed are the same. We report held-out loss, perplexity and
bits/byte over the whole validation split, and the ratio DSA / dense. Both runs go
through `train_and_evaluate`.

Part `passkey`. A 5-digit pass key is hidden in real Wikipedia text ("The pass key is
12345. Remember it."). After the text comes " What is the pass key? The pass key
is ", and the model must produce the key. The key always sits more than W + P tokens
before the question, beyond any local window. Each attention variant is trained from
scratch on the answer digits only (same data, steps and seed), then scored on
held-out samples built from validation text. We report per-digit accuracy (teacher
forced) and exact match. The model is `--pk_config` (default configs/tiny.py at width 64,
2 layers, sequence 256, 1,500 steps) with each variant's config arguments appended:
  dense           attention=dense: full causal attention (upper bound)
  dsa_entropy     attention=dsa,dsa_score=entropy
  dsa_random      attention=dsa,dsa_score=random (same budget)
  dsa_key_norm    attention=dsa,dsa_score=key_norm (same budget)
  sliding_window  attention=sliding_window: local window only (lower bound: chance is
                  10% per digit)
Adding `dsa_budget=fixed:4` to --pk_config repeats the comparison at a budget so small
(4 global tokens per block) that the selection itself, not the coverage of many selected
tokens, decides.

  python -m experiments.dsa_quality --out docs/figures/dsa_quality.json
  python -m experiments.dsa_quality --parts passkey \
      --pk_config configs/tiny.py:width=64,layers=2,seq_len=256,steps=1500,dsa_budget=fixed:4 \
      --out /tmp/dsa_quality_fixed4.json
  python -m experiments.dsa_quality --quick --out /tmp/dsa_quality_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsv2_jax.data import sources
from dsv2_jax.data.tokenizer import ByteTokenizer
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.train import trainer
from dsv2_jax.train.optimizer import build_optimizer
from dsv2_jax.train.state import create_train_state
from dsv2_jax.train.step import jit_train_step
from experiments import common

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is "
KEY_DIGITS = 5

LM_CONFIG = "configs/tiny.py:seq_len=1024,batch_size=4,steps=400"
LM_VARIANTS = {"dense": "attention=dense", "dsa": "attention=dsa"}  # Config arguments.
PK_CONFIG = "configs/tiny.py:width=64,layers=2,seq_len=256,steps=1500"
PASSKEY_VARIANTS = {  # Config arguments appended to --pk_config.
    "dense": "attention=dense",
    "dsa_entropy": "attention=dsa,dsa_score=entropy",
    "dsa_random": "attention=dsa,dsa_score=random",
    "dsa_key_norm": "attention=dsa,dsa_score=key_norm",
    "sliding_window": "attention=sliding_window",
}
QUICK = {"lm_config": "steps=6,seq_len=256", "pk_config": "steps=6"}  # --quick: appended.


def load(args, name: str, variant: str) -> ml_collections.ConfigDict:
  """`--NAME` (lm_config or pk_config) + --quick's + the variant's arguments + overrides."""
  spec = common.with_args(getattr(args, name), QUICK[name] if args.quick else "", variant)
  c = common.load_config(spec, args.overrides[name], name=name)
  c.data.data_dir = args.data_dir
  return c


# --- part 1: perplexity ------------------------------------------------------------------

def lm_part(args, workroot: str) -> dict[str, Any]:
  results = {}
  for name, variant in LM_VARIANTS.items():
    c = load(args, "lm_config", variant)
    steps = c.train.steps  # Protocol: one final eval over the whole split, no sample.
    c.train.update(warmup_steps=min(50, steps), eval_every=0, checkpoint_every=0,
                   log_every=max(1, steps // 10))
    c.sample.max_new_tokens = 0
    start = time.perf_counter()
    result = trainer.train_and_evaluate(c, os.path.join(workroot, f"lm_{name}"))
    result["train_seconds"] = time.perf_counter() - start
    results[name] = result
    print(f"lm {name}: {json.dumps(result)}", flush=True)
  results["perplexity_ratio_dsa_over_dense"] = (results["dsa"]["perplexity"]
                                                / results["dense"]["perplexity"])
  results["bits_per_byte_ratio_dsa_over_dense"] = (results["dsa"]["bits_per_byte"]
                                                   / results["dense"]["bits_per_byte"])
  return results


# --- part 2: pass key ----------------------------------------------------------------------

def corpus_bytes(split: str, data_dir: str) -> bytes:
  src = sources.data_source("wiki_excerpt", split, data_dir)
  return b"\n\n".join(src[i]["text"] for i in range(len(src)))


def passkey_batch(rng: np.random.RandomState, text: bytes, batch: int, seq_len: int,
                  min_distance: int) -> dict[str, np.ndarray]:
  """Rows of seq_len + 1 bytes: text with the needle, then the question and the key."""
  tok = ByteTokenizer()
  inputs = np.zeros((batch, seq_len), np.int32)
  targets = np.zeros((batch, seq_len), np.int32)
  weights = np.zeros((batch, seq_len), np.float32)
  for row in range(batch):
    key = "".join(str(d) for d in rng.randint(0, 10, KEY_DIGITS))
    needle = NEEDLE.format(key=key).encode()
    tail = (QUESTION + key).encode()
    hay_len = seq_len + 1 - len(needle) - len(tail)
    start = rng.randint(0, len(text) - hay_len)
    hay = text[start:start + hay_len]
    # The needle must end at least `min_distance` tokens before the question's end.
    latest = hay_len - min_distance + len(QUESTION)
    at = rng.randint(0, max(1, latest))
    ids = tok.encode(hay[:at] + needle + hay[at:] + tail)
    assert len(ids) == seq_len + 1, len(ids)
    inputs[row], targets[row] = ids[:-1], ids[1:]
    weights[row, seq_len - KEY_DIGITS:] = 1.0  # Only the key's digits are scored.
  return {"inputs": inputs, "targets": targets, "weights": weights}


def passkey_part(args) -> dict[str, Any]:
  train_text, val_text = corpus_bytes("train", args.data_dir), corpus_bytes("validation",
                                                                            args.data_dir)
  min_distance = 32 + 32 + KEY_DIGITS  # Beyond W + P of the answer's queries.
  eval_rng = np.random.RandomState(10_000)
  shape = load(args, "pk_config", "").data  # Every variant has the same rows.
  eval_batches = [passkey_batch(eval_rng, val_text, shape.batch_size, shape.seq_len,
                                min_distance) for _ in range(args.pk_eval_batches)]
  results = {}
  for name in args.variants.split(","):
    c = load(args, "pk_config", PASSKEY_VARIANTS[name])
    mesh = sharding.make_mesh(c.mesh)
    model, tx = build_model(c.model), build_optimizer(c.train)
    state, shardings = create_train_state(model, tx, c.seed, c.data.seq_len, mesh)
    step = jit_train_step(model, tx, mesh, shardings)
    rng = np.random.RandomState(c.seed)  # Same samples for every variant.
    start, losses, steps = time.perf_counter(), [], c.train.steps
    for i in range(steps):
      batch = sharding.put_batch(passkey_batch(rng, train_text, c.data.batch_size,
                                               c.data.seq_len, min_distance), mesh)
      state, metrics = step(state, batch)
      if (i + 1) % max(1, steps // 10) == 0:
        losses.append((i + 1, float(metrics["loss"])))
    train_seconds = time.perf_counter() - start
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), axis=-1))
    correct, exact, rows = 0, 0, 0
    for batch in eval_batches:
      pred = np.asarray(predict(state.params, batch["inputs"]))[:, -KEY_DIGITS:]
      hits = pred == batch["targets"][:, -KEY_DIGITS:]
      correct += int(hits.sum())
      exact += int(hits.all(axis=1).sum())
      rows += hits.shape[0]
    results[name] = {"digit_accuracy": correct / (rows * KEY_DIGITS),
                     "exact_match": exact / rows, "eval_samples": rows,
                     "train_loss_curve": losses, "train_seconds": train_seconds}
    print(f"passkey {name}: {json.dumps(results[name])}", flush=True)
  return results


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--parts", default="lm,passkey")
  parser.add_argument("--data_dir", default="~/tensorflow_datasets")
  parser.add_argument("--workdir", default="runs/dsa_quality")
  common.add_config_flag(parser, LM_CONFIG, "lm_config", "Part lm's model.")
  common.add_config_flag(parser, PK_CONFIG, "pk_config", "Part passkey's model.")
  parser.add_argument("--variants", default=",".join(PASSKEY_VARIANTS),
                      help="Pass-key variants.")
  parser.add_argument("--pk_eval_batches", type=int, default=16)
  parser.add_argument("--quick", action="store_true", help=f"A few steps of everything: {QUICK}.")
  args = common.parse_args(parser, argv, ("lm_config", "pk_config"))
  if args.quick:
    args.pk_eval_batches = 2
  args.data_dir = os.path.expanduser(args.data_dir)
  workroot = os.path.join(args.workdir, time.strftime("%Y%m%d-%H%M%S"))
  result: dict[str, Any] = {"command": common.command("experiments.dsa_quality", argv),
                            "device": jax.devices()[0].device_kind,
                            "lm_config": args.lm_config, "pk_config": args.pk_config,
                            "config_overrides": args.overrides}
  if "lm" in args.parts:
    result["lm"] = lm_part(args, workroot)
  if "passkey" in args.parts:
    result["passkey"] = passkey_part(args)
  common.write(result, args.out)
  print(json.dumps({k: v for k, v in result.items() if k in ("lm", "passkey")}, indent=2)[:3000])


if __name__ == "__main__":
  main(sys.argv[1:])
