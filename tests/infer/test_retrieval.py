"""Retrieval for RAG: chunking, BM25 ranking against a hand formula, the index folder,
the augmented input, corpus loading."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from dsv2_jax.data.tokenizer import ByteTokenizer
from dsv2_jax.infer import retrieval
from dsv2_jax.infer.retrieval import Passage, RetrievalError, RetrievalIndex

TOK = ByteTokenizer()

# Real-ish sentences; each has a few words no other one has.
SENTENCES = [
    "The river flooded the valley after three days of heavy rain.",
    "A violinist performed the concerto with remarkable precision last night.",
    "Farmers in the valley planted barley and wheat before the rain came.",
    "The committee approved the budget for the new hospital wing.",
    "Astronomers observed a comet passing close to Jupiter in March.",
    "The hospital hired twelve nurses to staff the new wing.",
    "Heavy snow closed the mountain pass for most of the winter.",
    "The orchestra rehearsed the concerto twice before the premiere.",
]


def _passages(texts=SENTENCES) -> list[Passage]:
  return [Passage(f"doc{i}", 0, t) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def index() -> RetrievalIndex:
  return RetrievalIndex.build(_passages(), sources=["synthetic"], passage_tokens=128,
                              tokenizer="byte")


# --- Chunking ------------------------------------------------------------------------------


def test_chunking_covers_every_token_once_in_order_within_documents():
  docs = [
      ("a", "Short note."),
      ("b", " ".join(SENTENCES)),  # Many word boundaries.
      ("c", "naïve café résumé 日本語のテキスト " * 6 + "🙂" * 20),  # Multi-byte chars.
      ("d", "x" * 100),  # One long word: no word boundary to back off to.
      ("e", ""),  # Empty: no passages.
      ("f", "spaces   between\n\nlines\t and tabs " * 4),
  ]
  p_tokens = 24
  passages = retrieval.chunk_documents(docs, TOK, p_tokens)
  assert [p.doc_id for p in passages] == sorted(p.doc_id for p in passages)  # Document order.
  for doc_id, text in docs:
    mine = [p for p in passages if p.doc_id == doc_id]
    assert [p.index for p in mine] == list(range(len(mine)))
    # Oracle: the document's bytes, split exactly once. The byte tokenizer decodes a cut
    # UTF-8 character to U+FFFD, so equality also shows no character was split.
    assert "".join(p.text for p in mine) == text
    assert all(0 < len(TOK.encode(p.text)) <= p_tokens for p in mine)
  assert not [p for p in passages if p.doc_id == "e"]
  assert [p.text for p in passages if p.doc_id == "a"] == ["Short note."]
  assert [len(p.text) for p in passages if p.doc_id == "d"] == [24, 24, 24, 24, 4]


def test_chunking_backs_off_to_the_last_word_start():
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
  text = " ".join(words * 3)
  passages = retrieval.chunk_documents([("d", text)], TOK, 20)
  for p in passages[:-1]:
    assert p.text.endswith(" ") and not p.text.endswith("  ")
    assert 10 <= len(p.text) <= 20  # At least half of passage_tokens kept.
    # The cut is the last word start within 20 bytes: the next word would not fit.
    rest = text[sum(len(q.text) for q in passages[:p.index + 1]):]
    assert len(p.text) + len(rest.split(" ")[0]) + 1 > 20
  assert passages[-1].text == "eta theta iota"  # The rest, shorter than a passage.


def test_chunking_rejects_empty_passages():
  with pytest.raises(RetrievalError, match="passage_tokens"):
    retrieval.chunk_documents([("d", "text")], TOK, 0)


# --- Search --------------------------------------------------------------------------------


def _lucene_bm25(query: str, texts: list[str], k1=1.5, b=0.75) -> np.ndarray:
  """Oracle: Lucene BM25 (Kamphuis et al. 2020) over lowercase \\w\\w+ words, no stopwords."""
  from bm25s.stopwords import STOPWORDS_EN  # pylint: disable=g-import-not-at-top
  def words(t):
    return [w for w in re.findall(r"\b\w\w+\b", t.lower()) if w not in set(STOPWORDS_EN)]
  docs = [words(t) for t in texts]
  avg = sum(map(len, docs)) / len(docs)
  scores = np.zeros(len(docs))
  for w in words(query):
    df = sum(w in d for d in docs)
    idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
    for i, d in enumerate(docs):
      tf = d.count(w)
      scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avg))
  return scores


@pytest.mark.parametrize("query", ["comet Jupiter", "the hospital wing", "valley rain",
                                   "concerto violinist orchestra"])
def test_search_ranks_by_bm25(index, query):
  oracle = _lucene_bm25(query, SENTENCES)
  hits = index.search(query, k=3)
  order = sorted(np.flatnonzero(oracle > 0), key=lambda i: (-oracle[i], i))[:3]
  assert [p.doc_id for p, _ in hits] == [f"doc{i}" for i in order]
  np.testing.assert_allclose([s for _, s in hits], oracle[order], rtol=1e-5)


def test_search_puts_the_rare_term_passage_first_and_respects_k(index):
  hits = index.search("which comet did astronomers see", k=2)
  assert hits[0][0].text == SENTENCES[4]
  assert len(hits) <= 2
  assert len(index.search("the valley hospital concerto winter", k=8)) == 7  # Matches only.
  assert len(index.search("the valley hospital concerto winter", k=2)) == 2
  assert index.search("valley", k=0) == []
  assert [s for _, s in index.search("hospital wing", k=5)] == sorted(
      [s for _, s in index.search("hospital wing", k=5)], reverse=True)


@pytest.mark.parametrize("query", ["", "   ", "the of and was it", "xylophone quokka"])
def test_search_without_indexed_words_is_empty(index, query):
  assert index.search(query, k=3) == []


def test_ties_break_by_corpus_order_deterministically():
  texts = ["Giraffes eat acacia leaves.", "A quiet morning.", "Giraffes eat acacia leaves."]
  for order in ([0, 1, 2], [2, 1, 0]):
    passages = [Passage(f"doc{i}", 0, texts[i]) for i in order]
    idx = RetrievalIndex.build(passages)
    hits = idx.search("acacia", k=2)
    assert hits[0][1] == hits[1][1]
    assert [p.doc_id for p, _ in hits] == [f"doc{order[0]}", f"doc{order[2]}"]
    assert idx.search("acacia", k=2) == hits


def test_search_many_equals_search(index):
  queries = ["comet", "the", "hospital budget", "snow pass winter"]
  assert index.search_many(queries, 3) == [index.search(q, 3) for q in queries]


# --- Save / load ---------------------------------------------------------------------------


def test_save_load_round_trip(index, tmp_path):
  index.save(tmp_path / "idx")
  loaded = RetrievalIndex.load(tmp_path / "idx")
  assert loaded.passages == index.passages
  queries = ["comet Jupiter", "valley rain", "hospital", "", "concerto premiere"]
  assert loaded.search_many(queries, 4) == index.search_many(queries, 4)
  manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
  assert manifest["count"] == len(SENTENCES) and manifest["sources"] == ["synthetic"]
  assert manifest["passage_tokens"] == 128 and manifest["bm25s_version"]
  assert manifest["build_seconds"] >= 0
  index.save(tmp_path / "idx")  # Overwrites in place.
  assert RetrievalIndex.load(tmp_path / "idx").passages == index.passages


def _drop(root, name):
  (root / name).unlink()


def _garble(root, name):
  (root / name).write_bytes(b"\x93NUMPY garbage \xff\x00")


def _drop_a_passage(root, name):
  rows = json.loads((root / name).read_text())
  (root / name).write_text(json.dumps(rows[:-1]))


@pytest.mark.parametrize("damage, name, says", [
    (_drop, "manifest.json", "missing manifest.json"),
    (_drop, "bm25s/vocab.index.json", "missing bm25s/vocab.index.json"),
    (_drop, "passages.json", "missing passages.json"),
    (_garble, "passages.json", "passages.json is corrupt"),
    (_garble, "manifest.json", "manifest.json is corrupt"),
    (_garble, "bm25s/data.csc.index.npy", "corrupt"),
    (_garble, "bm25s/params.index.json", "corrupt"),
    (_drop_a_passage, "passages.json", "inconsistent"),
])
def test_load_rejects_damaged_index_in_one_line(index, tmp_path, damage, name, says):
  index.save(tmp_path)
  damage(tmp_path, name)
  with pytest.raises(RetrievalError, match=re.escape(says)) as e:
    RetrievalIndex.load(tmp_path)
  assert "\n" not in str(e.value) and "`index` command" in str(e.value)


def test_load_missing_directory(tmp_path):
  with pytest.raises(RetrievalError, match="does not exist.*`index` command"):
    RetrievalIndex.load(tmp_path / "nowhere")


# --- Augmented input -----------------------------------------------------------------------


def _ids(text: str) -> list[int]:
  return list(text.encode())


def test_augment_exact_ids_most_relevant_first_query_last():
  eos = TOK.eos_id
  ps = [Passage("d", 0, "ab"), Passage("d", 1, "cde"), Passage("e", 0, "fg")]
  query = np.array(_ids("xy"), np.int32)
  out = retrieval.augment(query, ps, TOK, budget_tokens=100)
  expected = _ids("ab") + [eos] + _ids("cde") + [eos] + _ids("fg") + [eos] + _ids("xy")
  assert out.ids.dtype == np.int32 and out.ids.tolist() == expected
  assert (out.context_tokens, out.num_passages) == (10, 3)
  # Room 7 = "ab" eos "cde" eos exactly: the least relevant passage is dropped.
  out = retrieval.augment(query, ps, TOK, budget_tokens=9)
  assert out.ids.tolist() == _ids("ab") + [eos] + _ids("cde") + [eos] + _ids("xy")
  # Room 6: "cde" does not fit whole; it is cut at its end ("cd") to fill the room...
  out = retrieval.augment(query, ps, TOK, budget_tokens=8)
  assert out.ids.tolist() == _ids("ab") + [eos] + _ids("cd") + [eos] + _ids("xy")
  assert (out.context_tokens, out.num_passages) == (6, 2)
  assert retrieval.augment(query, ps, TOK, budget_tokens=7).ids.tolist() == (
      _ids("ab") + [eos] + _ids("c") + [eos] + _ids("xy"))  # Even a single token.
  # ... or dropped, with every passage after it, when partial=False.
  out = retrieval.augment(query, ps, TOK, budget_tokens=8, partial=False)
  assert out.ids.tolist() == _ids("ab") + [eos] + _ids("xy")
  # The query is never cut, even past the budget.
  assert retrieval.augment(query, ps, TOK, budget_tokens=1).ids.tolist() == _ids("xy")


def test_augment_respects_every_budget():
  ps = _passages(SENTENCES[:4])
  query = np.array(_ids("when did the river flood"), np.int32)
  for budget in range(0, 300, 7):
    out = retrieval.augment(query, ps, TOK, budget)
    assert len(out.ids) <= max(budget, len(query))
    assert out.ids[out.context_tokens:].tolist() == query.tolist()
    # The context is the passages in order, each (the last maybe cut) followed by eos.
    pieces = np.split(out.ids[:out.context_tokens],
                      np.flatnonzero(out.ids[:out.context_tokens] == TOK.eos_id) + 1)[:-1]
    assert len(pieces) == out.num_passages
    for piece, p in zip(pieces, ps):
      full = _ids(p.text)
      assert piece[-1] == TOK.eos_id and piece[:-1].tolist() == full[:len(piece) - 1]
    if budget >= len(query) + 2:
      assert len(out.ids) == min(budget, len(query) + sum(len(_ids(t)) + 1 for t in SENTENCES[:4]))


def test_retrieve_and_augment_puts_the_best_passage_first(index):
  query = TOK.encode("Which planet did the comet pass?")
  out = retrieval.retrieve_and_augment(index, query, TOK, k=3, budget_tokens=400)
  best = _ids(SENTENCES[4])
  assert out.ids[:len(best)].tolist() == best and out.ids[len(best)] == TOK.eos_id
  assert out.ids[-len(query):].tolist() == query.tolist()


# --- Corpus --------------------------------------------------------------------------------


def test_load_corpus_from_a_folder(tmp_path):
  (tmp_path / "b.txt").write_text("Second document. Ünïcode ok.", encoding="utf-8")
  (tmp_path / "a.txt").write_text("First document.", encoding="utf-8")
  (tmp_path / "notes.md").write_text("not a .txt file")
  assert retrieval.load_corpus(str(tmp_path), "unused") == [
      ("a.txt", "First document."), ("b.txt", "Second document. Ünïcode ok.")]


def test_load_corpus_errors(tmp_path):
  with pytest.raises(RetrievalError, match="does not exist"):
    retrieval.load_corpus(str(tmp_path / "missing"), "unused")
  with pytest.raises(RetrievalError, match="no .txt files"):
    retrieval.load_corpus(str(tmp_path), "unused")
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(RetrievalError, match="empty"):
    retrieval.load_corpus(str(tmp_path), "unused")
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  with pytest.raises(RetrievalError, match=r"latin1\.txt.*not UTF-8") as e:
    retrieval.load_corpus(str(tmp_path), "unused")
  assert "\n" not in str(e.value)


def test_lee_news_index_finds_a_passage_from_its_own_words(data_dir, tmp_path):
  docs = retrieval.load_corpus("lee_news:train", data_dir)
  assert len({d for d, _ in docs}) == len(docs) > 100
  passages = retrieval.chunk_documents(docs, TOK, 128)
  assert all(len(p.text.encode()) <= 128 for p in passages)
  index = RetrievalIndex.build(passages, ["lee_news:train"], 128, "byte")
  index.save(tmp_path)
  index = RetrievalIndex.load(tmp_path)
  probes = passages[::97]  # A passage's own text should rank it first.
  found = sum(hits[0][0] == p for p, hits in zip(probes, index.search_many(
      [p.text for p in probes], 1)) if hits)
  assert found >= 0.8 * len(probes)
