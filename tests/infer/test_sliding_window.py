"""Sliding-window scoring: exactly-once coverage, context bounds, and NLL == direct passes."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
import pytest

from dsv2_jax.data.tokenizer import ByteTokenizer
from dsv2_jax.infer import sliding_window as sw
from dsv2_jax.parallel import sharding
from dsv2_jax.train.evaluate import make_eval_fn
from tests import helpers


def _owner(j: int, window: int, stride: int) -> int:
  """Oracle: the start of the window scoring target j, the first whose end reaches j."""
  return stride * max(0, math.ceil((j - window) / stride))


def test_window_spans_exhaustive():
  for n in range(1, 41):
    for window in range(1, 9):
      for stride in range(1, window + 1):
        spans = sw.window_spans(n, window, stride)
        scored = []
        for k, (begin, end, first) in enumerate(spans):
          assert begin == k * stride and 0 < end - begin <= window and end <= n - 1
          assert begin < first <= end
          for j in range(first, end + 1):
            assert j - begin >= min(j, window - stride)  # Context of target j.
            assert begin == _owner(j, window, stride)
          scored += range(first, end + 1)
        assert scored == list(range(1, n)), (n, window, stride)
        if stride == window:  # Disjoint rows of inputs, every target scored, contexts restart.
          rows = [(b, min(b + window, n - 1), b + 1) for b in range(0, n - 1, window)]
          assert spans == rows


def test_window_spans_and_score_reject_bad_arguments():
  for window, stride in ((0, 1), (4, 0), (4, 5)):
    with pytest.raises(ValueError):
      sw.window_spans(10, window, stride)
  for window, stride, word in ((1, 1, "window=1"), (4, 0, "stride=0"), (4, 5, "stride=5")):
    with pytest.raises(ValueError, match=word):
      sw.score(None, None, np.arange(10), window, stride, 2, ByteTokenizer())


def test_window_batches_reconstruct_the_stream():
  tokens = np.random.RandomState(0).randint(0, 256, 37).astype(np.int32)
  for window, stride, batch in ((8, 8, 3), (8, 3, 4), (6, 1, 5), (50, 10, 2)):
    spans = sw.window_spans(len(tokens), window, stride)
    batches = list(sw.window_batches(tokens, window, stride, batch, pad_id=257))
    assert len(batches) == math.ceil(len(spans) / batch)
    assert all(b[k].shape == (batch, window) for b in batches for k in b)
    inputs, targets, weights = (np.concatenate([b[k] for b in batches])
                                for k in ("inputs", "targets", "weights"))
    assert weights.sum() == len(tokens) - 1
    assert (inputs[len(spans):] == 257).all()  # Empty padding rows.
    seen = []
    for row in range(len(spans)):
      for p in np.flatnonzero(weights[row]):
        # Inputs up to p are a contiguous slice of the stream ending just before target.
        context = inputs[row, :p + 1]
        j = len(seen) + 1
        np.testing.assert_array_equal(context, tokens[j - p - 1:j])
        seen.append(targets[row, p])
    np.testing.assert_array_equal(seen, tokens[1:])


def test_document_stream_and_read_text_files(tmp_path):
  tok = ByteTokenizer()
  np.testing.assert_array_equal(sw.document_stream(["ab", "c"], tok), [97, 98, 256, 99, 256])
  good = tmp_path / "good.txt"
  good.write_text("héllo", encoding="utf-8")
  assert sw.read_text_files([str(good)]) == ["héllo"]
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "bad.txt").write_bytes(b"abc\xff")
  for name, words in (("empty.txt", "empty"), ("bad.txt", "offset 3"),
                      ("missing.txt", "no such file"), ("", "cannot read")):
    path = str(tmp_path / name)
    with pytest.raises(sw.TextFileError, match=words) as e:
      sw.read_text_files([str(good), path])
    assert path in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def scorer():
  cfg = helpers.small_model_config(max_seq_len=64)
  model, params, _ = helpers.init(cfg)
  mesh_cfg = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, expert=1, stage=1))
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
  tok = ByteTokenizer()
  eval_fn = make_eval_fn(model, tok, mesh, sharding.replicated(mesh))
  tokens = sw.document_stream(["The quick brown fox jumps over", "the lazy dog."], tok)

  def run(window, stride, batch_size=4):
    return sw.score(eval_fn, params, tokens, window, stride, batch_size, tok,
                    put_batch=lambda b: sharding.put_batch(b, mesh))

  apply = jax.jit(lambda x: model.apply({"params": params}, x, deterministic=True))

  def nll(inputs, targets):  # Oracle: one unpadded full forward pass, per-token NLL.
    logits = apply(np.asarray(inputs)[None])
    logp = np.asarray(jax.nn.log_softmax(logits[0].astype(np.float32)))
    return -logp[np.arange(len(targets)), targets]

  return tokens, run, nll


def _direct(tokens, nll, window, stride):
  """Total NLL with target j predicted from tokens[_owner(j):j], by independent passes."""
  n, total, passes = len(tokens), 0.0, {}
  for j in range(1, n):
    begin = _owner(j, window, stride)
    end = min(begin + window, n - 1)
    if begin not in passes:  # One pass per window start; position j - begin - 1 predicts j.
      passes[begin] = nll(tokens[begin:end], tokens[begin + 1:end + 1])
    total += passes[begin][j - begin - 1]
  return total


def test_score_equals_direct_forward_passes(scorer):
  tokens, run, nll = scorer
  n = len(tokens)
  num_bytes = int((tokens[1:] < 256).sum())
  full = nll(tokens[:-1], tokens[1:]).sum()  # One pass over everything.
  results = {}
  for window, stride in ((16, 16), (16, 5), (64, 64), (64, 7)):
    out = results[window, stride] = run(window, stride)
    assert out["tokens"] == n - 1 and out["bytes"] == num_bytes
    assert out["windows"] == len(sw.window_spans(n, window, stride))
    want = full if window >= n else _direct(tokens, nll, window, stride)
    np.testing.assert_allclose(out["loss"] * (n - 1), want, rtol=1e-4)
    np.testing.assert_allclose(out["bits_per_byte"], want / math.log(2) / num_bytes, rtol=1e-4)
    np.testing.assert_allclose(out["perplexity"], math.exp(want / (n - 1)), rtol=1e-4)
  # S = W: disjoint windows, each its own full pass over the rows of pipeline packing.
  disjoint = sum(nll(tokens[b:min(b + 16, n - 1)], tokens[b + 1:min(b + 16, n - 1) + 1]).sum()
                 for b in range(0, n - 1, 16))
  np.testing.assert_allclose(results[16, 16]["loss"] * (n - 1), disjoint, rtol=1e-4)
  # A window over the whole text gives the same figure at any stride.
  np.testing.assert_allclose(results[64, 7]["loss"], results[64, 64]["loss"], rtol=1e-5)
  assert results[16, 5]["windows"] > results[16, 16]["windows"]
