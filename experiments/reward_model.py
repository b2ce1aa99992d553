"""The reward model (stage 3, SPEC 2.1) against a bag-of-words baseline, on real labels.

The article's reward model is a separate, smaller network (6B for the 175B policy). Here:
a stage-1 model of half the depth of the tiny policy (`--base`, default
`configs/tiny.py:layers=2`, 1,000 steps on Wikipedia), then the reward stage from it
(`--reward`, default `configs/tiny.py:stage=reward,layers=2`): the same trunk with a
scalar head, trained with the Bradley-Terry loss on (fresh, rotten) pairs of Rotten
Tomatoes snippets (human labels; `rotten_tomatoes`, validation = held-out movies).
Two readings of the reward (`data.score_pooling`): the score at the closing `<eos>`
(`last`, InstructGPT) and the mean of the per-token scores (`mean`).
`--scratch` adds the same reward stages from a random init (what pretraining buys).

Measured on the held-out movies: pairwise accuracy over every (fresh, rotten) pair
of validation snippets (the ROC AUC of the scores, `rlhf.reward.pairwise_accuracy`)
and the mean Bradley-Terry loss over those pairs. The baseline, trained in the same
run on the same training split: scikit-learn's CountVectorizer (binary unigrams and
bigrams of lowercased words) + LogisticRegression (L2, C from {0.1, 0.3, 1, 3}
picked by 5-fold cross-validated AUC on the training split only), scored the same
way with its decision function.

  python -m experiments.reward_model --out docs/figures/reward_model.json
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from dsv2_jax.data import sources
from dsv2_jax.rlhf import reward
from experiments import common

BASE = "configs/tiny.py:layers=2"
REWARD = "configs/tiny.py:stage=reward,layers=2"
POOLINGS = ("mean", "last")  # data.score_pooling of the compared reward models.
QUICK = dict(base="steps=20", reward="steps=10")


def texts_and_labels(split: str, data_dir: str) -> tuple[list[str], np.ndarray]:
  source = sources.data_source("rotten_tomatoes", split, data_dir)
  rows = [source[i] for i in range(len(source))]
  return ([sources.as_text(r["text"]) for r in rows],
          np.array([int(r["label"]) for r in rows]))


def bag_of_words_baseline(data_dir: str) -> dict[str, Any]:
  """Logistic regression on binary word uni+bigrams; C by cross-validated AUC on train."""
  from sklearn.feature_extraction.text import CountVectorizer  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegressionCV  # pylint: disable=g-import-not-at-top
  train_x, train_y = texts_and_labels("train", data_dir)
  val_x, val_y = texts_and_labels("validation", data_dir)
  start = time.perf_counter()
  vectorizer = CountVectorizer(binary=True, lowercase=True, ngram_range=(1, 2))
  features = vectorizer.fit_transform(train_x)
  model = LogisticRegressionCV(Cs=[0.1, 0.3, 1.0, 3.0], cv=5, scoring="roc_auc",
                               max_iter=2000).fit(features, train_y)
  scores = model.decision_function(vectorizer.transform(val_x))
  return {"pairwise_accuracy": reward.pairwise_accuracy(scores, val_y),
          "loss": reward.pair_loss(scores, val_y),
          "accuracy": float(np.mean((scores > 0) == (val_y == 1))),
          "C": float(model.C_[0]), "features": int(features.shape[1]),
          "train_texts": len(train_x), "texts": len(val_x),
          "fit_seconds": time.perf_counter() - start}


def main(argv: list[str]) -> None:
  parser = common.chain_parser(__doc__, "runs/reward_model")
  parser.add_argument("--base", default=BASE, metavar="FILE[:args]", help="Stage 1.")
  parser.add_argument("--reward", default=REWARD, metavar="FILE[:args]")
  parser.add_argument("--scratch", action="store_true",
                      help="Also train the reward stage from a random init.")
  parser.add_argument("--quick", action="store_true", help=f"Smoke run: {QUICK}.")
  args = parser.parse_args(argv)
  if args.quick:
    args.base = common.with_args(args.base, QUICK["base"])
    args.reward = common.with_args(args.reward, QUICK["reward"])
  data_dir, root = common.chain_dirs(args)

  runs = {"base": common.train_stage(args.base, root / "base", data_dir)}
  for pooling in POOLINGS:
    spec = common.with_args(args.reward, f"pooling={pooling}")
    runs[f"reward_{pooling}"] = common.train_stage(spec, root / f"reward_{pooling}", data_dir,
                                                   init_from=str(root / "base"))
    if args.scratch:
      runs[f"reward_{pooling}_scratch"] = common.train_stage(
          spec, root / f"reward_{pooling}_scratch", data_dir)
  baseline = bag_of_words_baseline(data_dir)
  summary = {name: {k: round(r[k], 4) for k in ("pairwise_accuracy", "loss")}
             for name, r in runs.items() if name != "base"}
  summary["bag_of_words_logistic_regression"] = {
      k: round(baseline[k], 4) for k in ("pairwise_accuracy", "loss")}
  result = {"command": common.command("experiments.reward_model", argv), "runs": runs,
            "baseline": baseline, "summary": summary}
  common.write(result, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
