"""grain pipeline: packing, determinism, exact resume from a saved iterator state."""

from __future__ import annotations

import json

import numpy as np

from dsv2_jax.data import passkey, pipeline, sources
from dsv2_jax.data.tokenizer import ByteTokenizer
from tests.helpers import tiny_config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_are_packed_shifted_rows(data_dir):
  c = tiny_config(data_dir)
  tok = ByteTokenizer()
  batch = next(iter(pipeline.train_dataset(c.data, tok, seed=0)))
  assert batch["inputs"].shape == (4, 32) and batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["weights"].min() == 1.0  # Training rows are always full.


def test_document_separators_between_packed_documents(data_dir):
  c = tiny_config(data_dir)
  c.data.seq_len = 1024
  tok = ByteTokenizer()
  rows = np.concatenate([b["inputs"] for b in take(iter(pipeline.train_dataset(c.data, tok, 0)), 20)])
  assert (rows == tok.eos_id).sum() >= 1
  assert rows.max() <= tok.eos_id  # No padding ids inside training rows.


def test_same_seed_same_stream_other_seed_other_stream(data_dir):
  c = tiny_config(data_dir)
  tok = ByteTokenizer()
  a = take(iter(pipeline.train_dataset(c.data, tok, seed=1)), 5)
  b = take(iter(pipeline.train_dataset(c.data, tok, seed=1)), 5)
  d = take(iter(pipeline.train_dataset(c.data, tok, seed=2)), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, d))


def test_resume_from_saved_state_continues_exactly(data_dir):
  c = tiny_config(data_dir)
  tok = ByteTokenizer()
  it = iter(pipeline.train_dataset(c.data, tok, seed=0))
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # As stored in the checkpoint.
  expected = take(it, 6)
  resumed = iter(pipeline.train_dataset(c.data, tok, seed=0))
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 6)):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_epochs_reshuffle_documents():
  import grain
  ds = grain.MapDataset.source(list(range(20))).seed(0).shuffle().repeat(None)
  first, second = [ds[i] for i in range(20)], [ds[i] for i in range(20, 40)]
  assert sorted(first) == sorted(second) == list(range(20))
  assert first != second


def test_eval_pass_covers_the_split_once_with_padding_masked(data_dir):
  c = tiny_config(data_dir)
  c.data.dataset = "lee_news"
  tok = ByteTokenizer()
  batches = list(pipeline.eval_batches(c.data, tok, batch_size=8))
  again = list(pipeline.eval_batches(c.data, tok, batch_size=8))
  assert all(b["inputs"].shape == (8, 32) for b in batches)
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x["targets"], y["targets"])
  src = sources.data_source("lee_news", "validation", data_dir)
  total = sum(len(tok.encode(src[i]["text"])) + 1 for i in range(len(src)))  # + separator
  rows = sum(int((b["weights"].sum(axis=1) > 0).sum()) for b in batches)
  # Each packed row of T + 1 tokens yields T targets; only the last row is partial.
  assert sum(b["weights"].sum() for b in batches) == total - rows
  last = batches[-1]
  assert last["weights"][-1].sum() == 0  # Padding rows carry no weight.


def test_process_shards_are_disjoint(data_dir):
  c = tiny_config(data_dir)
  c.data.batch_size = 4
  tok = ByteTokenizer()
  a = next(iter(pipeline.train_dataset(c.data, tok, 0, shard_index=0, shard_count=2)))
  b = next(iter(pipeline.train_dataset(c.data, tok, 0, shard_index=1, shard_count=2)))
  assert a["inputs"].shape == (2, 32)
  assert not np.array_equal(a["inputs"], b["inputs"])


def test_document_packing_never_crosses_documents_and_resumes(data_dir):
  c = tiny_config(data_dir)
  c.data.update(packing="document", seq_len=256)
  tok = ByteTokenizer()
  it = iter(pipeline.train_dataset(c.data, tok, seed=0))
  batches = take(it, 6)
  source = sources.data_source("lee_news", "train", data_dir)
  texts = [source[i]["text"] for i in range(len(source))]
  for b in batches:
    for inputs, weights in zip(b["inputs"], b["weights"]):
      real = inputs[:int(weights.sum())]
      assert (real[:-1] != tok.eos_id).all()  # At most the last input is a separator.
      text = bytes(real[real < 256].astype(np.uint8).tolist())
      assert any(text in t for t in texts)  # One document's contiguous bytes.
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 3)
  resumed = iter(pipeline.train_dataset(c.data, tok, seed=0))
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 3)):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_passkey_rows_hide_the_key_in_their_own_text(data_dir):
  c = tiny_config(data_dir)
  c.data.update(passkey_fraction=0.5, seq_len=128, passkey_answer_weight=7.0)
  tok = ByteTokenizer()
  batches = take(iter(pipeline.train_dataset(c.data, tok, seed=0)), 8)
  rows = [(r, w) for b in batches for r, w in
          zip(np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1), b["weights"])]
  keyed = [(r, w, tok.decode(r)) for r, w in rows if passkey.QUESTION in tok.decode(r)]
  assert 0.25 < len(keyed) / len(rows) < 0.75  # 32 rows at p = 0.5.
  for row, weights, text in keyed:
    key = text[-passkey.KEY_DIGITS:]
    assert key.isdigit() and passkey.NEEDLE.format(key=key) in text
    tail = tok.encode(passkey.QUESTION + key)
    np.testing.assert_array_equal(row[-len(tail):], tail)  # The answer ends the row.
    np.testing.assert_array_equal(weights[-6:], [1, 7, 7, 7, 7, 7])  # The key's targets.
  assert all(w.max() == 1 for r, w in rows if passkey.QUESTION not in tok.decode(r))
