"""The chat template of instruction tuning (stage 3): turns -> token ids + loss weights.

A conversation is a list of (role, text) turns, role 'user' or 'assistant'. Each turn
is rendered as

    <role> text <end_of_turn>

with the tokenizer's reserved chat ids (`Tokenizer.chat_ids`), and the loss is taken
on assistant turns only: their text tokens and their closing <end_of_turn> (so the
model learns to stop) weigh 1; the role tokens and every user token weigh 0. A
generation prompt ends with an open assistant turn, `<user> q <end_of_turn> <assistant>`,
and a response is everything up to the next <end_of_turn>.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dsv2_jax.data.tokenizer import Tokenizer

ROLES = ("user", "assistant")


def render(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]]
           ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and per-token loss weights of a conversation.

  Args:
    tokenizer: supplies the text ids and the reserved `chat_ids`.
    turns: (role, text) pairs, role in `ROLES`.

  Returns:
    (tokens int32 [n], weights float32 [n]): weights[i] is the weight of predicting
    tokens[i] (1 on assistant text and its <end_of_turn>, else 0).
  """
  ids = tokenizer.chat_ids
  tokens, weights = [], []
  for role, text in turns:
    if role not in ROLES:
      raise ValueError(f"chat role {role!r} is not one of {ROLES}.")
    body = np.append(tokenizer.encode(text), ids["end_of_turn"])
    scored = float(role == "assistant")
    tokens += [np.array([ids[role]]), body]
    weights += [np.zeros(1), np.full(len(body), scored)]
  return (np.concatenate(tokens).astype(np.int32), np.concatenate(weights).astype(np.float32))


def render_example(tokenizer: Tokenizer, prompt: str, response: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """`render` of one user prompt and its assistant response."""
  return render(tokenizer, [("user", prompt), ("assistant", response)])


def generation_prompt(tokenizer: Tokenizer, prompt: str) -> np.ndarray:
  """int32 [n]: the user turn followed by an open assistant turn."""
  tokens, _ = render(tokenizer, [("user", prompt)])
  return np.append(tokens, tokenizer.chat_ids["assistant"]).astype(np.int32)


def response_text(tokenizer: Tokenizer, generated: np.ndarray) -> str:
  """The text of generated ids up to (not including) the first <end_of_turn>."""
  generated = np.asarray(generated).reshape(-1)
  ends = np.flatnonzero(generated == tokenizer.chat_ids["end_of_turn"])
  return tokenizer.decode(generated[:ends[0]] if len(ends) else generated)
