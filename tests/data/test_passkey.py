"""Pass-key rows: exact length, the needle at the asked depth, the key last."""

from __future__ import annotations

import numpy as np
import pytest

from dsv2_jax.data import passkey
from dsv2_jax.data.tokenizer import ByteTokenizer


def test_needle_depth_length_and_answer():
  tok = ByteTokenizer()
  hay = tok.encode("abcdefghij" * 30)
  needle = passkey.NEEDLE.format(key="12345")
  room = 200 - len(needle) - len(passkey.QUESTION) - 5  # Haystack tokens in the row.
  for depth, expected in ((0.0, 0), (1.0, room), (0.5, round(room / 2))):
    row, answer = passkey.passkey_row(hay, "12345", depth, 200, tok)
    text = tok.decode(row)
    assert len(row) == 200 and answer == 5 and text.endswith(passkey.QUESTION + "12345")
    at = text.index(needle)
    assert at == expected and text[:at] == tok.decode(hay[:at])
  with pytest.raises(ValueError, match="haystack tokens"):
    passkey.passkey_row(hay[:10], "12345", 0.5, 200, tok)


def test_random_keys_are_five_digits():
  rng = np.random.default_rng(0)
  keys = {passkey.random_key(rng) for _ in range(50)}
  assert len(keys) > 45 and all(len(k) == 5 and k.isdigit() for k in keys)
