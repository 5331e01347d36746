"""The module notebooks execute top to bottom (small sizes: TORCH_IOSPARSE_NB_FAST=1)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "finetune.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_IOSPARSE_NB_FAST", "1")
    monkeypatch.setenv("TORCH_IOSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    workdir = tmp_path / "run"
    workdir.mkdir()
    # run in a scratch directory so files the notebook writes stay out of the repository
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
