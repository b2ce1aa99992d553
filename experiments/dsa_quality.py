"""DSA quality: held-out perplexity against dense attention, and pass-key retrieval.

Part `lm`. The same byte-level model (configs/tiny.py widths) is trained on the
Wikipedia excerpt at sequence length 1024 with dense attention and with DSA (W = 32,
P = 32, p = 15%, entropy score). Data order, steps and seed are the same. We report
held-out loss, perplexity and bits/byte over the whole validation split, and the
ratio DSA / dense. Both runs go through `train_and_evaluate`.

Part `passkey`. A 5-digit pass key is hidden in real Wikipedia text ("The pass key is
12345. Remember it."). After the text comes " What is the pass key? The pass key
is ", and the model must produce the key. The key always sits more than W + P tokens
before the question, beyond any local window. Each attention variant is trained from
scratch on the answer digits only (same data, steps and seed), then scored on
held-out samples built from validation text. We report per-digit accuracy (teacher
forced) and exact match.
  dense           full causal attention (upper bound)
  dsa_entropy     DSA, entropy score
  dsa_random      DSA, random score (same budget)
  dsa_key_norm    DSA, key-norm score (same budget)
  sliding_window  local window only (lower bound: chance is 10% per digit)
`--pk_budget fixed:4` repeats the comparison at a budget so small (4 global tokens per
block) that the selection itself, not the coverage of many selected tokens, decides.

  python experiments/dsa_quality.py --out docs/figures/dsa_quality.json
  python experiments/dsa_quality.py --quick --out /tmp/dsa_quality_quick.json
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

from dsv2_jax import config as config_lib
from dsv2_jax.data import sources
from dsv2_jax.data.tokenizer import ByteTokenizer
from dsv2_jax.model.transformer import build_model
from dsv2_jax.parallel import sharding
from dsv2_jax.train import trainer
from dsv2_jax.train.optimizer import build_optimizer
from dsv2_jax.train.state import create_train_state
from dsv2_jax.train.step import jit_train_step

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is "
KEY_DIGITS = 5

PASSKEY_VARIANTS = {
    "dense": dict(attention="dense"),
    "dsa_entropy": dict(attention="dsa", score="entropy"),
    "dsa_random": dict(attention="dsa", score="random"),
    "dsa_key_norm": dict(attention="dsa", score="key_norm"),
    "sliding_window": dict(attention="sliding_window"),
}


def load_tiny() -> ml_collections.ConfigDict:
  return config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))


def set_attention(config: ml_collections.ConfigDict, attention: str, score: str = "entropy",
                  budget: str = "fraction", budget_value: float = 0.15) -> None:
  config.model.attention = attention
  config.model.dsa.update(window=32, block=32, budget=budget, budget_value=budget_value,
                          score=score)


# --- part 1: perplexity ------------------------------------------------------------------

def lm_part(args, workroot: str) -> dict[str, Any]:
  results = {}
  for name, attention in (("dense", "dense"), ("dsa", "dsa")):
    c = load_tiny()
    c.data.update(seq_len=args.lm_seq_len, batch_size=args.lm_batch, data_dir=args.data_dir)
    c.model.max_seq_len = max(c.model.max_seq_len, args.lm_seq_len)
    c.train.update(steps=args.lm_steps, warmup_steps=min(50, args.lm_steps), eval_every=0,
                   checkpoint_every=0, log_every=max(1, args.lm_steps // 10))
    c.sample.max_new_tokens = 0
    set_attention(c, attention)
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


def passkey_config(args, variant: dict[str, str]) -> ml_collections.ConfigDict:
  c = load_tiny()
  c.model.update(d_model=args.pk_width, num_layers=args.pk_layers, num_heads=4,
                 ffn_hidden=4 * args.pk_width, max_seq_len=args.pk_seq_len, scan_unroll=1)
  c.data.update(seq_len=args.pk_seq_len, batch_size=args.pk_batch)
  c.train.update(steps=args.pk_steps, warmup_steps=min(100, args.pk_steps),
                 learning_rate=args.pk_lr, end_lr_fraction=0.1)
  budget, value = args.pk_budget.split(":")
  set_attention(c, variant["attention"], variant.get("score", "entropy"), budget, float(value))
  config_lib.validate(c)
  return c


def passkey_part(args) -> dict[str, Any]:
  train_text, val_text = corpus_bytes("train", args.data_dir), corpus_bytes("validation",
                                                                            args.data_dir)
  min_distance = 32 + 32 + KEY_DIGITS  # Beyond W + P of the answer's queries.
  eval_rng = np.random.RandomState(10_000)
  eval_batches = [passkey_batch(eval_rng, val_text, args.pk_batch, args.pk_seq_len,
                                min_distance) for _ in range(args.pk_eval_batches)]
  results = {}
  for name in args.variants.split(","):
    c = passkey_config(args, PASSKEY_VARIANTS[name])
    mesh = sharding.make_mesh(c.mesh)
    model, tx = build_model(c.model), build_optimizer(c.train)
    state, shardings = create_train_state(model, tx, c.seed, c.data.seq_len, mesh)
    step = jit_train_step(model, tx, mesh, shardings)
    rng = np.random.RandomState(c.seed)  # Same samples for every variant.
    start, losses = time.perf_counter(), []
    for i in range(args.pk_steps):
      batch = sharding.put_batch(passkey_batch(rng, train_text, c.data.batch_size,
                                               c.data.seq_len, min_distance), mesh)
      state, metrics = step(state, batch)
      if (i + 1) % max(1, args.pk_steps // 10) == 0:
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
  parser.add_argument("--lm_steps", type=int, default=400)
  parser.add_argument("--lm_seq_len", type=int, default=1024)
  parser.add_argument("--lm_batch", type=int, default=4)
  parser.add_argument("--variants", default=",".join(PASSKEY_VARIANTS))
  parser.add_argument("--pk_steps", type=int, default=1500)
  parser.add_argument("--pk_seq_len", type=int, default=256)
  parser.add_argument("--pk_batch", type=int, default=16)
  parser.add_argument("--pk_width", type=int, default=64)
  parser.add_argument("--pk_layers", type=int, default=2)
  parser.add_argument("--pk_lr", type=float, default=3e-3)
  parser.add_argument("--pk_eval_batches", type=int, default=16)
  parser.add_argument("--pk_budget", default="fraction:0.15",
                      help="DSA global budget of the pass-key models, KIND:VALUE "
                           "(fraction:0.15, log:2, fixed:4).")
  parser.add_argument("--quick", action="store_true", help="A few steps of everything.")
  args = parser.parse_args(argv)
  if args.quick:
    args.lm_steps, args.lm_seq_len, args.pk_steps, args.pk_eval_batches = 6, 256, 6, 2
  args.data_dir = os.path.expanduser(args.data_dir)
  workroot = os.path.join(args.workdir, time.strftime("%Y%m%d-%H%M%S"))
  result: dict[str, Any] = {"command": " ".join(["python", "experiments/dsa_quality.py", *argv]),
                            "device": jax.devices()[0].device_kind}
  if "lm" in args.parts:
    result["lm"] = lm_part(args, workroot)
  if "passkey" in args.parts:
    result["passkey"] = passkey_part(args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=2)[:3000])


if __name__ == "__main__":
  main(sys.argv[1:])
