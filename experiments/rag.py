"""Retrieval-augmented evaluation (SPEC 3.3): does putting relevant passages first help?

In-context retrieval augmentation (Ram et al., 2023, "In-Context Retrieval-Augmented
Language Models"; Lewis et al., 2020 for RAG) puts passages retrieved for the query ahead
of it in the model input, with no change to the model. We measure it on a trained run
(`--run`, e.g. the long-context stage-2 run, window 2048) in three parts:

Part `index`. The retrieval corpus is the training articles (wiki_excerpt:train) plus the
other local text (lee_news:train, web_bible/chapters:train), cut into passages of
--passage_tokens model tokens (`retrieval.chunk_documents`) and indexed with BM25
(`retrieval.RetrievalIndex`). We report documents, passages, chunking and build seconds
(best of 2), the index's size on disk and its load time (it is saved beside the run as
WORKDIR/rag/rag_experiment and reloaded; the loaded copy is used below), and the search
cost: ms per query for single `search` calls (as the sliding window makes them) and for
one `search_many` over the same queries (every query the experiment actually made).

Part `bpb`. Held-out bits/byte on the validation articles (wiki_excerpt:validation, one
stream via `sliding_window.document_stream`, the first --max_docs articles, cut to
--max_tokens tokens), with windows of W tokens advancing by S (`sliding_window.score`):
  native   the plain sliding window: every scored token sees >= W - S tokens of context;
  control  `window_augmenter(None, ...)`: each window keeps its scored tokens and only
           --query_tokens tokens of preceding context, nothing else;
  rag      `window_augmenter(index, ...)`: the same cut window, the context is the search
           query, and the top-k passages fill the rest of the window, most relevant first.
All three score exactly the same targets (asserted). rag vs control isolates what the
passages add; rag vs native says whether passages beat the native long context they
displace. Gains are reported with their sign, whatever it is.

Part `cloze`. From validation sentences, items "sentence prefix -> its final word" where
the word is alphabetic, >= 4 letters, not an English stopword, and occurs in the
retrieval corpus; --cloze_items of them drawn with --seed. Prompt (our choice): the last
--cloze_prompt_tokens tokens (at most half of W - 16, the rest is room for passages)
of the article up to the end of the prefix (the prefix plus
its preceding article context; no trailing space, so the answer's leading space is part
of the prediction with any tokenizer). Without RAG the model greedily generates
--cloze_new_tokens tokens after the prompt; with RAG the top-k passages for the prefix
text (the query) go ahead of the same prompt, `retrieval.augment(prompt, passages,
budget_tokens=W - 16)`, same decoding. Exact match: the first generated word equals the
answer (case-insensitive, punctuation stripped). Retrieval recall: the answer occurs as a
word in the retrieved passages (and in the part of them that fits the input; also in the
top 1, 10 and 30), so failures split into retrieval misses and reading misses (EM given
the answer is in the input, and given it is not); `verbatim` counts items whose
whole sentence is in the passages (duplicated text between the splits).

Decoding variable-length inputs: `infer.generate.generate` takes one prompt length per
batch (compiled per length), and the RAG inputs have as many lengths as there are
passage combinations. `greedy_decode` below decodes one input at a time from a right-
padded prefill (lengths bucketed to multiples of 64, so a few compilations), resetting
the cache index to the true length: the padded slots lie beyond every query's causal
mask and are overwritten as decoding proceeds. Its tokens are checked against
`generate` on the no-RAG prompts (`cloze.decoder_check`).

  python -m experiments.rag --run runs/tiny_long --out docs/figures/rag.json
  python -m experiments.rag --run /tmp/rag_dev/run --data_dir /tmp/rag_dev/tfds \
      --query_tokens 32 --stride 32 --passage_tokens 64 --out /tmp/rag_dev.json
  python -m experiments.rag --run /tmp/rag_dev/run --data_dir /tmp/rag_dev/tfds --quick \
      --query_tokens 32 --stride 32 --passage_tokens 64 --out /tmp/rag_quick.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import string
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv2_jax.data.tokenizer import Tokenizer
from dsv2_jax.infer import generate as generate_lib
from dsv2_jax.infer import retrieval, sliding_window
from dsv2_jax.parallel import sharding
from dsv2_jax.train import evaluate, trainer
from experiments import common

CORPUS = ("wiki_excerpt:train", "lee_news:train", "web_bible/chapters:train")
HELD_OUT = "wiki_excerpt:validation"
INDEX_NAME = "rag_experiment"
QUICK = dict(max_docs=2, max_tokens=4096, cloze_items=24, max_corpus_docs=150)
BUCKET = 64  # Prompt lengths are padded up to a multiple of this (one compile per bucket).
# NLTK's English stopwords (bm25s ships them as STOPWORDS_EN_PLUS) plus a few frequent
# function words it lacks; answers must be content words.
EXTRA_STOPWORDS = ("also", "would", "could", "upon", "within", "among", "though", "since")
WORD = re.compile(r"[A-Za-z]+")


# --- part 1: the index -------------------------------------------------------------------

def folder_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def index_part(args, run) -> tuple[retrieval.RetrievalIndex, list[tuple[str, str]],
                                    dict[str, Any]]:
  """Builds (best of 2), saves and reloads the index; returns it, the corpus, the stats."""
  docs, per_source = [], {}
  for spec in args.corpus.split(","):
    found = retrieval.load_corpus(spec, args.data_dir, run.config.data.text_key)
    if args.max_corpus_docs:
      found = found[:args.max_corpus_docs]
    per_source[spec] = len(found)
    docs += found
  chunk_s, build_s = [], []
  for _ in range(2):  # Best of 2: the second pass runs with warm caches.
    start = time.perf_counter()
    passages = retrieval.chunk_documents(docs, run.tokenizer, args.passage_tokens)
    chunk_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    index = retrieval.RetrievalIndex.build(passages, sources=args.corpus.split(","),
                                           passage_tokens=args.passage_tokens,
                                           tokenizer=run.config.data.tokenizer)
    build_s.append(time.perf_counter() - start)
  path = retrieval.index_path(run.workdir, args.index_name)
  start = time.perf_counter()
  index.save(path)
  save_s = time.perf_counter() - start
  load_s = []
  for _ in range(2):
    start = time.perf_counter()
    loaded = retrieval.RetrievalIndex.load(path)
    load_s.append(time.perf_counter() - start)
  assert loaded.passages == index.passages, "the reloaded index lost passages"
  stats = {
      "sources": per_source, "documents": len(docs), "passages": len(index),
      "corpus_bytes": sum(len(t.encode("utf-8")) for _, t in docs),
      "passage_tokens": args.passage_tokens,
      "chunk_seconds": min(chunk_s), "build_seconds": min(build_s),
      "chunk_and_build_seconds": min(c + b for c, b in zip(chunk_s, build_s)),
      "save_seconds": save_s, "load_seconds": min(load_s), "path": str(path),
      "size_on_disk_bytes": folder_bytes(path), "stemmer": index.manifest["stemmer"] or None,
  }
  print(f"index: {json.dumps(stats)}", flush=True)
  return loaded, docs, stats


class TimedIndex:
  """An index whose `search` calls are timed and whose queries are kept (duck-typed)."""

  def __init__(self, index: retrieval.RetrievalIndex):
    self.index, self.queries, self.seconds = index, [], []

  def search(self, query: str, k: int) -> list[tuple[retrieval.Passage, float]]:
    start = time.perf_counter()
    hits = self.index.search(query, k)
    self.seconds.append(time.perf_counter() - start)
    self.queries.append(query)
    return hits


def query_timing(timed: TimedIndex, k: int) -> dict[str, Any]:
  """ms per query: the single searches as made, and one search_many over the same queries."""
  start = time.perf_counter()
  many = timed.index.search_many(timed.queries, k)
  many_s = time.perf_counter() - start
  # The batched call must rank exactly as the single calls did (spot-check 50 queries).
  for i in np.linspace(0, len(timed.queries) - 1, min(50, len(timed.queries))).astype(int):
    single = timed.index.search(timed.queries[i], k)
    assert [p for p, _ in single] == [p for p, _ in many[i]], "search_many != search"
  ms = 1e3 * np.asarray(timed.seconds)
  return {"queries": len(timed.queries), "top_k": k,
          "search_ms_mean": float(ms.mean()), "search_ms_median": float(np.median(ms)),
          "search_many_ms_per_query": 1e3 * many_s / len(timed.queries),
          "search_many_seconds": many_s,
          "empty_results": sum(not hits for hits in many)}


# --- part 2: bits/byte ---------------------------------------------------------------------

def bpb_part(args, run, params, eval_fn, texts: Sequence[str], timed: TimedIndex
             ) -> dict[str, Any]:
  stream = sliding_window.document_stream(texts, run.tokenizer)
  if args.max_tokens:
    stream = stream[:args.max_tokens]
  w, s = args.window, args.stride
  placed: list[int] = []  # Passage tokens (separators included) put in each rag window.

  def recorded(augment: Callable) -> Callable:
    def wrapper(row: np.ndarray, score_from: int) -> tuple[np.ndarray, int]:
      out, new_from = augment(row, score_from)
      # The augmenter moves score_from by the passages' tokens (see window_augmenter).
      placed.append(new_from - min(score_from, args.query_tokens - 1))
      return out, new_from
    return wrapper

  conditions = {
      "native": None,
      "control": retrieval.window_augmenter(None, run.tokenizer, args.top_k,
                                            args.query_tokens, w),
      "rag": recorded(retrieval.window_augmenter(timed, run.tokenizer, args.top_k,
                                                 args.query_tokens, w)),
  }
  out: dict[str, Any] = {"stream_tokens": int(len(stream)), "documents": len(texts)}
  for name, augment in conditions.items():
    start = time.perf_counter()
    out[name] = sliding_window.score(
        eval_fn, params, stream, w, s, args.batch_size, run.tokenizer,
        put_batch=lambda b: sharding.put_batch(b, run.mesh), augment=augment)
    out[name]["seconds"] = time.perf_counter() - start
    print(f"bpb {name}: {json.dumps(out[name])}", flush=True)
  scored = {n: (out[n]["tokens"], out[n]["bytes"]) for n in conditions}
  assert len(set(scored.values())) == 1, f"the conditions scored different targets: {scored}"
  bpb = {n: out[n]["bits_per_byte"] for n in conditions}
  out["gain_bits_per_byte"] = {  # Positive: rag is better (fewer bits per byte).
      "rag_vs_native": bpb["native"] - bpb["rag"],
      "rag_vs_control": bpb["control"] - bpb["rag"],
      "control_vs_native": bpb["native"] - bpb["control"],
  }
  out["relative_gain"] = {"rag_vs_native": 1 - bpb["rag"] / bpb["native"],
                          "rag_vs_control": 1 - bpb["rag"] / bpb["control"]}
  out["rag_passage_tokens_per_window"] = float(np.mean(placed)) if placed else 0.0
  out["rag_windows_without_passages"] = int(sum(p == 0 for p in placed))
  return out


# --- part 3: cloze -------------------------------------------------------------------------

def stopwords() -> frozenset[str]:
  import bm25s.stopwords  # pylint: disable=g-import-not-at-top (see retrieval's docstring)
  return frozenset(bm25s.stopwords.STOPWORDS_EN_PLUS) | frozenset(EXTRA_STOPWORDS)


def cloze_items(texts: Sequence[str], corpus_words: set[str], n: int, seed: int
                ) -> tuple[list[dict[str, Any]], int]:
  """(items, candidates): sentence-final content words that the corpus contains.

  A sentence ends at '.', '!' or '?' followed by whitespace or the end; its prefix runs
  from the previous sentence end (or line start) to the word before the final one, and
  must hold >= 4 words. Items are drawn without replacement with `seed`, kept in text order.
  """
  stop = stopwords()
  candidates = []
  for doc, text in enumerate(texts):
    for line_match in re.finditer(r"[^\n]+", text):
      line, base, begin = line_match.group(), line_match.start(), 0
      for m in re.finditer(r"(?<=\s)([A-Za-z]+)[.!?](?=\s|$)", line):
        prefix = line[begin:m.start(1)].strip()
        end_of_sentence = m.end()
        answer = m.group(1)
        if (len(answer) >= 4 and answer.lower() not in stop
            and answer.lower() in corpus_words and len(prefix.split()) >= 4):
          candidates.append({"doc": doc, "answer": answer, "prefix": prefix,
                             "end": base + len(line[:m.start(1)].rstrip())})
        begin = end_of_sentence
  rng = np.random.RandomState(seed)
  pick = sorted(rng.choice(len(candidates), min(n, len(candidates)), replace=False))
  return [candidates[i] for i in pick], len(candidates)


def first_word(text: str) -> str:
  """The first whitespace-separated word, lowercased, punctuation stripped ('' if none)."""
  words = text.split()
  return words[0].strip(string.punctuation).lower() if words else ""


def has_word(text: str, word: str) -> bool:
  return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, re.IGNORECASE) is not None


@functools.partial(jax.jit, static_argnames=("model", "new", "cache_len"))
def _greedy(model: nn.Module, params: Any, tokens: jax.Array, length: jax.Array, *, new: int,
            cache_len: int) -> jax.Array:
  """Greedy continuation of tokens[0, :length] (int32 [1, L], right-padded) -> int32 [new].

  The padded prefill writes keys/values at slots length..L-1 too; resetting the cache
  index to `length` puts the next token at that position: causal masks (slot <= position)
  never reach a padded slot before the decoded token overwrites it.
  """
  cache = generate_lib.init_cache(model, 1, cache_len)
  logits, variables = model.apply({"params": params, "cache": cache}, tokens, decode=True,
                                  mutable=["cache"])
  first = jnp.argmax(logits[0, length - 1].astype(jnp.float32)).astype(jnp.int32)
  cache = dict(variables["cache"], index=length.astype(jnp.int32))

  def step(carry, _):
    token, cache = carry
    logits, variables = model.apply({"params": params, "cache": cache}, token[None, None],
                                    decode=True, mutable=["cache"])
    token = jnp.argmax(logits[0, -1].astype(jnp.float32)).astype(jnp.int32)
    return (token, variables["cache"]), token

  _, rest = jax.lax.scan(step, (first, cache), None, length=new - 1)  # [new - 1]
  return jnp.concatenate([first[None], rest])


def greedy_decode(run, params, ids: np.ndarray, new: int) -> np.ndarray:
  """int32 [new]: greedy tokens after `ids` (int [P]), exact for any P (see `_greedy`)."""
  p = len(ids)
  padded = -(-p // BUCKET) * BUCKET
  tokens = np.full((1, padded), run.tokenizer.pad_id, np.int32)
  tokens[0, :p] = ids
  with sharding.activation_rules(run.mesh):
    out = _greedy(run.model, params, tokens, np.int32(p), new=new, cache_len=padded + new)
  return np.asarray(out)


def decoder_check(run, params, prompts: list[np.ndarray], decoded: list[np.ndarray],
                  new: int, batch: int = 8) -> dict[str, Any]:
  """Compares `greedy_decode`'s tokens with `generate`'s on the prompts of the most common
  length (one compile), in batches of `batch`."""
  lengths = [len(p) for p in prompts]
  common_len = max(set(lengths), key=lengths.count)
  rows = [i for i, n in enumerate(lengths) if n == common_len][:4 * batch]
  same = 0
  for first in range(0, len(rows), batch):
    chunk = rows[first:first + batch]
    prompt = np.stack([prompts[i] for i in chunk + chunk[-1:] * (batch - len(chunk))])
    out = np.asarray(generate_lib.generate(
        run.model, params, prompt.astype(np.int32), np.asarray(jax.random.PRNGKey(0)),
        max_new_tokens=new, temperature=0.0, top_k=0, mesh=run.mesh))
    same += sum(bool(np.array_equal(out[j], decoded[i])) for j, i in enumerate(chunk))
  return {"prompts_checked": len(rows), "prompt_tokens": common_len,
          "identical_to_generate": same}


def cloze_part(args, run, params, texts: Sequence[str], docs: Sequence[tuple[str, str]],
               timed: TimedIndex) -> dict[str, Any]:
  tok: Tokenizer = run.tokenizer
  start = time.perf_counter()
  corpus_words = {w.lower() for _, text in docs for w in WORD.findall(text)}
  items, candidates = cloze_items(texts, corpus_words, args.cloze_items, args.seed)
  build_s = time.perf_counter() - start
  budget = args.window - 16
  prompt_len = min(args.cloze_prompt_tokens, budget // 2)  # Half the input for passages.
  rows, prompts, plain_out = [], [], []
  start = time.perf_counter()
  for item in items:
    ids = tok.encode(texts[item["doc"]][:item["end"]])[-prompt_len:].astype(np.int32)
    prompts.append(ids)
    plain_out.append(greedy_decode(run, params, ids, args.cloze_new_tokens))
  plain_s = time.perf_counter() - start
  start = time.perf_counter()
  for item, ids, plain in zip(items, prompts, plain_out):
    hits = [p for p, _ in timed.search(item["prefix"], args.top_k)]
    aug = retrieval.augment(ids, hits, tok, budget_tokens=budget)
    rag = greedy_decode(run, params, aug.ids, args.cloze_new_tokens)
    placed_text = tok.decode(aug.ids[:aug.context_tokens])
    retrieved_text = "\n".join(p.text for p in hits)
    sentence = f"{item['prefix']} {item['answer']}"
    plain_text, rag_text = tok.decode(plain), tok.decode(rag)
    rows.append({
        "answer": item["answer"], "prefix": item["prefix"][-120:],
        "plain": plain_text, "rag": rag_text,
        "plain_em": first_word(plain_text) == item["answer"].lower(),
        "rag_em": first_word(rag_text) == item["answer"].lower(),
        "in_retrieved": has_word(retrieved_text, item["answer"]),
        "in_input": has_word(placed_text, item["answer"]),
        "verbatim": " ".join(sentence.split()) in " ".join(retrieved_text.split()),
        "in_prompt": has_word(tok.decode(ids), item["answer"]),
        "passages": aug.num_passages, "input_tokens": int(len(aug.ids)),
    })
  rag_s = time.perf_counter() - start
  # Would deeper retrieval find the answer? Recall at k beyond --top_k (one batched search).
  ks = sorted({1, args.top_k, 10, 30})
  deep = timed.index.search_many([item["prefix"] for item in items], ks[-1])
  recall_at = {str(k): sum(has_word("\n".join(p.text for p, _ in hits[:k]), item["answer"])
                           for hits, item in zip(deep, items)) / max(len(items), 1)
               for k in ks}
  n = max(len(rows), 1)
  mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
  hit = [r for r in rows if r["in_input"]]
  miss = [r for r in rows if not r["in_input"]]
  frac = lambda rs, key: sum(r[key] for r in rs) / len(rs) if rs else None  # noqa: E731
  out = {
      "items": len(rows), "candidates": candidates, "seed": args.seed,
      "prompt_tokens": prompt_len, "new_tokens": args.cloze_new_tokens,
      "budget_tokens": budget, "corpus_words": len(corpus_words),
      "exact_match": {"no_rag": mean("plain_em"), "rag": mean("rag_em")},
      "retrieval_recall": {"in_retrieved_passages": mean("in_retrieved"),
                           "in_model_input": mean("in_input"),
                           "in_top_k_passages": recall_at},
      "verbatim_sentence_in_passages": mean("verbatim"),
      "answer_in_prompt": mean("in_prompt"),
      # Reading vs retrieval: EM where the answer reached the input, and where it did not.
      "rag_em_given_answer_in_input": frac(hit, "rag_em"),
      "rag_em_given_answer_not_in_input": frac(miss, "rag_em"),
      "no_rag_em_given_answer_in_input": frac(hit, "plain_em"),
      "rag_fixed": sum(r["rag_em"] and not r["plain_em"] for r in rows),
      "rag_broke": sum(r["plain_em"] and not r["rag_em"] for r in rows),
      "mean_passages": sum(r["passages"] for r in rows) / n,
      "mean_rag_input_tokens": sum(r["input_tokens"] for r in rows) / n,
      "seconds": {"items": build_s, "no_rag": plain_s, "rag": rag_s},
      "decoder_check": decoder_check(run, params, prompts, plain_out, args.cloze_new_tokens)
                       if prompts else {},
      "examples": rows[:args.examples],
  }
  out["exact_match"]["gain"] = out["exact_match"]["rag"] - out["exact_match"]["no_rag"]
  print(f"cloze: {json.dumps({k: v for k, v in out.items() if k != 'examples'})}", flush=True)
  return out


# --- the plot ------------------------------------------------------------------------------

def plot(result: dict[str, Any], png: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top (the bench extra)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  parts = [p for p in ("bpb", "cloze") if p in result]
  fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.4), squeeze=False)
  for ax, part in zip(axes[0], parts):
    if part == "bpb":
      names = ["native", "control", "rag"]
      values = [result["bpb"][n]["bits_per_byte"] for n in names]
      ax.set_title(f"held-out bits/byte (W={result['window']}, S={result['stride']})")
      ax.set_ylim(min(values) * 0.95, max(values) * 1.02)
      colors = ["#888888", "#bbbbbb", "#3a7ebf"]
    else:
      c = result["cloze"]
      names = ["EM no RAG", "EM RAG", "answer in input"]
      values = [c["exact_match"]["no_rag"], c["exact_match"]["rag"],
                c["retrieval_recall"]["in_model_input"]]
      ax.set_title(f"cloze, {c['items']} items (top-{result['top_k']})")
      ax.set_ylim(0, 1)
      colors = ["#888888", "#3a7ebf", "#9cc3e6"]
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", required=True, help="A trained dsv2_jax workdir.")
  parser.add_argument("--out", required=True)
  parser.add_argument("--data_dir", default="~/tensorflow_datasets")
  parser.add_argument("--parts", default="bpb,cloze", help="Besides the index: bpb, cloze.")
  parser.add_argument("--corpus", default=",".join(CORPUS), help="Retrieval corpus specs.")
  parser.add_argument("--index_name", default=INDEX_NAME)
  parser.add_argument("--window", type=int, default=0, help="W (default: data.seq_len).")
  parser.add_argument("--stride", type=int, default=0, help="S (default: W // 4).")
  parser.add_argument("--top_k", type=int, default=3)
  parser.add_argument("--query_tokens", type=int, default=64)
  parser.add_argument("--passage_tokens", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=0, help="Windows per step "
                      "(default: the run's eval.batch_size).")
  parser.add_argument("--max_docs", type=int, default=0,
                      help="Validation articles used (0: all).")
  parser.add_argument("--max_tokens", type=int, default=65536,
                      help="bpb: tokens of the validation stream scored (0: all).")
  parser.add_argument("--max_corpus_docs", type=int, default=0,
                      help="Documents per corpus source (0: all).")
  parser.add_argument("--cloze_items", type=int, default=200)
  parser.add_argument("--cloze_prompt_tokens", type=int, default=256)
  parser.add_argument("--cloze_new_tokens", type=int, default=12)
  parser.add_argument("--examples", type=int, default=12, help="Cloze rows kept in the JSON.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help=f"Small caps: {QUICK}.")
  args = parser.parse_args(argv)
  if args.quick:
    for key, value in QUICK.items():
      setattr(args, key, value)
  args.data_dir = os.path.expanduser(args.data_dir)

  config = trainer.load_config(args.run)
  with config.unlocked():
    config.data.data_dir = args.data_dir
  run = trainer.Run(config, args.run)
  if run.checkpointer.latest_step() is None:
    raise SystemExit(f"{args.run} has no checkpoint: train it first.")
  args.window = args.window or config.data.seq_len
  args.stride = args.stride or max(1, args.window // 4)
  args.batch_size = args.batch_size or config.eval.batch_size
  sliding_window.check_window(args.window, args.stride)
  if args.window > config.model.max_seq_len:
    raise SystemExit(f"--window={args.window} > model.max_seq_len={config.model.max_seq_len}.")
  if args.query_tokens + args.stride >= args.window:
    raise SystemExit(f"--query_tokens ({args.query_tokens}) + --stride ({args.stride}) must "
                     f"be < --window ({args.window}): no room for passages.")

  result: dict[str, Any] = {
      "command": common.command("experiments.rag", argv), "run": str(run.workdir),
      "window": args.window, "stride": args.stride, "top_k": args.top_k,
      "query_tokens": args.query_tokens, "passage_tokens": args.passage_tokens,
      "batch_size": args.batch_size, "tokenizer": config.data.tokenizer,
      "model": {"d_model": config.model.d_model, "num_layers": config.model.num_layers,
                "max_seq_len": config.model.max_seq_len},
      "caps": {k: getattr(args, k) for k in ("max_docs", "max_tokens", "max_corpus_docs",
                                             "cloze_items")},
      "quick": args.quick,
  }
  started = time.perf_counter()
  index, docs, result["index"] = index_part(args, run)
  timed = TimedIndex(index)
  texts = [t for _, t in retrieval.load_corpus(HELD_OUT, args.data_dir,
                                               config.data.text_key)]
  if args.max_docs:
    texts = texts[:args.max_docs]
  start = time.perf_counter()
  state, shardings, _ = run.initial_state()
  result["step"] = int(state.step)
  result["restore_seconds"] = time.perf_counter() - start
  params = state.params
  if "bpb" in args.parts:
    eval_fn = evaluate.make_eval_fn(run.model, run.tokenizer, run.mesh, shardings.params)
    result["bpb"] = bpb_part(args, run, params, eval_fn, texts, timed)
  if "cloze" in args.parts:
    result["cloze"] = cloze_part(args, run, params, texts, docs, timed)
  if timed.queries:
    result["index"]["query_timing"] = query_timing(timed, args.top_k)
  result["seconds"] = time.perf_counter() - started
  summary = {"index_passages": len(index)}
  if "bpb" in result:
    summary.update({f"bpb_{n}": result["bpb"][n]["bits_per_byte"]
                    for n in ("native", "control", "rag")})
    summary["bpb_gain"] = result["bpb"]["gain_bits_per_byte"]
  if "cloze" in result:
    summary["cloze_exact_match"] = result["cloze"]["exact_match"]
    summary["cloze_retrieval_recall"] = result["cloze"]["retrieval_recall"]
  result["summary"] = summary
  common.write(result, args.out, lambda png: plot(result, png))


if __name__ == "__main__":
  main(sys.argv[1:])
