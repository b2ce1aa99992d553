"""The Colab notebooks run top to bottom (nbclient, DSV2_JAX_NOTEBOOK_QUICK=1: a few steps
of the same code) and are committed without outputs."""

import json
import os
import pathlib

import pytest

from tests.helpers import REPO

NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))


def test_every_notebook_is_listed_and_stripped():
  assert {p.stem for p in NOTEBOOKS} == {"quickstart", "ablations", "meshes", "stages"}
  for path in NOTEBOOKS:
    notebook = json.loads(path.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), (
        f"{path.name} has outputs: strip them before committing (see colab/README.md)")
    assert any("parameters" in c["metadata"].get("tags", []) for c in code), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, tmp_path, data_dir, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  pytest.importorskip("ipykernel")
  monkeypatch.setenv("DSV2_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("DSV2_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
  monkeypatch.setenv("DSV2_JAX_NOTEBOOK_DATA_DIR", data_dir)
  # The kernel compiles with XLA's full optimisations: tests elsewhere turn them off in-process.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # A cell's error raises CellExecutionError with its traceback.
