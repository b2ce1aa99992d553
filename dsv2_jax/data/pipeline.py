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
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import grain.experimental as grain_exp
import ml_collections
import numpy as np

from dsv2_jax.data import passkey, sources
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


PACKINGS = ("concat", "document")  # `data.packing`.
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
  source = sources.data_source(data.dataset, data.train_split, data.data_dir, data.download)
  if len(source) == 0:
    raise sources.DatasetUnavailableError(f"split {data.train_split!r} of {data.dataset!r} "
                                          "is empty.")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  ds = ds.seed(seed).shuffle().repeat(None)  # New order every epoch.
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
