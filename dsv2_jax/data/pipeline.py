"""grain pipelines: documents -> token ids -> packed rows -> batches.

Training rows are packed "concat-then-split": documents, each followed by the
tokenizer's end-of-document id, are concatenated and cut into rows of `T + 1`
tokens; a row gives inputs `row[:-1]` and targets `row[1:]`. Attention runs across
document boundaries, as in GPT-style pretraining; the separator tells the model
where a document ends. The order is a seeded per-epoch shuffle of documents, so
the stream is deterministic for a seed and its position is the iterator state
(`get_state()` / `set_state()`), saved in every checkpoint.

With `data.packing='document'` (long-context stage 2: whole books and articles as
single documents), every row comes from one document instead: a document of n
tokens gives rows starting at 0, T, 2T, ... (each T + 1 tokens, the last one padded
with weight 0), and rows are shuffled within a window of `SHUFFLE_WINDOW` rows so a
batch mixes documents.

Evaluation rows are packed the same way, in document order, one full pass; the
tail row and batch are padded and carry weight 0.

Batch arrays (numpy):
  inputs   int32 [B, T]  tokens fed to the model
  targets  int32 [B, T]  next tokens
  weights  float32 [B, T]  1 for real targets, 0 for padding

`data.format='chat'` (instruction tuning) renders each prompt/response example in the
chat template (`data/chat.py`): weights are 1 on response tokens only. With
`data.packing='first_fit'`, grain's first-fit packing fills rows with whole examples
and adds
  positions  int32 [B, T]  each example's positions, restarting at 0
so attention stays within an example (`Transformer(tokens, positions)`);
`packing='none'` gives each example its own padded row. An example longer than a row
is cut to the row.

`data.format='preference'` (a reward model) draws pairs: every label-1 text with a
label-0 text picked at random (seeded), each as `text <eos>` cut to T tokens:
  chosen, rejected            int32 [B, T]
  chosen_mask, rejected_mask  float32 [B, T]  the text's reward = sum(scores * mask): 1 at
                              its <eos> (data.score_pooling='last') or 1/n on each of its
                              n tokens ('mean')
  weights                     float32 [B, T]  = chosen_mask (one per pair)
and evaluation scores every held-out text once (`preference_eval_batches`).
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import grain.experimental as grain_exp
import ml_collections
import numpy as np

from dsv2_jax.data import chat, passkey, sources
from dsv2_jax.data.tokenizer import Tokenizer


def _tokenize_fn(tokenizer: Tokenizer, text_key: str):
  def tokenize(example: dict[str, Any]) -> dict[str, np.ndarray]:
    ids = tokenizer.encode(example[text_key])
    return {"tokens": np.append(ids, tokenizer.eos_id).astype(np.int32)}
  return tokenize


def _to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = row["tokens"]  # [T + 1]
  valid = row["tokens_segment_ids"] > 0  # Concat-then-split pads the tail with segment 0.
  return {
      "inputs": tokens[:-1],
      "targets": tokens[1:],
      "weights": valid[1:].astype(np.float32),
  }


FORMATS = ("text", "chat", "preference")  # `data.format`.
PACKINGS = {"text": ("concat", "document"),  # `data.packing`, per format.
            "chat": ("first_fit", "none"),
            "preference": ("none",)}
SCORE_POOLINGS = ("last", "mean")  # `data.score_pooling`.
FIRST_FIT_BINS = 16  # Rows filled at once by first-fit packing (more: less padding).
SHUFFLE_WINDOW = 256  # Rows shuffled together by packing='document'.


class _DocumentRows(grain_exp.FlatMapTransform):
  """One tokenized document -> its rows of T + 1 tokens (never across documents)."""

  max_fan_out = 1 << 20

  def __init__(self, seq_len: int, pad_id: int):
    self.seq_len, self.pad_id = seq_len, pad_id

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    tokens, t = element["tokens"], self.seq_len
    rows = []
    for start in range(0, max(len(tokens) - 1, 0), t):
      row = tokens[start:start + t + 1]
      valid = np.zeros(t + 1, bool)
      valid[:len(row)] = True
      row = np.pad(row, (0, t + 1 - len(row)), constant_values=self.pad_id)
      rows.append({"tokens": row, "tokens_segment_ids": valid.astype(np.int32)})
    return rows


def _packed(ds: grain.IterDataset, seq_len: int, packing: str = "concat", pad_id: int = 0,
            seed: int = 0) -> grain.IterDataset:
  if packing == "document":
    ds = grain_exp.FlatMapIterDataset(ds, _DocumentRows(seq_len, pad_id))
    if seed is not None:
      ds = grain_exp.WindowShuffleIterDataset(ds, window_size=SHUFFLE_WINDOW, seed=seed)
  else:
    ds = grain_exp.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  return ds.map(_to_example)


class _PasskeyMix(grain.transforms.RandomMap):
  """Turns a `fraction` of full rows into pass-key rows built from their own text; their
  answer tokens weigh `answer_weight` in the loss (every other token 1)."""

  def __init__(self, fraction: float, tokenizer: Tokenizer, answer_weight: float = 1.0):
    self.fraction, self.tokenizer, self.answer_weight = fraction, tokenizer, answer_weight

  def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    if rng.uniform() >= self.fraction or not example["weights"].all():
      return example
    tokens = np.concatenate([example["inputs"][:1], example["targets"]])  # [T + 1]
    tokens, answer = passkey.mix_into_row(tokens, rng, self.tokenizer)
    weights = example["weights"].copy()
    weights[-answer:] = self.answer_weight
    return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights}


def _chat_example_fn(tokenizer: Tokenizer, data: ml_collections.ConfigDict):
  """Example -> inputs/targets/weights [n - 1] of its chat rendering (cut to T)."""
  def render(example: dict[str, Any]) -> dict[str, np.ndarray]:
    tokens, weights = chat.render_example(tokenizer, sources.as_text(example[data.prompt_key]),
                                          sources.as_text(example[data.response_key]))
    tokens, weights = tokens[:data.seq_len + 1], weights[:data.seq_len + 1]
    return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights[1:]}
  return render


def _chat_rows(ds: grain.IterDataset, data: ml_collections.ConfigDict, pad_id: int,
               seed: int | None) -> grain.IterDataset:
  """Examples -> rows of T: first-fit packed (with positions) or one per padded row."""
  t = data.seq_len
  if data.packing == "first_fit":
    ds = grain_exp.FirstFitPackIterDataset(
        ds, length_struct={"inputs": t, "targets": t, "weights": t},
        num_packing_bins=FIRST_FIT_BINS, seed=seed or 0, shuffle_bins=seed is not None,
        padding_struct={"inputs": pad_id, "targets": pad_id, "weights": 0.0})
    return ds.map(lambda r: {"inputs": r["inputs"], "targets": r["targets"],
                             "weights": r["weights"],
                             "positions": r["inputs_positions"].astype(np.int32)})

  def pad(r):
    n = t - len(r["inputs"])
    return {"inputs": np.pad(r["inputs"], (0, n), constant_values=pad_id),
            "targets": np.pad(r["targets"], (0, n), constant_values=pad_id),
            "weights": np.pad(r["weights"], (0, n))}
  return ds.map(pad)


def _scored_text(tokenizer: Tokenizer, text: Any, seq_len: int, pooling: str = "last"
                 ) -> tuple[np.ndarray, np.ndarray]:
  """`text <eos>` cut to seq_len and padded: (tokens int32 [T], score mask float32 [T]:
  one-hot at <eos>, or 1/n on its n tokens with pooling 'mean')."""
  ids = np.append(tokenizer.encode(sources.as_text(text))[:seq_len - 1], tokenizer.eos_id).astype(np.int32)
  mask = np.zeros(seq_len, np.float32)
  if pooling == "mean":
    mask[:len(ids)] = 1.0 / len(ids)
  else:
    mask[len(ids) - 1] = 1.0
  return np.pad(ids, (0, seq_len - len(ids)), constant_values=tokenizer.pad_id), mask


def _labels(source, label_key: str) -> np.ndarray:
  return np.array([int(source[i][label_key]) for i in range(len(source))])


class _PreferencePair(grain.transforms.RandomMap):
  """A preferred text's index -> the pair (it, a random dispreferred text), tokenized."""

  def __init__(self, source, rejected: np.ndarray, data: ml_collections.ConfigDict,
               tokenizer: Tokenizer):
    self.source, self.rejected, self.data, self.tokenizer = source, rejected, data, tokenizer

  def random_map(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    other = int(self.rejected[rng.integers(len(self.rejected))])
    out = {}
    for name, i in (("chosen", int(index)), ("rejected", other)):
      tokens, mask = _scored_text(self.tokenizer, self.source[i][self.data.text_key],
                                  self.data.seq_len, self.data.score_pooling)
      out[name], out[f"{name}_mask"] = tokens, mask
    out["weights"] = out["chosen_mask"]
    return out


def _preference_pairs(data: ml_collections.ConfigDict, tokenizer: Tokenizer, seed: int,
                      shard_index: int, shard_count: int) -> grain.IterDataset:
  source = sources.data_source(data.dataset, data.train_split, data.data_dir, data.download)
  labels = _labels(source, data.label_key)
  chosen, rejected = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
  if not len(chosen) or not len(rejected):
    raise sources.DatasetUnavailableError(
        f"data.dataset={data.dataset!r} split {data.train_split!r} needs texts with "
        f"{data.label_key}=1 and =0 for preference pairs; it has {len(chosen)} and "
        f"{len(rejected)}.")
  ds = grain.MapDataset.source(chosen[shard_index::shard_count])
  ds = ds.seed(seed).shuffle().repeat(None)
  ds = ds.random_map(_PreferencePair(source, rejected, data, tokenizer))
  return ds.to_iter_dataset().batch(data.batch_size // shard_count, drop_remainder=True)


def preference_eval_batches(data: ml_collections.ConfigDict, tokenizer: Tokenizer,
                            batch_size: int, max_batches: int = 0
                            ) -> Iterator[dict[str, np.ndarray]]:
  """Every eval-split text once, in order: inputs, score_mask [B, T], label and valid [B].

  The tail batch is padded with valid = 0.
  """
  source = sources.data_source(data.dataset, data.eval_split, data.data_dir, data.download)
  for b, start in enumerate(range(0, len(source), batch_size)):
    if max_batches and b >= max_batches:
      return
    rows = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    scored = [_scored_text(tokenizer, r[data.text_key], data.seq_len, data.score_pooling)
              for r in rows]
    pad = batch_size - len(rows)
    yield {"inputs": np.stack([s[0] for s in scored] + [scored[0][0]] * pad),
           "score_mask": np.stack([s[1] for s in scored] + [scored[0][1]] * pad),
           "label": np.array([int(r[data.label_key]) for r in rows] + [0] * pad),
           "valid": np.array([1] * len(rows) + [0] * pad)}


def train_dataset(data: ml_collections.ConfigDict, tokenizer: Tokenizer, seed: int,
                  shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """Infinite, shuffled, packed, batched training stream for this process's shard.

  Args:
    data: the `data` config section.
    tokenizer: text -> ids.
    seed: shuffle seed; each epoch is shuffled differently but deterministically.
    shard_index, shard_count: this process's share of documents (multi-host).

  Returns:
    An IterDataset of batches [data.batch_size // shard_count, data.seq_len].
  """
  if data.batch_size % shard_count:
    raise ValueError(f"data.batch_size={data.batch_size} must be divisible by the "
                     f"number of processes ({shard_count}).")
  if data.format == "preference":
    return _preference_pairs(data, tokenizer, seed, shard_index, shard_count)
  source = sources.data_source(data.dataset, data.train_split, data.data_dir, data.download)
  if len(source) == 0:
    raise sources.DatasetUnavailableError(f"split {data.train_split!r} of {data.dataset!r} "
                                          "is empty.")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  ds = ds.seed(seed).shuffle().repeat(None)  # New order every epoch.
  if data.format == "chat":
    ds = _chat_rows(ds.map(_chat_example_fn(tokenizer, data)).to_iter_dataset(), data,
                    tokenizer.pad_id, seed)
    return ds.batch(data.batch_size // shard_count, drop_remainder=True)
  ds = ds.map(_tokenize_fn(tokenizer, data.text_key)).to_iter_dataset()
  ds = _packed(ds, data.seq_len, data.packing, tokenizer.pad_id, seed)
  if data.passkey_fraction > 0:
    ds = ds.random_map(_PasskeyMix(data.passkey_fraction, tokenizer,
                                   data.passkey_answer_weight), seed=seed + 1)
  return ds.batch(data.batch_size // shard_count, drop_remainder=True)


def eval_batches(data: ml_collections.ConfigDict, tokenizer: Tokenizer, batch_size: int,
                 max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over the eval split; every batch has `batch_size` rows."""
  source = sources.data_source(data.dataset, data.eval_split, data.data_dir, data.download)
  if data.format == "chat":
    ds = grain.MapDataset.source(source).map(_chat_example_fn(tokenizer, data))
    ds = _chat_rows(ds.to_iter_dataset(), data, tokenizer.pad_id, seed=None)
  else:
    ds = grain.MapDataset.source(source).map(_tokenize_fn(tokenizer, data.text_key))
    ds = _packed(ds.to_iter_dataset(), data.seq_len, data.packing, tokenizer.pad_id, seed=None)
  ds = ds.batch(batch_size, drop_remainder=False)
  for i, batch in enumerate(ds):
    if max_batches and i >= max_batches:
      return
    rows = batch["inputs"].shape[0]
    if rows < batch_size:  # Pad the tail batch so every eval step has one shape.
      pad = batch_size - rows
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    yield batch
