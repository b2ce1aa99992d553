"""Pass-key retrieval in a real-text haystack (Mohtashami & Jaggi 2023; the PI paper's test).

A random 5-digit key is hidden at a chosen depth of real text; after the text comes
the question, and the model must produce the key:

  <haystack ... The pass key is 12345. Remember it. ... haystack> What is the pass
  key? The pass key is 12345

Depth 0 puts the needle at the start of the haystack (farthest from the question),
1 at its end. The same rows serve training (`data.passkey_fraction`: a fraction of
the packed training rows become pass-key rows built from their own text, scored like
any row, so the skill is learned next to real text, not instead of it) and
evaluation (`experiments/long_context.py`: exact match of the greedy answer, which
equals teacher-forced argmax on every answer token).
"""

from __future__ import annotations

import numpy as np

from dsv2_jax.data.tokenizer import Tokenizer

NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is "
KEY_DIGITS = 5


def random_key(rng: np.random.Generator) -> str:
  return "".join(str(int(d)) for d in rng.integers(0, 10, KEY_DIGITS))


def passkey_row(haystack: np.ndarray, key: str, depth: float, length: int,
                tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
  """A pass-key sequence of exactly `length` tokens.

  Args:
    haystack: int32 token ids of real text, at least as long as the room left for it.
    key: the digits to hide.
    depth: where the needle goes in the haystack, in [0, 1].
    length: tokens of the whole sequence (haystack + needle + question + key).
    tokenizer: the model's tokenizer.

  Returns:
    (tokens int32 [length], answer): the key occupies tokens[length - answer:].
  """
  needle = tokenizer.encode(NEEDLE.format(key=key))
  question = tokenizer.encode(QUESTION)
  answer = tokenizer.encode(key)
  room = length - len(needle) - len(question) - len(answer)
  if room < 0 or len(haystack) < room:
    raise ValueError(f"a pass-key row of {length} tokens needs {max(room, 0)} haystack tokens "
                     f"(got {len(haystack)}) and at least "
                     f"{len(needle) + len(question) + len(answer)} tokens in all.")
  hay = np.asarray(haystack[:room], np.int32)
  at = int(round(float(np.clip(depth, 0.0, 1.0)) * room))
  tokens = np.concatenate([hay[:at], needle, hay[at:], question, answer]).astype(np.int32)
  return tokens, len(answer)


def mix_into_row(tokens: np.ndarray, rng: np.random.Generator, tokenizer: Tokenizer
                 ) -> tuple[np.ndarray, int]:
  """A packed training row turned into a pass-key row of the same length (own text as
  haystack, uniform depth, random key); returns (row, answer tokens at its end)."""
  return passkey_row(tokens, random_key(rng), float(rng.uniform()), len(tokens), tokenizer)
