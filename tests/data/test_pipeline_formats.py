"""Stage-3 data formats: chat rows (first-fit packed or one per row) and preference pairs.

Every row is checked against the source examples it came from, rebuilt here by hand
(not with `chat.render`): a packed example's tokens, its restarting positions and its
loss weights (response text and the closing <end_of_turn> only); a preference pair's
texts and labels. Streams are deterministic and resume exactly from a saved state.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from dsv2_jax.data import pipeline, sources
from dsv2_jax.data.tokenizer import ByteTokenizer
from tests.helpers import tiny_config

TOK = ByteTokenizer()
USER, ASSISTANT, EOT = (TOK.chat_ids[k] for k in ("user", "assistant", "end_of_turn"))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def chat_config(data_dir, packing="first_fit", seq_len=128, dataset="chatterbot"):
  c = tiny_config(data_dir)
  c.data.update(dataset=dataset, format="chat", packing=packing, seq_len=seq_len)
  return c


def preference_config(data_dir, seq_len=96):
  c = tiny_config(data_dir)
  c.model.head = "scalar"
  c.data.update(dataset="rotten_tomatoes", format="preference", packing="none",
                seq_len=seq_len, batch_size=8)
  return c


def rendered(prompt: str, response: str) -> tuple[tuple[int, ...], np.ndarray]:
  """The chat tokens of one example, by hand, and the weight of predicting each token."""
  u, r = list(TOK.encode(prompt)), list(TOK.encode(response))
  tokens = [USER] + u + [EOT, ASSISTANT] + r + [EOT]
  weights = np.zeros(len(tokens), np.float32)
  weights[len(u) + 3:] = 1.0  # The response and its <end_of_turn>.
  return tuple(tokens), weights


@pytest.fixture(scope="module")
def chat_examples(data_dir):
  """{split: {full token tuple: (prompt, response, weights)}} of chatterbot."""
  out = {}
  for split in ("train", "validation"):
    src = sources.data_source("chatterbot", split, data_dir)
    out[split] = {}
    for i in range(len(src)):
      p, r = text(src[i]["prompt"]), text(src[i]["response"])
      tokens, weights = rendered(p, r)
      out[split][tokens] = (p, r, weights)
  return out


def segments(row: dict[str, np.ndarray]) -> list[tuple[int, int]]:
  """(start, end) of each packed example: positions 0, 1, 2, ... from each 0 on; the
  padding (weight 0, position 0, one token each) closes the row."""
  pos, w = row["positions"], row["weights"]
  starts = list(np.flatnonzero(pos == 0)) + [len(pos)]
  out = []
  for s, e in zip(starts[:-1], starts[1:]):
    np.testing.assert_array_equal(pos[s:e], np.arange(e - s))  # Restart at 0, contiguous.
    out.append((s, e))
  # Real examples come first; then single-token pads that carry no weight.
  real = [(s, e) for s, e in out if e - s > 1 or row["inputs"][s] == USER]
  assert real == out[:len(real)]
  tail = out[len(real)][0] if len(real) < len(out) else len(pos)
  assert (w[tail:] == 0).all() and (pos[tail:] == 0).all()
  return real


def check_example(inputs, targets, weights, examples, seq_len):
  """One example's inputs/targets/weights equal a source example's rendering (cut to
  seq_len + 1 tokens); returns its (prompt, response)."""
  seq = tuple(inputs) + (int(targets[-1]),)
  np.testing.assert_array_equal(inputs[1:], targets[:-1])  # Next-token shift.
  match = examples.get(seq)
  if match is None:  # Cut to the row: a prefix of a longer example.
    assert len(seq) == seq_len + 1, seq
    match = next(v for k, v in examples.items() if k[:len(seq)] == seq)
  prompt, response, full_weights = match
  np.testing.assert_array_equal(weights, full_weights[1:len(seq)])
  if len(seq) == len(rendered(prompt, response)[0]):  # Whole: the loss is the response.
    assert TOK.decode(targets[weights > 0]) == response
    assert targets[weights > 0][-1] == EOT
  # Weighted targets are response bytes or <end_of_turn>, never role or prompt tokens.
  scored = targets[weights > 0]
  assert not np.isin(scored, [USER, ASSISTANT]).any()
  return prompt, response


def test_first_fit_rows_hold_whole_examples_with_response_only_weights(data_dir, chat_examples):
  c = chat_config(data_dir)
  batches = take(iter(pipeline.train_dataset(c.data, TOK, seed=0)), 6)
  seen, per_row = [], []
  for b in batches:
    assert set(b) == {"inputs", "targets", "weights", "positions"}
    assert b["inputs"].shape == b["positions"].shape == (4, 128)
    assert b["positions"].dtype == np.int32
    for i in range(4):
      row = {k: v[i] for k, v in b.items()}
      spans = segments(row)
      per_row.append(len(spans))
      for s, e in spans:
        assert row["inputs"][s] == USER  # Each example starts with its user turn.
        seen.append(check_example(row["inputs"][s:e], row["targets"][s:e],
                                  row["weights"][s:e], chat_examples["train"], 128))
  assert max(per_row) >= 2  # Rows really are packed (the segment checks can fail).
  assert len(set(seen)) > 20


def test_unpacked_rows_hold_one_padded_example(data_dir, chat_examples):
  c = chat_config(data_dir, packing="none")
  for b in take(iter(pipeline.train_dataset(c.data, TOK, seed=0)), 4):
    assert set(b) == {"inputs", "targets", "weights"}
    for inputs, targets, weights in zip(b["inputs"], b["targets"], b["weights"]):
      assert inputs[0] == USER and (inputs == USER).sum() == 1  # One example per row.
      pad = inputs == TOK.pad_id
      n = int((~pad).sum())
      assert not pad[:n].any()  # Padding only at the end.
      assert (weights[n:] == 0).all() and (targets[n:] == TOK.pad_id).all()
      check_example(inputs[:n], targets[:n], weights[:n], chat_examples["train"], 128)


def test_chat_eval_pass_packs_every_example_exactly_once(data_dir, chat_examples):
  c = chat_config(data_dir, seq_len=512)  # Long rows: nearly every example whole.
  batches = list(pipeline.eval_batches(c.data, TOK, batch_size=8))
  again = list(pipeline.eval_batches(c.data, TOK, batch_size=8))
  found = collections.Counter()
  for b, b2 in zip(batches, again):
    np.testing.assert_array_equal(b["inputs"], b2["inputs"])
    for i in range(8):
      row = {k: v[i] for k, v in b.items()}
      for s, e in segments(row):
        found[check_example(row["inputs"][s:e], row["targets"][s:e], row["weights"][s:e],
                            chat_examples["validation"], 512)] += 1
  src = sources.data_source("chatterbot", "validation", data_dir)
  expected = collections.Counter((text(src[i]["prompt"]), text(src[i]["response"]))
                                 for i in range(len(src)))
  assert found == expected


@pytest.mark.parametrize("packing", ["first_fit", "none"])
def test_chat_stream_is_deterministic_and_resumes(data_dir, packing):
  c = chat_config(data_dir, packing=packing)
  it = iter(pipeline.train_dataset(c.data, TOK, seed=3))
  first = take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # As stored in the checkpoint.
  expected = take(it, 4)
  again = take(iter(pipeline.train_dataset(c.data, TOK, seed=3)), 3)
  other = take(iter(pipeline.train_dataset(c.data, TOK, seed=4)), 3)
  resumed = iter(pipeline.train_dataset(c.data, TOK, seed=3))
  resumed.set_state(state)
  for x, y in zip(first + expected, again + take(resumed, 4)):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(first, other))


def test_mixture_joins_the_sources_in_order(data_dir):
  a = sources.data_source("chatterbot", "validation", data_dir)
  b = sources.data_source("bible_quotes", "validation", data_dir)
  mix = sources.data_source("chatterbot+bible_quotes", "validation", data_dir)
  assert len(mix) == len(a) + len(b)
  for i, j in ((0, 0), (len(a) - 1, len(a) - 1), (len(a), 0), (len(mix) - 1, len(b) - 1)):
    want = a[j] if i < len(a) else b[j]
    assert text(mix[i]["prompt"]) == text(want["prompt"])
    assert text(mix[i]["response"]) == text(want["response"])


@pytest.fixture(scope="module")
def reviews(data_dir):
  """{split: (texts, labels)} of rotten_tomatoes."""
  out = {}
  for split in ("train", "validation"):
    src = sources.data_source("rotten_tomatoes", split, data_dir)
    rows = [src[i] for i in range(len(src))]
    out[split] = ([text(r["text"]) for r in rows], np.array([int(r["label"]) for r in rows]))
  return out


def scored_text(tokens: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[bytes, bool]:
  """(text bytes before the scored <eos>, whether the text was cut); checks the layout."""
  assert mask.dtype == np.float32 and mask.sum() == 1.0 and set(np.unique(mask)) <= {0.0, 1.0}
  at = int(np.argmax(mask))
  assert tokens[at] == TOK.eos_id
  assert (tokens[at + 1:] == TOK.pad_id).all() and (tokens[:at] < 256).all()
  return bytes(tokens[:at].astype(np.uint8).tolist()), at == seq_len - 1


def label_of(body: bytes, cut: bool, texts: list[str], labels: np.ndarray) -> set[int]:
  """Labels of the source texts this (possibly cut) text can be."""
  if not cut:
    return {int(labels[i]) for i, t in enumerate(texts) if t.encode() == body}
  return {int(labels[i]) for i, t in enumerate(texts) if t.encode().startswith(body)}


def test_preference_pairs_are_label_one_against_label_zero(data_dir, reviews):
  c = preference_config(data_dir)
  t = c.data.seq_len
  texts, labels = reviews["train"]
  index = collections.defaultdict(set)
  for tx, label in zip(texts, labels):
    index[tx.encode()].add(int(label))
  batches = take(iter(pipeline.train_dataset(c.data, TOK, seed=0)), 5)
  chosen_seen, cuts = [], 0
  for b in batches:
    assert set(b) == {"chosen", "rejected", "chosen_mask", "rejected_mask", "weights"}
    assert b["chosen"].shape == b["rejected"].shape == (8, t)
    np.testing.assert_array_equal(b["weights"], b["chosen_mask"])  # One weight per pair.
    for side, want in (("chosen", 1), ("rejected", 0)):
      for tokens, mask in zip(b[side], b[f"{side}_mask"]):
        body, cut = scored_text(tokens, mask, t)
        cuts += cut
        found = index.get(body) if not cut else label_of(body, True, texts, labels)
        assert found and want in found, (side, body)
        if not cut:
          assert found == {want}
        if side == "chosen":
          chosen_seen.append(body)
  assert len(set(chosen_seen)) == len(chosen_seen)  # First epoch: no chosen text twice.
  assert cuts > 0  # Some reviews exceed 95 bytes: the cut path is exercised.


def test_preference_tokens_are_int32(data_dir):
  """As documented (and as chat/text rows are): int32 token rows, not numpy's int64."""
  c = preference_config(data_dir)
  b = next(iter(pipeline.train_dataset(c.data, TOK, seed=0)))
  e = next(pipeline.preference_eval_batches(c.data, TOK, batch_size=4))
  assert (b["chosen"].dtype, b["rejected"].dtype, e["inputs"].dtype) == (np.int32,) * 3


def test_preference_stream_is_deterministic_and_resumes(data_dir):
  c = preference_config(data_dir)
  it = iter(pipeline.train_dataset(c.data, TOK, seed=0))
  first = take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 3)
  again = take(iter(pipeline.train_dataset(c.data, TOK, seed=0)), 2)
  other = next(iter(pipeline.train_dataset(c.data, TOK, seed=1)))
  resumed = iter(pipeline.train_dataset(c.data, TOK, seed=0))
  resumed.set_state(state)
  for x, y in zip(first + expected, again + take(resumed, 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(first[0]["chosen"], other["chosen"])


def test_preference_eval_scores_every_text_once(data_dir, reviews):
  c = preference_config(data_dir, seq_len=512)  # Long enough for every review.
  texts, labels = reviews["validation"]
  batches = list(pipeline.preference_eval_batches(c.data, TOK, batch_size=100))
  assert len(batches) == -(-len(texts) // 100)
  got_texts, got_labels = [], []
  for b in batches:
    assert b["inputs"].shape == b["score_mask"].shape == (100, 512)
    assert set(np.unique(b["valid"])) <= {0, 1}
    for tokens, mask, label, valid in zip(b["inputs"], b["score_mask"], b["label"], b["valid"]):
      body, cut = scored_text(tokens, mask, 512)
      if valid:
        assert not cut
        got_texts.append(body.decode())
        got_labels.append(int(label))
  assert got_texts == texts and got_labels == list(labels)  # Each once, in order.
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, np.arange(len(valid)) < len(texts))  # Tail padded.
  assert len(valid) > len(texts)  # 1,292 texts: the tail batch is padded (the check can fail).
  assert len(list(pipeline.preference_eval_batches(c.data, TOK, 100, max_batches=3))) == 3


def test_mean_score_pooling_spreads_the_mask_over_the_text_and_its_eos(data_dir):
  c = preference_config(data_dir)
  last = next(iter(pipeline.train_dataset(c.data, TOK, seed=0)))
  c.data.score_pooling = "mean"
  mean = next(iter(pipeline.train_dataset(c.data, TOK, seed=0)))
  np.testing.assert_array_equal(last["chosen"], mean["chosen"])  # Same pairs, same tokens.
  for side in ("chosen", "rejected"):
    for tokens, one_hot, spread in zip(mean[side], last[f"{side}_mask"], mean[f"{side}_mask"]):
      n = int(np.argmax(one_hot)) + 1  # The text and its <eos>.
      np.testing.assert_allclose(spread[:n], 1.0 / n, rtol=1e-6)
      assert not spread[n:].any() and tokens[n - 1] == TOK.eos_id
  np.testing.assert_allclose(mean["weights"].sum(axis=1), 1.0, rtol=1e-5)  # One per pair.
