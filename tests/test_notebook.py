"""The walkthrough notebook runs top to bottom (nbclient, the venv's python3 kernel, 2 render steps)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_runs(tmp_path, monkeypatch):
    # the kernelspec's argv is "python": make it this interpreter (the venv's), with one thread
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("CIRCUITS_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("CIRCUITS_NOTEBOOK_OUT", str(tmp_path / "pages"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "render steps: 2" in outputs
    assert "expanded weights (160, 112" in outputs
    assert (tmp_path / "pages" / "index.html").is_file()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
