"""Dataset name -> TFDS random-access data source (array_record, no TensorFlow).

Local builders (`LOCAL_BUILDERS`, from `corpora`, `chat_corpora` and `review_corpora`)
are prepared on first use, under a file lock so that parallel processes do not race.
Any other name is a TFDS catalog name ("c4/en", "pg19") and goes through the same
`builder -> prepare -> data source` path; when it is not prepared under `data_dir`, we
only try to prepare it if `data.download` is set and the network answers within
seconds, and otherwise fail at once with the command that prepares it (TFDS would
retry cloud storage for minutes).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import pathlib
import socket
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from dsv2_jax.data import chat_corpora, corpora, review_corpora

# Every local builder by dataset name; the one registry that users (config) read.
LOCAL_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    **corpora.LOCAL_BUILDERS, **chat_corpora.BUILDERS, **review_corpora.BUILDERS}


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither prepared locally nor preparable here."""


def _network_reachable(host: str = "storage.googleapis.com", port: int = 443,
                       timeout_s: float = 3.0) -> bool:
  try:
    with socket.create_connection((host, port), timeout=timeout_s):
      return True
  except OSError:
    return False


@contextlib.contextmanager
def _file_lock(directory: pathlib.Path):
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / ".prepare.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _split_name(dataset: str) -> tuple[str, str | None]:
  name, _, variant = dataset.partition("/")
  return name, (variant or None)


def get_builder(dataset: str, data_dir: str, download: bool = False) -> tfds.core.DatasetBuilder:
  """Returns a prepared TFDS builder for `dataset`, preparing local corpora on demand."""
  root = pathlib.Path(data_dir).expanduser()
  name, variant = _split_name(dataset)
  if name in LOCAL_BUILDERS:
    kwargs: dict[str, Any] = {"data_dir": str(root), "file_format": "array_record"}
    if variant:
      kwargs["config"] = variant
    try:
      builder = LOCAL_BUILDERS[name](**kwargs)
    except ValueError as e:
      raise DatasetUnavailableError(f"data.dataset={dataset!r}: {e}") from e
    if not builder.is_prepared():
      with _file_lock(root):
        builder = LOCAL_BUILDERS[name](**kwargs)  # Re-check under the lock.
        if not builder.is_prepared():
          logging.info("Preparing local corpus %s under %s", dataset, root)
          tfds.disable_progress_bar()
          builder.download_and_prepare()
    return builder

  prepare_cmd = (f"tfds build {dataset} --file_format=array_record --data_dir={root}")
  try:
    builder = tfds.builder(dataset, data_dir=str(root), try_gcs=False,
                           file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetUnavailableError(
        f"data.dataset={dataset!r} is not prepared under data.data_dir={str(root)!r} and its "
        f"TFDS builder is not importable here (not a TFDS catalog name, or it needs "
        f"TensorFlow). Prepare it once on a machine with internet: `{prepare_cmd}`, then "
        f"copy the folder to data.data_dir. Local corpora: {list(LOCAL_BUILDERS)}."
    ) from e
  if builder.is_prepared():
    return builder
  if not download:
    raise DatasetUnavailableError(
        f"data.dataset={dataset!r} is not prepared under data.data_dir={str(root)!r}. "
        f"Set --config.data.download=True on a machine with internet, or run `{prepare_cmd}`.")
  if not _network_reachable():
    raise DatasetUnavailableError(
        f"data.dataset={dataset!r} is not prepared under {str(root)!r} and the network is "
        f"unreachable, so it cannot be downloaded here. Run `{prepare_cmd}` elsewhere.")
  with _file_lock(root):
    builder.download_and_prepare(file_format="array_record")
  return builder


def as_text(value: Any) -> str:
  """A text feature of a decoded example (bytes, or a 0-d numpy array of them) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def data_source(dataset: str, split: str, data_dir: str, download: bool = False):
  """Random-access source of decoded examples (dicts of numpy/bytes) for `split`.

  'a+b' is the examples of a, then those of b (each source keeps its own features).
  """
  if "+" in dataset:
    parts = [data_source(name, split, data_dir, download) for name in dataset.split("+")]
    return grain.MapDataset.concatenate([grain.MapDataset.source(p) for p in parts])
  builder = get_builder(dataset, data_dir, download)
  if split not in builder.info.splits:
    raise DatasetUnavailableError(
        f"split {split!r} is not in data.dataset={dataset!r}; it has "
        f"{sorted(builder.info.splits)}. Fix data.train_split / data.eval_split.")
  return builder.as_data_source(split=split)
