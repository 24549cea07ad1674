"""The example notebooks run top to bottom; a failing cell (an assert) fails.

Each notebook executes in memory in a fresh ipykernel on this interpreter (see
``examples/render_figures.py``), with a temporary working directory and without
``XENT_WRITE_FIGURES``, so nothing is written into ``examples/``.

A notebook that passes is saved with its outputs to ``build/docs/notebooks/``
(ignored by git), stamped with the SHA-256 of its source: the documentation
build (``docs/conf.py``) renders those copies with execution off, so each
notebook runs once per CI run.
"""

import hashlib
import importlib.util
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).parents[1]
EXAMPLES = REPO / "examples"
EXECUTED = REPO / "build" / "docs" / "notebooks"
NOTEBOOKS = sorted(EXAMPLES.glob("[0-9][0-9]_*.ipynb"))
# Each runs in well under a minute alone; the margin is for a busy `pytest -n auto`.
TIMEOUT_S = 300


def _render_figures():
    spec = importlib.util.spec_from_file_location(
        "render_figures", EXAMPLES / "render_figures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _listing():
    return sorted(
        (p.name, p.stat().st_mtime_ns)
        for p in EXAMPLES.iterdir()
        if p.name != "__pycache__"
    )


def test_notebooks_are_found():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
@pytest.mark.slow
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.delenv("XENT_WRITE_FIGURES", raising=False)
    before = _listing()
    notebook, _ = _render_figures().execute(path, cwd=tmp_path, timeout_s=TIMEOUT_S)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, errors
    assert _listing() == before, "notebook wrote into examples/"
    assert not list(tmp_path.iterdir()), "notebook wrote files without being asked"
    _save_for_docs(notebook, path)


def _save_for_docs(notebook, path):
    """Writes the executed notebook where the docs build looks for it."""
    import nbformat

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    notebook.metadata["xent_jax"] = {"source_sha256": digest}
    EXECUTED.mkdir(parents=True, exist_ok=True)
    partial = EXECUTED / f".{path.name}.{os.getpid()}.partial"
    nbformat.write(notebook, partial)
    partial.replace(EXECUTED / path.name)


def test_notebooks_are_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name}: strip the outputs"
                assert cell.execution_count is None, f"{path.name}: strip the counts"
