"""Tokenizers: byte-level by default (no download), SentencePiece from a local file.

Every tokenizer tells how many UTF-8 bytes each token stands for
(`token_num_bytes`), so evaluation reports bits per byte comparably across
tokenizers: bpb = total NLL in bits / total bytes of the predicted text.
"""

from __future__ import annotations

import abc
import pathlib

import numpy as np


CHAT_TOKENS = ("user", "assistant", "end_of_turn")  # Reserved ids of the chat template.


class Tokenizer(abc.ABC):
  """Text <-> int32 ids. `eos_id` separates packed documents; `chat_ids` are the
  reserved role and end-of-turn tokens of the chat template (`data/chat.py`)."""

  vocab_size: int
  eos_id: int
  pad_id: int

  @abc.abstractmethod
  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns int32 ids [num_tokens] without specials."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Returns text; special ids are dropped."""

  @property
  @abc.abstractmethod
  def token_num_bytes(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes each token stands for (0 for specials)."""


  @property
  @abc.abstractmethod
  def chat_ids(self) -> dict[str, int]:
    """{'user', 'assistant', 'end_of_turn'} -> id, never produced by `encode(str)`."""


class ByteTokenizer(Tokenizer):
  """Ids 0..255 are raw UTF-8 bytes; 256 is end-of-document, 257 is padding.

  The chat tokens reuse byte values that never occur in UTF-8 (0xF8-0xFA): encoding a
  str never yields them, so they need no new vocabulary rows and a stage-1 checkpoint
  takes the chat template as is. They stand for 0 bytes and decode to nothing.
  """

  CHAT_IDS = {"user": 0xF8, "assistant": 0xF9, "end_of_turn": 0xFA}

  def __init__(self):
    self.vocab_size = 258
    self.eos_id = 256
    self.pad_id = 257
    self._num_bytes = np.array([1] * 256 + [0, 0], dtype=np.int32)
    self._num_bytes[list(self.CHAT_IDS.values())] = 0

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids < 256) & ~np.isin(ids, list(self.CHAT_IDS.values()))]
    return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")

  @property
  def token_num_bytes(self) -> np.ndarray:
    return self._num_bytes

  @property
  def chat_ids(self) -> dict[str, int]:
    return dict(self.CHAT_IDS)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model trained locally (`pip install sentencepiece`).

  The chat template needs the pieces in `CHAT_PIECES` as user-defined symbols (train
  with `--user_defined_symbols=<|user|>,<|assistant|>,<|end_of_turn|>`).
  """

  CHAT_PIECES = {name: f"<|{name}|>" for name in CHAT_TOKENS}

  def __init__(self, model_path: str):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("data.tokenizer='sentencepiece' needs the sentencepiece package: "
                        "pip install sentencepiece") from e
    path = pathlib.Path(model_path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"data.tokenizer_model={model_path!r}: no such file.")
    self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    if self.eos_id < 0:
      raise ValueError(f"SentencePiece model {model_path} has no eos piece; "
                       "train it with --eos_id set.")
    num_bytes = []
    for i in range(self.vocab_size):
      piece = self._sp.id_to_piece(i)
      special = (self._sp.is_control(i) or self._sp.is_unknown(i)
                 or piece in self.CHAT_PIECES.values())
      piece = piece.replace("\u2581", " ")
      num_bytes.append(0 if special else len(piece.encode("utf-8")))
    self._num_bytes = np.array(num_bytes, dtype=np.int32)

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    return np.array(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    dropped = {self.eos_id, self.pad_id,
               *(self._sp.piece_to_id(p) for p in self.CHAT_PIECES.values())} - {self._sp.unk_id()}
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if i not in dropped])

  @property
  def token_num_bytes(self) -> np.ndarray:
    return self._num_bytes

  @property
  def chat_ids(self) -> dict[str, int]:
    ids = {name: self._sp.piece_to_id(piece) for name, piece in self.CHAT_PIECES.items()}
    missing = [self.CHAT_PIECES[n] for n, i in ids.items() if i == self._sp.unk_id()]
    if missing:
      raise ValueError(
          f"the SentencePiece model has no chat piece(s) {missing}: retrain it with "
          f"--user_defined_symbols={','.join(self.CHAT_PIECES.values())}.")
    return ids


TOKENIZERS = ("byte", "sentencepiece")  # The choices of `data.tokenizer`.


def get_tokenizer(kind: str, model_path: str = "") -> Tokenizer:
  """Builds the tokenizer named by `data.tokenizer`."""
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    return SentencePieceTokenizer(model_path)
  raise ValueError(f"unknown tokenizer {kind!r}; use one of {list(TOKENIZERS)}.")
