"""Execute the walkthrough notebooks (train -> sweep -> export) at small settings."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ORDER = ("01_train_gates.ipynb", "02_frontier_sweep.ipynb", "03_export_and_deploy.ipynb")
KERNEL = "adaptive-sparse-test"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernel spec for this interpreter in a temp dir, and the small-settings env vars."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "adaptive-sparse (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("ADAPTIVE_SPARSE_NB_SMALL", "1")
    monkeypatch.setenv("ADAPTIVE_SPARSE_NB_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH", "")]))
    return tmp_path / "run"


def test_notebooks_execute_in_order(kernel_env):
    import nbformat
    from nbclient import NotebookClient

    times = {}
    for name in ORDER:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        t0 = time.perf_counter()
        NotebookClient(book, timeout=900, kernel_name=KERNEL,
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        times[name] = time.perf_counter() - t0
        errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, (name, errors)
        images = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if "image/png" in o.get("data", {})]
        assert images, f"{name}: expected at least one plot in the outputs"
    run = kernel_env
    assert (run / "gates" / "manifest.json").is_file()
    assert (run / "sweep" / "frontier.png").is_file()
    for kind in ("gate", "masks", "static"):
        assert (run / "artifacts" / kind / "manifest.json").is_file()
    print("notebook seconds:", {k: round(v, 1) for k, v in times.items()})


@pytest.mark.parametrize("name", ORDER)
def test_committed_notebooks_are_clean(name):
    """Committed without outputs (a run's outputs would date and leak machine paths): no
    outputs, no execution counts, no absolute paths."""
    text = (NOTEBOOKS / name).read_text()
    book = json.loads(text)
    for cell in book["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, name
    for needle in ("/work/", "/home/", "/tmp/", "/root/", "C:\\\\"):
        assert needle not in text, (name, needle)
