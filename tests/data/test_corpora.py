"""Local corpora: real text, a by-document split, and clear errors without the package."""

from __future__ import annotations

import importlib.util

import pytest

from dsv2_jax.data import corpora, sources


@pytest.mark.parametrize("name", ["wiki_excerpt", "web_bible", "lee_news"])
def test_train_and_validation_share_no_document(data_dir, name):
  builder = sources.get_builder(name, data_dir)
  train = builder.as_data_source(split="train")
  val = builder.as_data_source(split="validation")
  assert len(train) > 0 and len(val) > 0
  train_ids = {train[i]["id"] for i in range(len(train))}
  val_ids = {val[i]["id"] for i in range(len(val))}
  assert not train_ids & val_ids
  train_texts = {train[i]["text"] for i in range(len(train))}
  assert not any(val[i]["text"] in train_texts for i in range(len(val)))


def test_wikipedia_excerpt_is_clean_real_text(data_dir):
  builder = sources.get_builder("wiki_excerpt", data_dir)
  n = builder.info.splits["train"].num_examples + builder.info.splits["validation"].num_examples
  assert n >= 100  # 105 articles minus stubs.
  src = builder.as_data_source(split="train")
  texts = [src[i]["text"].decode() for i in range(len(src))]
  total = sum(len(t) for t in texts)
  assert total > 2_000_000
  joined = "\n".join(texts)
  assert "'''" not in joined and "==References==" not in joined
  assert not any(t.lower().startswith("#redirect") for t in texts)


def test_split_by_document_is_deterministic_and_exact():
  docs = [corpora.Document(f"d{i}", f"t{i}", "x" * i) for i in range(50)]
  a = corpora.split_by_document(docs, 0.1)
  b = corpora.split_by_document(list(reversed(docs)), 0.1)
  assert [d.id for d in a["validation"]] == [d.id for d in b["validation"]]
  assert len(a["validation"]) == 5 and len(a["train"]) == 45


def test_clean_wiki_text_drops_reference_sections():
  text = ("Intro '''bold''' text.\n==History==\nPast.\n===Detail===\nMore.\n"
          "==References==\n* a ref\n===Sub of refs===\nx\n==Legacy==\nStill here.\n*\n")
  assert corpora.clean_wiki_text(text) == (
      "Intro bold text.\n\nHistory\nPast.\n\nDetail\nMore.\n\nLegacy\nStill here.")


def test_missing_corpus_package_gives_install_hint(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "gensim" else real(name, *a))
  with pytest.raises(corpora.MissingCorpusError, match=r"pip install 'gensim==4.4.0'"):
    corpora.wiki_documents()


def test_bible_books_are_long_documents(data_dir):
  builder = sources.get_builder("web_bible/books", data_dir)
  splits = builder.info.splits
  assert splits["train"].num_examples + splits["validation"].num_examples == 66
  src = builder.as_data_source(split="train")
  assert max(len(src[i]["text"]) for i in range(len(src))) > 100_000
