"""Local TFDS builders of (prompt, response) pairs for stage-3 instruction tuning (SFT).

Like `corpora`, everything is read from pip packages (no network; ../shared/DATA.md),
written as `array_record`, and split into train/validation by a hash, so the split
never changes between machines. The validation split holds out whole units (topics,
verses) so that it measures generalisation rather than recall of training pairs.

  chatterbot     ChatterBot's English Q/A conversations, {id, topic, prompt, response}.
  bible_quotes   exact-match tasks generated from World English Bible verses,
                 {id, task, prompt, response}.

`ExampleBuilder` is the shared plumbing for builders whose examples are not
{id, title, text} documents (also used by `review_corpora`).
"""

from __future__ import annotations

import abc
import math
import re
import zlib
from typing import Any, Iterator, NamedTuple

import tensorflow_datasets as tfds

from dsv2_jax.data import corpora

_CHATTERBOT = "chatterbot-corpus==1.3.3"


def crc_order(key: str) -> tuple[int, str]:
  """Sort key that orders units by a stable hash (crc32 is identical on every machine)."""
  return zlib.crc32(key.encode()), key


class ExampleBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS plumbing shared by the stage-3 builders: split -> keyed feature dicts."""

  VERSION = tfds.core.Version("1.0.0")

  @abc.abstractmethod
  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    """The feature spec of one example."""

  @abc.abstractmethod
  def _splits(self) -> dict[str, list[dict[str, Any]]]:
    """{"train": [...], "validation": [...]}; every example has a unique "id"."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict(self._features()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is on local disk.
    return {name: self._generate_examples(examples)
            for name, examples in self._splits().items()}

  def _generate_examples(self, examples: list[dict[str, Any]]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    for example in examples:
      yield example["id"], example


# --- ChatterBot conversations ---------------------------------------------------------

class ChatPair(NamedTuple):
  id: str
  topic: str
  prompt: str
  response: str


# In these files a "conversation" is one question followed by alternative answers (e.g.
# computers.yml: ["What is a computer?", "A computer is an electronic device...", "The thing
# you're using to talk to me is a computer.", ...]), not a dialogue: consecutive pairs would
# pair one answer with the next. Every other file's multi-turn lists are real dialogues.
ALTERNATIVE_ANSWER_TOPICS = frozenset({"computers", "emotion"})


def _turn(value: Any) -> str:
  """A yml turn as clean text: YAML parses some turns ('1984' unquoted) as non-strings."""
  return re.sub(r"[ \t]+\n", "\n", str(value)).strip()


def conversation_pairs(topic: str, conversations: list[Any]) -> list[ChatPair]:
  """(prompt, response) pairs of one topic file, exact duplicates dropped.

  ChatterBot's yml is {categories: [...], conversations: [[turn, turn, ...], ...]}; each
  turn answers the one before it (how ChatterBot's own trainer reads it), so a list of n
  turns gives the n-1 pairs (turn i, turn i+1); in `ALTERNATIVE_ANSWER_TOPICS` it gives
  (turn 0, turn j) instead. A conversation that YAML read as one string "Q? - 'A'" (a
  missing newline in trivia.yml) is split back into its two turns. Duplicates are common
  (tech_support.yml repeats 10 pairs 1,050 times), so only the first copy is kept.
  """
  pairs, seen = [], set()
  for c, conversation in enumerate(conversations):
    if isinstance(conversation, str) and " - " in conversation:
      question, _, answer = conversation.rpartition(" - ")
      conversation = [question, answer.strip().strip("'\"")]
    if not isinstance(conversation, list):
      continue
    turns = [_turn(t) for t in conversation]
    if topic in ALTERNATIVE_ANSWER_TOPICS:
      candidates = [(0, j) for j in range(1, len(turns))]
    else:
      candidates = [(i, i + 1) for i in range(len(turns) - 1)]
    for i, j in candidates:
      prompt, response = turns[i], turns[j]
      if prompt and response and (prompt, response) not in seen:
        seen.add((prompt, response))
        pairs.append(ChatPair(f"{topic}-{c}-{j}", topic, prompt, response))
  return pairs


def chatterbot_pairs() -> dict[str, list[ChatPair]]:
  """All English topic files -> their pairs (topic = the file name: 'ai', 'trivia', ...)."""
  marker = corpora.package_file("chatterbot_corpus", "data/english/ai.yml", _CHATTERBOT)
  import yaml  # pylint: disable=g-import-not-at-top
  topics = {}
  for path in sorted(marker.parent.glob("*.yml")):
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    topics[path.stem] = conversation_pairs(path.stem, data.get("conversations") or [])
  return topics


def split_by_topic(topics: dict[str, list[ChatPair]], fraction: float
                   ) -> dict[str, list[ChatPair]]:
  """Whole topics go to validation, in crc32 order of their name, while they fit.

  Topics are very unequal (trivia has 261 of the 1,180 pairs, health has 8), so
  a topic joins validation only if validation stays within `fraction` of all pairs. A pair
  repeated verbatim in a training topic ("Hello" -> "Hi") is dropped from train.
  With chatterbot-corpus 1.3.3 this holds out ai and history (113 of 1,180 pairs).
  """
  total = sum(len(p) for p in topics.values())
  budget, held_out = math.floor(fraction * total), []
  for topic in sorted(topics, key=crc_order):
    if len(topics[topic]) <= budget:
      held_out.append(topic)
      budget -= len(topics[topic])
  val = [p for t in sorted(held_out) for p in topics[t]]
  val_pairs = {(p.prompt, p.response) for p in val}
  train = [p for t in sorted(topics) if t not in held_out for p in topics[t]
           if (p.prompt, p.response) not in val_pairs]
  return {"validation": val, "train": train}


class Chatterbot(ExampleBuilder):
  """ChatterBot English Q/A conversations (BSD), one example per (prompt, response) pair.

  1,180 distinct pairs in 21 topics; validation holds out whole topic files (ai and
  history, 113 pairs; see `split_by_topic`), so no topic is in both splits.
  """

  def _features(self):
    return {k: tfds.features.Text() for k in ChatPair._fields}

  def _splits(self):
    splits = split_by_topic(chatterbot_pairs(), corpora.VALIDATION_FRACTION)
    return {name: [p._asdict() for p in pairs] for name, pairs in splits.items()}


# --- Bible quotes ---------------------------------------------------------------------

MAX_VERSE_CHARS = 120
_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")


class Verse(NamedTuple):
  id: int  # BBCCCVVV: book, chapter, verse.
  reference: str  # "John 3:16".
  text: str


def bible_verses() -> list[Verse]:
  """All World English Bible verses, cleaned: number prefix dropped, spaces collapsed.

  Reads the same `plain_text_bible.py` slices as `corpora.bible_documents`; a slice is
  " 16. For God so loved ...", and poetry lines are joined by runs of spaces. The package
  writes apostrophes as backticks ("God`s"); they are restored.
  """
  content, starts, ends = corpora.read_bible()
  verses = []
  for verse in sorted(starts):
    text = _VERSE_NUMBER.sub("", content[starts[verse]:ends[verse]])
    text = re.sub(r"\s+", " ", text.replace("`", "'")).strip()
    book, chapter, number = verse // 1_000_000, (verse // 1_000) % 1_000, verse % 1_000
    verses.append(Verse(verse, f"{corpora.book_title(book)} {chapter}:{number}", text))
  return verses


def quote_examples(verses: list[Verse]) -> list[dict[str, str]]:
  """The three exact-match tasks for each verse (see `BibleQuotes`)."""
  counts: dict[str, int] = {}
  for v in verses:
    counts[v.text] = counts.get(v.text, 0) + 1
  examples = []
  for v in verses:
    examples.append({"id": f"web-{v.id}-quote", "task": "quote",
                     "prompt": f"Quote {v.reference}.", "response": v.text})
    # A text found in several verses has no unique reference. `split_by_verse` keeps equal
    # texts in one split, so counting within a split counts over the whole kept set.
    if counts[v.text] == 1:
      examples.append({"id": f"web-{v.id}-reference", "task": "reference",
                       "prompt": f"Which verse says: \"{v.text}\"?", "response": v.reference})
    examples.append({"id": f"web-{v.id}-repeat", "task": "repeat",
                     "prompt": f"Repeat exactly: \"{v.text}\"", "response": v.text})
  return examples


def split_by_verse(verses: list[Verse], fraction: float) -> dict[str, list[Verse]]:
  """Verses ordered by crc32 of their id; the first ceil(fraction * n) go to validation.

  Verses with identical text ("Yahweh spoke to Moses, saying,") are one unit, keyed by
  their first id, so a held-out text never appears in training either.
  """
  groups: dict[str, list[Verse]] = {}
  for v in verses:
    groups.setdefault(v.text, []).append(v)
  keyed = {str(g[0].id): g for g in groups.values()}
  order = sorted(keyed, key=crc_order)
  n_val = math.ceil(fraction * len(order))
  pick = lambda keys: sorted((v for k in keys for v in keyed[k]), key=lambda v: v.id)
  return {"validation": pick(order[:n_val]), "train": pick(order[n_val:])}


class BibleQuotes(ExampleBuilder):
  """Exact-match instruction tasks over World English Bible verses (public domain).

  Only verses of at most MAX_VERSE_CHARS = 120 characters are used (15,675 of 31,102; not
  John 3:16, which has 136), so an example fits a short sequence. Per verse:
    quote      "Quote John 3:16."                -> the verse text (needs memory),
    reference  "Which verse says: \"...\"?"       -> "John 3:16" (only if the text is unique),
    repeat     "Repeat exactly: \"...\""         -> the verse text (solvable from context).
  Validation holds out 10% of verses (`split_by_verse`): a held-out verse is in no
  training example of any task.
  """

  def _features(self):
    return {k: tfds.features.Text() for k in ("id", "task", "prompt", "response")}

  def _splits(self):
    verses = [v for v in bible_verses() if len(v.text) <= MAX_VERSE_CHARS]
    return {name: quote_examples(vs)
            for name, vs in split_by_verse(verses, corpora.VALIDATION_FRACTION).items()}


BUILDERS: dict[str, type[ExampleBuilder]] = {
    "chatterbot": Chatterbot,
    "bible_quotes": BibleQuotes,
}
