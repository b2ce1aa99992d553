"""BM25 retrieval over passages, and the retrieval-augmented model input (SPEC 3.3).

Retrieval-augmented generation (Lewis et al., 2020, "Retrieval-Augmented Generation
for Knowledge-Intensive NLP Tasks"; in-context form as in Ram et al., 2023,
"In-Context Retrieval-Augmented Language Models") puts passages relevant to the query
ahead of it in the model input. Here:

  documents --chunk_documents--> passages of <= rag.passage_tokens model tokens
  passages --RetrievalIndex.build--> BM25 index (the maintained `bm25s` library,
      Lucene BM25 with k1=1.5, b=0.75; lowercase words, English stopwords, stemming
      only when PyStemmer is installed) --save/load--> a folder
  query text --search--> the top-k passages, best first
  passages + query ids --augment--> [passage_1, eos, ..., passage_k, eos, query]

`bm25s` is imported lazily: importing it runs a `jax.lax.top_k`, which would start
the JAX backend (before `jax.distributed.initialize`, say) as a side effect of
importing this module.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, NamedTuple, Sequence

import numpy as np

from dsv2_jax.data.tokenizer import ByteTokenizer, Tokenizer

FORMAT = "dsv2_jax.retrieval"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PASSAGES = "passages.json"
BM25_DIR = "bm25s"  # Subfolder holding the files that `bm25s.BM25.save` writes.
BM25_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
              "vocab.index.json", "params.index.json")
STOPWORDS = "en"
_REBUILD = "rebuild it with the `index` command"
_WHITESPACE_BYTES = np.array([9, 10, 11, 12, 13, 32])


INDEX_ROOT = "rag"  # Indexes live beside the run: <workdir>/rag/<name>/.


def index_path(workdir: str | os.PathLike, name: str) -> pathlib.Path:
  """`name` if it is an existing folder (an index anywhere), else <workdir>/rag/<name>."""
  if os.sep in name and pathlib.Path(name).expanduser().is_dir():
    return pathlib.Path(name).expanduser().resolve()
  return pathlib.Path(workdir).expanduser().resolve() / INDEX_ROOT / name


class RetrievalError(ValueError):
  """Bad retrieval input: a corpus, passage size or index folder; one-line message."""


class Passage(NamedTuple):
  """A chunk of one document: its `index`-th passage (0-based, in document order)."""
  doc_id: str
  index: int
  text: str


class Augmented(NamedTuple):
  """The model input built by `augment`.

  ids: int32 [context_tokens + len(query)], the query last.
  context_tokens: tokens before the query (passages and their separators).
  num_passages: passages placed (the last one may be cut, see `augment`).
  """
  ids: np.ndarray
  context_tokens: int
  num_passages: int


# --- Corpus --------------------------------------------------------------------------------


def load_corpus(spec: str, data_dir: str, text_key: str = "text") -> list[tuple[str, str]]:
  """Documents (doc_id, text) of a corpus `spec`, in a fixed order.

  Args:
    spec: an existing folder of UTF-8 `*.txt` files (one document per file, doc_id the
      file name, sorted by name, not recursive), or a dataset split `NAME:SPLIT` such as
      `lee_news:train` read through `dsv2_jax.data.sources.data_source` (doc_id its `id`).
    data_dir: the TFDS data dir of dataset splits.
    text_key: the feature holding a dataset document's text.

  Raises RetrievalError for a missing folder, a folder without .txt files, a non-UTF-8
  file or a corpus without text; dataset errors (DatasetUnavailableError,
  MissingCorpusError) propagate unchanged.
  """
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    docs = _folder_documents(path)
  elif ":" in spec and not path.exists():
    docs = _dataset_documents(spec, data_dir, text_key)
  elif path.exists():
    raise RetrievalError(f"corpus {spec!r} is a file; give a folder of .txt files or a "
                         f"dataset split NAME:SPLIT (e.g. lee_news:train).")
  else:
    raise RetrievalError(f"corpus folder {spec!r} does not exist; give a folder of .txt "
                         f"files or a dataset split NAME:SPLIT (e.g. lee_news:train).")
  if not any(text.strip() for _, text in docs):
    raise RetrievalError(f"corpus {spec!r} is empty: its {len(docs)} documents hold no text.")
  return docs


def _folder_documents(folder: pathlib.Path) -> list[tuple[str, str]]:
  files = sorted(p for p in folder.glob("*.txt") if p.is_file())
  if not files:
    raise RetrievalError(f"corpus folder {str(folder)!r} has no .txt files (one document "
                         f"per UTF-8 .txt file).")
  docs = []
  for f in files:
    try:
      docs.append((f.name, f.read_bytes().decode("utf-8")))
    except UnicodeDecodeError as e:
      raise RetrievalError(f"corpus file {str(f)!r} is not UTF-8 (bad byte at offset "
                           f"{e.start}); convert it to UTF-8 or remove it.") from None
  return docs


def _dataset_documents(spec: str, data_dir: str, text_key: str) -> list[tuple[str, str]]:
  from dsv2_jax.data import sources  # pylint: disable=g-import-not-at-top (TFDS is slow)
  name, _, split = spec.rpartition(":")
  if not name or not split:
    raise RetrievalError(f"corpus {spec!r}: a dataset split is NAME:SPLIT, e.g. "
                         f"lee_news:train.")
  source = sources.data_source(name, split, data_dir)
  docs = []
  for i in range(len(source)):
    item = source[i]
    if text_key not in item:
      raise RetrievalError(f"corpus {spec!r} has no feature {text_key!r}; it has "
                           f"{sorted(item)}.")
    doc_id = sources.as_text(item["id"]) if "id" in item else f"{spec}:{i}"
    docs.append((doc_id, sources.as_text(item[text_key])))
  return docs


# --- Passages ------------------------------------------------------------------------------


def _cut_points(tokenizer: Tokenizer, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Positions i (cut just before token i) that are valid, and that are word starts.

  Returns two sorted int arrays over 1..len(ids)-1. With the byte tokenizer a valid
  cut never splits a UTF-8 character (so each passage decodes to an exact substring),
  and a word start follows a whitespace byte. With SentencePiece every token boundary
  is valid and a word start is a piece beginning with U+2581. Other tokenizers: every
  boundary is valid, none is preferred.
  """
  inner = np.arange(1, len(ids))
  if isinstance(tokenizer, ByteTokenizer):
    valid = inner[(ids[1:] & 0xC0) != 0x80]  # Not a UTF-8 continuation byte.
    word = valid[np.isin(ids[valid - 1], _WHITESPACE_BYTES)]
    return valid, word
  sp = getattr(tokenizer, "_sp", None)  # SentencePieceTokenizer's processor.
  if sp is not None:
    starts = np.array([sp.id_to_piece(i).startswith("\u2581")
                       for i in range(sp.get_piece_size())])  # [V]
    return inner, inner[starts[ids[1:]]]
  return inner, inner[:0]


def _chunk_ids(tokenizer: Tokenizer, ids: np.ndarray, passage_tokens: int) -> list[tuple[int, int]]:
  """[start, end) spans covering ids in order, each at most passage_tokens long.

  A span ends at the last word start within it if that keeps at least half of
  passage_tokens (so one long word cannot shrink passages to a few tokens), else at
  the last valid cut, else (a character longer than the passage) after passage_tokens.
  """
  n = len(ids)
  valid, word = _cut_points(tokenizer, ids)
  spans, start = [], 0
  while start < n:
    end = start + passage_tokens
    if end >= n:
      cut = n
    else:
      cut = end
      w = word[np.searchsorted(word, end, side="right") - 1] if len(word) else -1
      v = valid[np.searchsorted(valid, end, side="right") - 1] if len(valid) else -1
      if w - start >= max(1, passage_tokens // 2):
        cut = int(w)
      elif v > start:
        cut = int(v)
    spans.append((start, cut))
    start = cut
  return spans


def chunk_documents(docs: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                    passage_tokens: int) -> list[Passage]:
  """Splits each document into passages of at most `passage_tokens` model tokens.

  Every token of every document lands in exactly one passage, in order; no passage
  spans two documents; empty documents give none. Passages are cut on token
  boundaries, preferably at word starts (see `_chunk_ids`), and decoded to text (with
  the byte tokenizer, concatenating a document's passages gives back its text; with
  SentencePiece, re-encoding a passage's text may give a token or two more).
  """
  if passage_tokens < 1:
    raise RetrievalError(f"rag.passage_tokens={passage_tokens} must be >= 1.")
  passages = []
  for doc_id, text in docs:
    ids = tokenizer.encode(text)  # [num_tokens]
    for i, (s, e) in enumerate(_chunk_ids(tokenizer, ids, passage_tokens)):
      passages.append(Passage(doc_id, i, tokenizer.decode(ids[s:e])))
  return passages


# --- Index ---------------------------------------------------------------------------------


def _stemmer(name: str | None = None):
  """(stemmer or None, its name): PyStemmer's English stemmer when installed.

  `name` (from a manifest) asks for that stemmer exactly: queries must be processed
  as the passages were.
  """
  if name == "":
    return None, ""
  try:
    import Stemmer  # pylint: disable=g-import-not-at-top (optional: PyStemmer)
  except ImportError:
    if name:
      raise RetrievalError(f"this retrieval index was built with PyStemmer's {name!r} "
                           f"stemmer, which is not installed here: pip install PyStemmer, "
                           f"or {_REBUILD}.") from None
    return None, ""
  return Stemmer.Stemmer(name or "english"), name or "english"


class RetrievalIndex:
  """Passages and their BM25 index; `search` ranks passages for a query text."""

  def __init__(self, passages: list[Passage], bm25: Any, manifest: dict[str, Any]):
    """Use `build` or `load`."""
    self.passages = passages
    self.manifest = manifest
    self._bm25 = bm25
    self._stem, _ = _stemmer(manifest["stemmer"])

  def __len__(self) -> int:
    return len(self.passages)

  @classmethod
  def build(cls, passages: Sequence[Passage], sources: Sequence[str] = (),
            passage_tokens: int = 0, tokenizer: str = "") -> RetrievalIndex:
    """Indexes `passages` (e.g. from `chunk_documents`).

    `sources`, `passage_tokens` and `tokenizer` (the data.tokenizer kind) are recorded
    in the manifest only.
    """
    import bm25s  # pylint: disable=g-import-not-at-top (see the module docstring)
    passages = [Passage(str(p.doc_id), int(p.index), str(p.text)) for p in passages]
    if not passages:
      raise RetrievalError("no passages to index: the corpus holds no text.")
    start = time.perf_counter()
    stem, stem_name = _stemmer()
    tokens = bm25s.tokenize([p.text for p in passages], lower=True, stopwords=STOPWORDS,
                            stemmer=stem, return_ids=True, show_progress=False)
    bm25 = bm25s.BM25()
    bm25.index(tokens, show_progress=False)
    manifest = dict(format=FORMAT, version=FORMAT_VERSION, sources=list(sources),
                    passage_tokens=int(passage_tokens), tokenizer=tokenizer,
                    count=len(passages), stopwords=STOPWORDS, stemmer=stem_name,
                    bm25s_version=bm25s.__version__,
                    build_seconds=round(time.perf_counter() - start, 4))
    return cls(passages, bm25, manifest)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the index to `directory` (created; an index there is overwritten).

    The manifest is removed first and written last, so an interrupted save leaves a
    folder that `load` reports as partial rather than a stale mix.
    """
    root = pathlib.Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    self._bm25.save(str(root / BM25_DIR), show_progress=False)
    rows = [dict(doc_id=p.doc_id, index=p.index, text=p.text) for p in self.passages]
    (root / PASSAGES).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (root / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n", encoding="utf-8")

  @classmethod
  def load(cls, directory: str | os.PathLike) -> RetrievalIndex:
    """Reads an index that `save` wrote; RetrievalError (one line) if it cannot."""
    import bm25s  # pylint: disable=g-import-not-at-top (see the module docstring)
    root = pathlib.Path(directory).expanduser()
    where = f"retrieval index {str(root)!r}"
    if not root.is_dir():
      raise RetrievalError(f"{where} does not exist; build it with the `index` command.")
    needed = [MANIFEST, PASSAGES] + [f"{BM25_DIR}/{name}" for name in BM25_FILES]
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
      raise RetrievalError(f"{where} is missing {', '.join(missing)} (not an index, or an "
                           f"interrupted build); {_REBUILD}.")
    manifest = _read_json(root / MANIFEST, where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
      raise RetrievalError(f"{where}: {MANIFEST} is not a retrieval manifest; {_REBUILD}.")
    if manifest.get("version") != FORMAT_VERSION:
      raise RetrievalError(f"{where} has format version {manifest.get('version')!r}, this "
                           f"code reads {FORMAT_VERSION}; {_REBUILD}.")
    rows = _read_json(root / PASSAGES, where)
    try:
      passages = [Passage(str(r["doc_id"]), int(r["index"]), str(r["text"])) for r in rows]
    except (TypeError, KeyError, ValueError) as e:
      raise RetrievalError(f"{where}: {PASSAGES} is corrupt ({_one_line(e)}); "
                           f"{_REBUILD}.") from None
    try:
      bm25 = bm25s.BM25.load(str(root / BM25_DIR), show_progress=False)
      num_docs = int(bm25.scores["num_docs"])
      size = len(bm25.scores["indptr"]) - 1
      nnz = int(bm25.scores["indptr"][-1])
      if not len(bm25.scores["data"]) == len(bm25.scores["indices"]) == nnz:
        raise ValueError("the sparse BM25 arrays disagree in length")
      # bm25s's empty-document token "" sits past the matrix; queries never use it.
      vocab_ok = all(0 <= v < size for w, v in bm25.vocab_dict.items() if w)
    except Exception as e:  # pylint: disable=broad-except (any unreadable file, one line)
      raise RetrievalError(f"{where}: the BM25 files under {BM25_DIR}/ are corrupt "
                           f"({_one_line(e)}); {_REBUILD}.") from None
    if not vocab_ok:
      raise RetrievalError(f"{where}: {BM25_DIR}/vocab.index.json does not match the BM25 "
                           f"matrix; {_REBUILD}.")
    if not len(passages) == num_docs == manifest.get("count"):
      raise RetrievalError(f"{where} is inconsistent: manifest count {manifest.get('count')}, "
                           f"{len(passages)} passages, {num_docs} indexed; {_REBUILD}.")
    manifest.setdefault("stemmer", "")
    return cls(passages, bm25, manifest)

  def _query_term_ids(self, queries: Sequence[str]) -> list[list[int]]:
    import bm25s  # pylint: disable=g-import-not-at-top (see the module docstring)
    words = bm25s.tokenize(list(queries), lower=True, stopwords=STOPWORDS, stemmer=self._stem,
                           return_ids=False, show_progress=False)
    # Words outside the index vocabulary (and bm25s's empty-document token) score nothing.
    return [self._bm25.get_tokens_ids([w for w in ws if w]) for ws in words]

  def _top(self, term_ids: list[int], k: int) -> list[tuple[Passage, float]]:
    if not term_ids or k <= 0:
      return []
    scores = self._bm25.get_scores_from_ids(term_ids)  # [num_passages], float32
    n = len(scores)
    k = min(k, n)
    kth = np.partition(scores, n - k)[n - k]
    cand = np.flatnonzero((scores >= kth) & (scores > 0))
    # Best score first; ties go to the earlier passage (corpus order), deterministically.
    best = cand[np.lexsort((cand, -scores[cand]))][:k]
    return [(self.passages[i], float(scores[i])) for i in best]

  def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
    """The (at most) k passages sharing a word with `query`, as (passage, BM25 score).

    Best first; equal scores in corpus order. A query without indexed words (empty,
    stopwords only, unknown words) gives [].
    """
    return self.search_many([query], k)[0]

  def search_many(self, queries: Sequence[str], k: int) -> list[list[tuple[Passage, float]]]:
    """`search` of each query (tokenized in one call)."""
    if not queries:
      return []
    return [self._top(ids, k) for ids in self._query_term_ids(queries)]


def _read_json(path: pathlib.Path, where: str) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RetrievalError(f"{where}: {path.name} is corrupt ({_one_line(e)}); "
                         f"{_REBUILD}.") from None


def _one_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())}"[:200]


# --- Model input ---------------------------------------------------------------------------


def augment(query_ids: np.ndarray, passages: Sequence[Passage], tokenizer: Tokenizer,
            budget_tokens: int, partial: bool = True) -> Augmented:
  """The retrieval-augmented input [p_1, eos, p_2, eos, ..., p_m, eos, query].

  Passages come in the given order (most relevant first, as `search` returns them),
  each followed by `tokenizer.eos_id`: training packs documents as [doc, eos, doc, eos,
  ...], so each passage reads as a preceding document. The passages share
  room = budget_tokens - len(query) tokens, separators included. Rule: take passages
  whole, in order, while they fit. The first one that does not fit is cut at its end
  (its first tokens kept) to fill the room exactly, if `partial` and at least one of
  its tokens fits; otherwise it is dropped. Every passage after it is dropped (so the
  least relevant go first). The query is never truncated here: with room <= 1 the
  input is the query alone.

  Args:
    query_ids: int [Q] query tokens.
    passages: the passages, most relevant first.
    tokenizer: encodes passage text.
    budget_tokens: the most tokens of the whole input (when the query fits in it).
    partial: cut the first passage that does not fit instead of dropping it.

  Returns:
    Augmented(ids int32 [C + Q], context_tokens C, num_passages).
  """
  query = np.asarray(query_ids, dtype=np.int32).reshape(-1)  # [Q]
  room = budget_tokens - len(query)
  parts, used, placed = [], 0, 0
  sep = np.array([tokenizer.eos_id], dtype=np.int32)
  for p in passages:
    ids = np.asarray(tokenizer.encode(p.text), dtype=np.int32)
    if not len(ids):
      continue
    left = room - used - 1  # Passage tokens that fit before its separator.
    if len(ids) > left:
      if partial and left > 0:
        parts += [ids[:left], sep]
        used += left + 1
        placed += 1
      break
    parts += [ids, sep]
    used += len(ids) + 1
    placed += 1
  return Augmented(np.concatenate(parts + [query]).astype(np.int32), used, placed)


def retrieve_and_augment(index: RetrievalIndex, query_ids: np.ndarray, tokenizer: Tokenizer,
                         k: int, budget_tokens: int, query_text: str | None = None,
                         ) -> Augmented:
  """`augment` with the top-k passages of `index` for the query.

  The search text is `query_text`, or else the decoded `query_ids` (int [Q]).
  """
  text = tokenizer.decode(query_ids) if query_text is None else query_text
  hits = index.search(text, k)
  return augment(query_ids, [p for p, _ in hits], tokenizer, budget_tokens)


def window_augmenter(index: RetrievalIndex | None, tokenizer: Tokenizer, k: int,
                     query_tokens: int, window: int):
  """A sliding-window `Augment` (`dsv2_jax.infer.sliding_window`) for `eval --rag`.

  Each window keeps its scored targets and the `query_tokens` tokens just before them
  (already seen, so nothing leaks); those context tokens are the search query, and the
  top-k passages fill the rest of the window ahead of them, most relevant first
  (In-Context RALM, Ram et al. 2023: retrieved text replaces the oldest context).
  With `index=None` the window is cut the same way and gets no passages: the control
  that separates the passages' effect from the shorter native context.
  """
  def augment_window(row: np.ndarray, score_from: int) -> tuple[np.ndarray, int]:
    start = max(0, score_from + 1 - query_tokens)
    keep, query = row[start:], row[start:score_from + 1]  # Context + scored; the context.
    hits = index.search(tokenizer.decode(query), k) if index is not None else []
    out = augment(keep, [p for p, _ in hits], tokenizer, budget_tokens=window + 1)
    return out.ids, out.context_tokens + score_from - start
  return augment_window
