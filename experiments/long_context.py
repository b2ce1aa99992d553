"""Long-context adaptation (stage 2): perplexity and pass-key retrieval against length.

The PI paper's experiment (Chen et al. 2023, "Extending Context Window of Large Language
Models via Positional Interpolation") at CPU scale. A tiny byte-level model is trained
at 128 tokens (stage 1, `--stage1`, default configs/tiny.py:passkey=0.1: a tenth of the
rows are pass-key rows over their own text, so the model learns retrieval at 128
tokens next to real text). Stage 2 then adapts it to 16x the length (2,048 tokens) for
100 steps (10% of stage 1) on whole Wikipedia articles, each variant a config argument
appended to `--stage2` (configs/tiny.py:stage=2, plain text, no pass-key rows):
  pi          position interpolation x16 (the article's method), dense attention
  pi_sliding  the same with sliding-window attention (W = 32)
  pi_dsa      the same with DSA (W = 32 + 15% entropy-selected global tokens)
  yarn        YaRN x16 instead of PI (the tiny stage-2 default)
Without adaptation, the stage-1 parameters are also evaluated with only the RoPE
setting changed: `stage1` (plain RoPE, extrapolating), `pi_no_adapt`, `ntk`, `yarn_no_adapt`.

Measured for every variant:
  perplexity  held-out bits/byte against evaluation length L = 128 ... 2,048 (1x-16x),
              sliding windows of L with stride L/4 over the first `--doc_tokens` tokens
              of each long validation document (the same scored tokens at every L, so
              only the context differs): Wikipedia articles and Bible books.
  pass key    exact match of the 5-digit key (greedy == teacher-forced argmax) against
              length and needle depth, `--samples` per cell, haystacks of real held-out
              Wikipedia text.
Every stage is a trainer workdir under --workdir and resumes; finished evaluations are
kept in WORKDIR/results.json and skipped on a rerun, so the script is resumable.

  python -m experiments.long_context --workdir runs/long_context \
      --out docs/figures/long_context.json
  python -m experiments.long_context --quick --workdir /tmp/lc_quick --out /tmp/lc.json
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.data import passkey
from dsv2_jax.infer import retrieval, sliding_window
from dsv2_jax.parallel import sharding
from dsv2_jax.train import evaluate as evaluate_lib
from dsv2_jax.train import trainer
from experiments import common

STAGE1 = "configs/tiny.py:passkey=0.1"
STAGE2 = "configs/tiny.py:stage=2"
ADAPTED = {  # Stage-2 runs: arguments appended to --stage2.
    "pi": "rope=linear:16",
    "pi_sliding": "rope=linear:16,attention=sliding_window",
    "pi_dsa": "rope=linear:16,attention=dsa",
    "yarn": "rope=yarn:16",
    "yarn_passkey": "rope=yarn:16,passkey=0.25,passkey_weight=50",  # keeps pass-key rows
}
NOT_ADAPTED = {  # Stage-1 parameters with another RoPE setting: model fields.
    "stage1": dict(rope_scaling="none", rope_scale=1.0),
    "pi_no_adapt": dict(rope_scaling="linear", rope_scale=16.0),
    "ntk": dict(rope_scaling="ntk", rope_scale=16.0),
    "yarn_no_adapt": dict(rope_scaling="yarn", rope_scale=16.0),
}
LENGTHS = (128, 256, 512, 1024, 2048)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
CORPORA = {"wiki": "wiki_excerpt:validation", "bible_books": "web_bible/books:validation"}
QUICK = dict(stage1="steps=20", stage2="steps=4,seq_len=256", lengths=(128, 256),
             samples=4, doc_tokens=512, max_docs=2)


class Results:
  """results.json under the workdir: one entry per finished evaluation (resumable)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.data = json.loads(path.read_text()) if path.exists() else {}

  def get(self, *keys: str) -> Any:
    node = self.data
    for key in keys:
      node = node.get(key) if isinstance(node, dict) else None
    return node

  def put(self, value: Any, *keys: str) -> None:
    node = self.data
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
    self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))


class Variant:
  """A model to evaluate: a run's parameters under a (possibly changed) model config."""

  def __init__(self, workdir: pathlib.Path, max_len: int, **model_fields: Any):
    config = trainer.load_config(workdir)
    config.model.update(max_seq_len=max(max_len, config.model.max_seq_len), **model_fields)
    self.run = trainer.Run(config, workdir)
    self.state, self.shardings, _ = self.run.initial_state()
    self.eval_fn = evaluate_lib.make_eval_fn(self.run.model, self.run.tokenizer, self.run.mesh,
                                             self.shardings.params)
    model = self.run.model
    self.logits = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def bits_per_byte(self, streams: list[np.ndarray], length: int) -> dict[str, float]:
    """Sliding windows of `length`, stride length/4, over each stream; totals over all."""
    tokenizer = self.run.tokenizer
    nll = nbytes = tokens = 0.0
    for stream in streams:
      r = sliding_window.score(self.eval_fn, self.state.params, stream, length,
                               max(1, length // 4), 4, tokenizer,
                               put_batch=lambda b: sharding.put_batch(b, self.run.mesh))
      nll += r["loss"] * r["tokens"]
      nbytes += r["bytes"]
      tokens += r["tokens"]
    return {"bits_per_byte": nll / math.log(2) / nbytes, "loss": nll / tokens,
            "tokens": int(tokens)}

  def passkey_accuracy(self, haystack: np.ndarray, length: int, depth: float, samples: int,
                       seed: int) -> float:
    """Exact match of the key (every answer token the argmax) over `samples` rows."""
    tokenizer = self.run.tokenizer
    rng = np.random.default_rng(seed)
    rows, answers = [], []
    for _ in range(samples):
      start = int(rng.integers(0, len(haystack) - length))
      row, answer = passkey.passkey_row(haystack[start:start + length], passkey.random_key(rng),
                                        depth, length, tokenizer)
      rows.append(row)
      answers.append(answer)
    assert len(set(answers)) == 1, "keys tokenize to different lengths"
    a = answers[0]
    rows = np.stack(rows)  # [samples, length]
    logits = self.logits(self.state.params, jnp.asarray(rows[:, :-1]))  # [B, T, V]
    predicted = np.asarray(jnp.argmax(logits[:, -a:], axis=-1))  # [B, a]
    return float(np.mean(np.all(predicted == rows[:, -a:], axis=1)))


def summarize(entry: dict[str, Any] | None, n: int) -> dict[str, float]:
  """Bits/byte per corpus and mean pass-key exact match of one variant at length n."""
  out = {}
  for corpus, r in ((entry or {}).get("ppl", {}).get(str(n)) or {}).items():
    out[f"{corpus}_bits_per_byte"] = round(r["bits_per_byte"], 4)
  cells = ((entry or {}).get("passkey", {}).get(str(n)) or {}).values()
  if cells:
    out["passkey"] = round(float(np.mean(list(cells))), 3)
  return out


def long_documents(spec: str, data_dir: str, tokenizer, doc_tokens: int, max_docs: int
                   ) -> list[np.ndarray]:
  """The first `doc_tokens` (+1) tokens of each validation document that long, in order."""
  docs = retrieval.load_corpus(spec, data_dir)
  streams = [tokenizer.encode(text)[:doc_tokens + 1] for _, text in docs]
  return [s for s in streams if len(s) == doc_tokens + 1][:max_docs]


def main(argv: list[str]) -> None:
  parser = common.chain_parser(__doc__, "runs/long_context")
  parser.add_argument("--stage1", default=STAGE1, metavar="FILE[:args]")
  parser.add_argument("--stage2", default=STAGE2, metavar="FILE[:args]")
  parser.add_argument("--adapted", default="pi,pi_sliding,pi_dsa,yarn", help="Stage-2 variants to run.")
  parser.add_argument("--parts", default="ppl,passkey,stride",
                      help="What to evaluate: ppl, passkey, stride.")
  parser.add_argument("--unadapted", default=",".join(NOT_ADAPTED),
                      help="Stage-1 parameters under these RoPE settings (see NOT_ADAPTED).")
  parser.add_argument("--samples", type=int, default=20, help="Pass-key rows per cell.")
  parser.add_argument("--doc_tokens", type=int, default=4096)
  parser.add_argument("--max_docs", type=int, default=8)
  parser.add_argument("--quick", action="store_true", help=f"Smoke run: {QUICK}.")
  args = parser.parse_args(argv)
  lengths = QUICK["lengths"] if args.quick else LENGTHS
  if args.quick:
    args.stage1 = common.with_args(args.stage1, QUICK["stage1"])
    args.stage2 = common.with_args(args.stage2, QUICK["stage2"])
    args.samples, args.doc_tokens, args.max_docs = (QUICK["samples"], QUICK["doc_tokens"],
                                                    QUICK["max_docs"])
  data_dir, root = common.chain_dirs(args)
  results = Results(root / "results.json")

  # 1) Stage 1 at 128 tokens, then each stage-2 variant from it.
  runs = {"stage1": common.train_stage(args.stage1, root / "stage1", data_dir)}
  adapted = [a for a in args.adapted.split(",") if a]
  for name in adapted:
    runs[name] = common.train_stage(common.with_args(args.stage2, ADAPTED[name]), root / name, data_dir,
                       init_from=str(root / "stage1"))
    print(f"{name}: trained, held-out bits/byte {runs[name]['bits_per_byte']:.4f}", flush=True)

  # 2) Evaluate every variant at every length: perplexity on long documents, pass key.
  parts = args.parts.split(",")
  kinds = [k for k in ("ppl", "passkey") if k in parts]
  variants = {name: (root / "stage1", NOT_ADAPTED[name])
              for name in args.unadapted.split(",") if name}
  variants.update({name: (root / name, {}) for name in adapted})
  tokenizer = trainer.Run(trainer.load_config(root / "stage1"), root / "stage1").tokenizer
  corpora = {name: long_documents(spec, data_dir, tokenizer, args.doc_tokens, args.max_docs)
             for name, spec in CORPORA.items()}
  corpora_stream = np.concatenate(corpora["wiki"])  # The same long wiki documents, joined.
  haystack = np.concatenate([tokenizer.encode(t) for _, t in
                             retrieval.load_corpus("wiki_excerpt:validation", data_dir)])
  for name, (workdir, fields) in variants.items():
    todo = [(kind, str(n)) for n in lengths for kind in kinds
            if results.get(name, kind, str(n)) is None]
    if not todo:
      continue
    variant = Variant(workdir, max(lengths), **fields)
    for n in lengths:
      if "ppl" in kinds and results.get(name, "ppl", str(n)) is None:
        results.put({corpus: variant.bits_per_byte(streams, n)
                     for corpus, streams in corpora.items()}, name, "ppl", str(n))
      if "passkey" in kinds and results.get(name, "passkey", str(n)) is None:
        results.put({str(d): variant.passkey_accuracy(haystack, n, d, args.samples,
                                                      seed=1000 * n + int(100 * d))
                     for d in DEPTHS}, name, "passkey", str(n))
      print(f"{name} L={n}: {json.dumps(summarize(results.get(name), n))}", flush=True)

  # 3) Bits/byte against stride (SPEC 3.3, window 2048 / stride 512): S = W is the
  #    non-overlapping figure; smaller strides give every token more context.
  for name, window in (("stage1", lengths[0]), ("pi", lengths[-1]), ("yarn", lengths[-1])):
    if "stride" not in parts or name not in variants:
      continue
    todo = [s for s in (window, window // 2, window // 4, window // 8)
            if results.get("stride", name, str(s)) is None]
    if todo:
      variant = Variant(variants[name][0], window, **variants[name][1])
      for stride in todo:
        r = sliding_window.score(variant.eval_fn, variant.state.params, corpora_stream,
                                 window, stride, 4, tokenizer,
                                 put_batch=lambda b, v=variant: sharding.put_batch(b, v.run.mesh))
        results.put({"window": window, **r}, "stride", name, str(stride))
        print(f"stride {name} W={window} S={stride}: bpb {r['bits_per_byte']:.4f}", flush=True)

  summary = {name: {n: summarize(results.get(name), n) for n in lengths} for name in variants}
  result = {"command": common.command("experiments.long_context", argv),
            "stage1": args.stage1, "stage2": args.stage2, "lengths": list(lengths),
            "depths": list(DEPTHS), "samples_per_cell": args.samples,
            "doc_tokens": args.doc_tokens,
            "documents": {k: len(v) for k, v in corpora.items()},
            "runs": runs, "variants": {name: results.get(name) for name in variants},
            "stride": results.get("stride"), "summary": summary}
  common.write(result, args.out, lambda png: plot(result, png))


def plot(result: dict[str, Any], png: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lengths, entries = result["lengths"], result["variants"]
  with_ppl = [n for n, e in entries.items() if (e or {}).get("ppl")]
  with_pk = [n for n, e in entries.items() if (e or {}).get("passkey")]
  rows = (1 if with_ppl else 0) + math.ceil(len(with_pk) / 4)
  fig = plt.figure(figsize=(15, 4 * bool(with_ppl) + 2.2 * math.ceil(len(with_pk) / 4)))
  grid = fig.add_gridspec(max(rows, 1), 4)
  for i, corpus in enumerate(CORPORA if with_ppl else ()):
    ax = fig.add_subplot(grid[0, 2 * i:2 * i + 2])
    for name in with_ppl:
      ax.plot(lengths, [entries[name]["ppl"][str(n)][corpus]["bits_per_byte"] for n in lengths],
              marker="o", label=name)
    ax.set(xscale="log", xlabel="evaluation length (tokens)", ylabel="held-out bits/byte",
           title=f"{corpus} (stride L/4)")
    ax.minorticks_off()
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(128, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=7)
  first = 1 if with_ppl else 0
  for i, name in enumerate(with_pk):
    ax = fig.add_subplot(grid[first + i // 4, i % 4])
    cells = np.array([[entries[name]["passkey"][str(n)][str(d)] for n in lengths]
                      for d in result["depths"]])
    ax.imshow(cells, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
    ax.set_yticks(range(len(result["depths"])), [str(d) for d in result["depths"]], fontsize=7)
    ax.set(xlabel="length", ylabel="needle depth")
    ax.set_title(f"pass key: {name}", fontsize=9)
    for (y, x), v in np.ndenumerate(cells):
      ax.text(x, y, f"{v:.0%}", ha="center", va="center", fontsize=6, color="w")
  fig.tight_layout()
  fig.savefig(png, dpi=110)


if __name__ == "__main__":
  main(sys.argv[1:])
