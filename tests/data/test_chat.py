"""The chat template: layout of the rendered ids, response-only loss weights."""

from __future__ import annotations

import numpy as np
import pytest

from dsv2_jax.data import chat
from dsv2_jax.data.tokenizer import ByteTokenizer


def test_render_example_layout_and_response_only_weights():
  tok = ByteTokenizer()
  ids = tok.chat_ids
  tokens, weights = chat.render_example(tok, "Hi?", "Yes.")
  expected = [ids["user"], *b"Hi?", ids["end_of_turn"], ids["assistant"], *b"Yes.",
              ids["end_of_turn"]]
  assert tokens.tolist() == expected
  # Only the response text and its end-of-turn are scored.
  assert weights.tolist() == [0] * 6 + [1] * 5


def test_multi_turn_scores_every_assistant_turn_and_no_user_turn():
  tok = ByteTokenizer()
  turns = [("user", "a"), ("assistant", "bb"), ("user", "ccc"), ("assistant", "d")]
  tokens, weights = chat.render(tok, turns)
  assert len(tokens) == len(weights) == sum(len(t) + 2 for _, t in turns)
  scored = tok.decode(tokens[weights > 0])  # Chat ids decode to nothing.
  assert scored == "bbd" and weights.sum() == 3 + 2
  with pytest.raises(ValueError, match="role"):
    chat.render(tok, [("system", "x")])


def test_generation_prompt_is_the_rendered_prefix_and_response_stops_at_end_of_turn():
  tok = ByteTokenizer()
  tokens, _ = chat.render_example(tok, "Quote John 3:16.", "For God so loved")
  prompt = chat.generation_prompt(tok, "Quote John 3:16.")
  assert tokens[:len(prompt)].tolist() == prompt.tolist()
  generated = tokens[len(prompt):]
  assert chat.response_text(tok, np.append(generated, tok.encode("junk"))) == "For God so loved"
  assert chat.response_text(tok, tok.encode("no end")) == "no end"
