"""Catalog names go through TFDS; unprepared ones fail fast with the fix in the message."""

from __future__ import annotations

import time

import pytest

from dsv2_jax.data import sources


@pytest.mark.parametrize("name", ["c4/en", "pg19", "no_such_corpus"])
def test_unprepared_catalog_dataset_fails_fast(tmp_path, name):
  start = time.perf_counter()
  with pytest.raises(sources.DatasetUnavailableError, match="data.dataset") as err:
    sources.get_builder(name, str(tmp_path))
  assert time.perf_counter() - start < 10
  assert "tfds build" in str(err.value) or "not prepared" in str(err.value)


def test_download_requested_without_network_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_network_reachable", lambda *a, **k: False)
  with pytest.raises(sources.DatasetUnavailableError, match="network is unreachable"):
    sources.get_builder("pg19", str(tmp_path), download=True)


def test_unknown_split_names_the_config_field(data_dir):
  with pytest.raises(sources.DatasetUnavailableError, match="data.eval_split"):
    sources.data_source("wiki_excerpt", "test", data_dir)


def test_unknown_builder_variant_is_reported(data_dir):
  with pytest.raises(sources.DatasetUnavailableError, match="web_bible/verses"):
    sources.get_builder("web_bible/verses", data_dir)
