"""Strided sliding-window scoring of long text with a fixed-length model.

The standard recipe for the perplexity of a fixed-length model (Hugging Face,
"Perplexity of fixed-length models"; the strided evaluation of Press et al. 2021,
"Shortformer"): a token stream longer than the model's window W is cut into
windows of at most W tokens whose starts advance by the stride S; each window
scores only the targets no earlier window scored, the last S (fewer at the start
and end), so

  * every target (token 1 .. n-1 of the stream; token 0 has nothing to be
    predicted from) is scored exactly once, and totals are sums over the stream;
  * a scored token j sees >= min(j, W - S) tokens of context: all earlier tokens
    near the start, and at least the W - S tokens the window carries over later.

With S = W the windows are disjoint and each one restarts from an empty context,
so tokens just past a window boundary are predicted from almost nothing. A
smaller stride gives every scored token a long context and so lowers the loss
and bits per byte (toward the model's true long-context quality), at the price
of W / S times the forward passes. S = 1 is the exact "full context of W - 1"
figure; S = W / 4 (SPEC 3.3: W 2048, S 512) is the usual compromise.

Metrics are those of `dsv2_jax.train.evaluate.evaluate`: loss is the mean NLL
(nats) per scored token, bits_per_byte = total NLL / ln 2 / UTF-8 bytes of the
scored tokens. The module knows no mesh: `score` takes a jitted eval step
(`train.evaluate.make_eval_fn`) and a function placing host batches on devices
(`lambda b: sharding.put_batch(b, mesh)`).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from dsv2_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


class TextFileError(ValueError):
  """A text file to score is missing, unreadable, empty or not UTF-8."""


def check_window(window: int, stride: int) -> None:
  """Raises a one-line ValueError unless 2 <= window and 1 <= stride <= window."""
  if window < 2:
    raise ValueError(f"window={window} must be >= 2 tokens: a 1-token window predicts each "
                     "token from only the one before it.")
  if stride < 1:
    raise ValueError(f"stride={stride} must be >= 1 token.")
  if stride > window:
    raise ValueError(f"stride={stride} is larger than window={window}: tokens between "
                     "windows would never be scored; use a stride <= window.")


def window_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """The windows over a stream of `num_tokens` tokens, as (begin, end, first_scored).

  Window k feeds inputs tokens[begin:end] and predicts targets tokens[begin+1:end+1]
  (so end <= num_tokens - 1 and end - begin <= window), and scores the targets with
  stream indices first_scored .. end (inclusive): its last end - first_scored + 1
  positions. begin = k * stride and end = min(begin + window, num_tokens - 1); the
  first window scores all its targets (first_scored = 1) and each later one starts
  scoring just past the previous window's end. The last window is the first whose end
  reaches the stream end (num_tokens - 1); it is cut short there, not shifted back, so
  that with stride == window the windows are exactly the disjoint rows
  [k W, (k+1) W) of inputs, each scoring all of its targets.

  Hence every index 1 .. num_tokens-1 is scored exactly once, and a scored index j
  sees j - begin >= min(j, window - stride + 1) tokens of context. No windows when
  num_tokens < 2. This is pure index arithmetic and accepts window >= 1.
  """
  if window < 1 or stride < 1 or stride > window:
    raise ValueError(f"window={window}, stride={stride}: need 1 <= stride <= window.")
  last = num_tokens - 1  # Index of the last target.
  spans, scored, begin = [], 0, 0  # `scored`: targets 1..scored are done.
  while scored < last:
    end = min(begin + window, last)
    spans.append((begin, end, scored + 1))
    scored, begin = end, begin + stride
  return spans


# (row, score_from) -> (row', score_from'): rewrites a window's tokens before it is scored,
# e.g. retrieval puts passages ahead of it (`dsv2_jax.infer.retrieval.window_augmenter`).
# A row is inputs + the last target (<= W + 1 tokens); targets row[p + 1] for
# p >= score_from are scored. The result must keep those targets and fit W + 1 tokens.
Augment = Callable[[np.ndarray, int], tuple[np.ndarray, int]]


def window_batches(tokens: np.ndarray, window: int, stride: int, batch_size: int,
                   pad_id: int, augment: Augment | None = None) -> Iterator[Batch]:
  """Batches of the windows of `window_spans`, every one [batch_size, window].

  Args:
    tokens: int [n] the token stream.
    window, stride: W and S, 1 <= S <= W.
    batch_size: rows per batch B; the last batch is padded with empty rows.
    pad_id: the token filling short windows (on the right, where causal attention
      keeps it from the real positions) and empty rows.
    augment: optional rewrite of each window (see `Augment`).

  Yields:
    {inputs int32 [B, W], targets int32 [B, W], weights float32 [B, W]}: weights
    are 1 exactly on the targets the window scores, 0 on context and padding.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  tokens = np.asarray(tokens, np.int32).reshape(-1)
  spans = window_spans(len(tokens), window, stride)
  for first in range(0, len(spans), batch_size):
    inputs = np.full((batch_size, window), pad_id, np.int32)  # [B, W]
    targets = np.full((batch_size, window), pad_id, np.int32)  # [B, W]
    weights = np.zeros((batch_size, window), np.float32)  # [B, W]
    for row, (begin, end, scored) in enumerate(spans[first:first + batch_size]):
      seq, score_from = tokens[begin:end + 1], scored - begin - 1  # Target begin + 1 + p.
      if augment is not None:
        seq, score_from = augment(seq, score_from)
        if len(seq) > window + 1:
          raise ValueError(f"an augmented window has {len(seq) - 1} inputs, more than "
                           f"window={window}.")
      length = len(seq) - 1
      inputs[row, :length] = seq[:-1]
      targets[row, :length] = seq[1:]
      weights[row, score_from:length] = 1.0
    yield {"inputs": inputs, "targets": targets, "weights": weights}


def document_stream(texts: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
  """int32 [n]: the documents' ids, each followed by eos, as the data pipeline packs them.

  As in training, no token precedes the first document, so its first token is context
  only (never scored).
  """
  parts = [np.append(tokenizer.encode(text), tokenizer.eos_id) for text in texts]
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)


def read_text_files(paths: Sequence[str]) -> list[str]:
  """The contents of UTF-8 text files; a one-line TextFileError for a bad one."""
  texts = []
  for name in paths:
    path = pathlib.Path(name).expanduser()
    try:
      data = path.read_bytes()
    except FileNotFoundError:
      raise TextFileError(f"text file {name}: no such file; pass the path of a UTF-8 text "
                          "file to score.") from None
    except OSError as e:  # A directory, no permission, an I/O error.
      raise TextFileError(f"text file {name}: cannot read it ({e.strerror or e}); pass a "
                          "readable UTF-8 text file.") from None
    if not data:
      raise TextFileError(f"text file {name}: the file is empty; pass a file with text to "
                          "score.")
    try:
      texts.append(data.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise TextFileError(f"text file {name}: not UTF-8 (invalid byte 0x{data[e.start]:02x} at "
                          f"byte offset {e.start}); convert it, e.g. `iconv -f latin1 -t "
                          "utf-8`.") from None
  return texts


def score(eval_fn: Callable[[Any, Batch], dict[str, Any]], params: Any, tokens: np.ndarray,
          window: int, stride: int, batch_size: int, tokenizer: Tokenizer,
          put_batch: Callable[[Batch], Any] = lambda batch: batch,
          augment: Augment | None = None) -> dict[str, float]:
  """Sliding-window loss, perplexity and bits per byte of a token stream.

  Args:
    eval_fn: (params, batch) -> sums {nll_sum, tokens, bytes}, e.g. the jitted step of
      `train.evaluate.make_eval_fn`; it sees one batch shape [batch_size // processes,
      window], so it compiles once.
    params: the model parameters, as `eval_fn` takes them.
    tokens: int [n] the stream (e.g. `document_stream`), the same on every process.
    window, stride: W (<= the model's max_seq_len) and S; see `window_spans`.
    batch_size: windows per step over all processes; each process feeds its rows.
    tokenizer: gives the padding id.
    put_batch: places this process's host rows on devices, e.g.
      `lambda b: sharding.put_batch(b, mesh)`; default: pass numpy through.
    augment: optional rewrite of each window before scoring (retrieval, see `Augment`).

  Returns:
    loss (nats per token), perplexity, bits_per_byte, tokens and bytes scored,
    windows (forward passes), window, stride.
  """
  check_window(window, stride)
  tokens = np.asarray(tokens).reshape(-1)
  if len(tokens) < 2:
    raise ValueError(f"the text has {len(tokens)} token(s); scoring needs at least 2 "
                     "(one predicted from another).")
  index, count = jax.process_index(), jax.process_count()
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of the number "
                     f"of processes ({count}).")
  per_process = batch_size // count
  sums = []  # Device results, summed on the host in float64 once at the end (no syncs).
  for batch in window_batches(tokens, window, stride, batch_size, tokenizer.pad_id, augment):
    local = {k: v[index * per_process:(index + 1) * per_process] for k, v in batch.items()}
    sums.append(eval_fn(params, put_batch(local)))
  sums = jax.device_get(sums)
  total = {k: math.fsum(float(s[k]) for s in sums) for k in ("nll_sum", "tokens", "bytes")}
  loss = total["nll_sum"] / total["tokens"]
  return {
      "loss": loss,
      "perplexity": math.exp(loss),
      "bits_per_byte": total["nll_sum"] / math.log(2) / max(total["bytes"], 1.0),
      "tokens": int(round(total["tokens"])),
      "bytes": int(round(total["bytes"])),
      "windows": len(window_spans(len(tokens), window, stride)),
      "window": window,
      "stride": stride,
  }
