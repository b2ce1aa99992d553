"""Byte tokenizer round trip and byte accounting; SentencePiece through the same interface."""

from __future__ import annotations

import numpy as np
import pytest

from dsv2_jax.data.tokenizer import ByteTokenizer, get_tokenizer


def test_byte_tokenizer_round_trips_utf8():
  tok = ByteTokenizer()
  text = "Anarchism — ἀναρχία, 無政府主義"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(np.append(ids, [tok.eos_id, tok.pad_id])) == text


def test_byte_tokenizer_counts_one_byte_per_byte_and_none_for_specials():
  tok = ByteTokenizer()
  assert tok.vocab_size == 258
  chat = sorted(tok.chat_ids.values())
  assert [i for i in range(256) if tok.token_num_bytes[i] != 1] == chat
  assert tok.token_num_bytes[tok.eos_id] == 0 and tok.token_num_bytes[tok.pad_id] == 0


def test_byte_tokenizer_chat_ids_are_never_utf8_and_decode_to_nothing():
  tok = ByteTokenizer()
  ids = set(tok.chat_ids.values())
  assert len(ids) == 3
  for i in ids:  # Not a valid UTF-8 byte in any position.
    with pytest.raises(UnicodeDecodeError):
      bytes([i]).decode("utf-8")
  everything = "".join(chr(c) for c in range(0x20, 0x3000))
  assert not ids & set(tok.encode(everything).tolist())
  assert tok.decode([*tok.encode("ab"), tok.chat_ids["end_of_turn"], *tok.encode("c")]) == "abc"


def test_sentencepiece_model_trained_locally(tmp_path, data_dir):
  spm = pytest.importorskip("sentencepiece")
  from dsv2_jax.data import sources
  src = sources.data_source("lee_news", "train", data_dir)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(src[i]["text"].decode() for i in range(len(src))))
  prefix = tmp_path / "sp"
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=300,
                                 eos_id=1, unk_id=2, bos_id=-1, pad_id=0,
                                 user_defined_symbols=["<|user|>", "<|assistant|>",
                                                       "<|end_of_turn|>"])
  tok = get_tokenizer("sentencepiece", str(prefix) + ".model")
  chat = tok.chat_ids
  assert len(set(chat.values())) == 3 and all(tok.token_num_bytes[i] == 0 for i in chat.values())
  assert tok.decode([chat["user"], *tok.encode("Hi"), chat["end_of_turn"]]) == "Hi"
  text = "The government said on Tuesday"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  # Pieces count their UTF-8 bytes; SentencePiece's dummy prefix adds one leading space.
  assert tok.token_num_bytes[ids].sum() == len(text.encode()) + 1
  assert tok.token_num_bytes[tok.eos_id] == 0
