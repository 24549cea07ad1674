"""Execute the example notebooks and refresh the PNG figures committed next to them.

Usage, from the repository root (after ``pip install -e ".[examples]"``)::

    python examples/render_figures.py                      # every notebook
    python examples/render_figures.py 02_digits_classifier # just some of them

Each notebook runs top to bottom in a fresh kernel of this Python interpreter,
with ``examples/`` as its working directory and ``XENT_WRITE_FIGURES=1`` set, which
is what makes it save its figure(s) (``examples/<notebook>.png``). The notebooks
themselves are left untouched: they are committed without outputs.

``tests/test_notebooks.py`` uses :func:`execute` too, without
``XENT_WRITE_FIGURES`` and in a temporary directory, so tests never write here.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from traitlets import default

EXAMPLES = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = sorted(EXAMPLES.glob("[0-9][0-9]_*.ipynb"))


class _ThisInterpreter(KernelSpecManager):
    """Every kernel name resolves to ipykernel on ``sys.executable``.

    A notebook's ``kernelspec`` says ``python3``, which a machine may map to
    some other Python (one without jax or this package); the examples must run
    on the interpreter that runs this script or the tests.
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[
                sys.executable,
                "-m",
                "ipykernel_launcher",
                "-f",
                "{connection_file}",
            ],
            display_name=f"Python ({sys.executable})",
            language="python",
        )


class _KernelManager(AsyncKernelManager):
    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return _ThisInterpreter(data_dir=self.data_dir)


def execute(
    path: pathlib.Path, cwd: pathlib.Path, timeout_s: float
) -> tuple[nbformat.NotebookNode, float]:
    """Run the notebook at ``path`` in memory; return it with outputs, and seconds.

    The whole notebook gets ``timeout_s`` seconds (each cell is given what is
    left of it). A cell that raises makes this raise
    ``nbclient.exceptions.CellExecutionError`` with the cell's traceback.
    """
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    deadline = start + timeout_s

    def cell_timeout(cell: nbformat.NotebookNode) -> int:
        return max(1, int(deadline - time.perf_counter()))

    client = NotebookClient(
        notebook,
        kernel_manager_class=_KernelManager,
        kernel_name="python3",
        timeout_func=cell_timeout,
        startup_timeout=120,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()  # starts the kernel and always shuts it down
    return notebook, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help="notebook names (default: all), e.g. 01_quickstart"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds each")
    args = parser.parse_args()
    wanted = {name.removesuffix(".ipynb") for name in args.names}
    notebooks = [nb for nb in NOTEBOOKS if not wanted or nb.stem in wanted]
    if wanted - {nb.stem for nb in notebooks}:
        parser.error(
            f"no such notebook(s): {sorted(wanted - {nb.stem for nb in notebooks})}"
        )
    os.environ["XENT_WRITE_FIGURES"] = "1"
    for path in notebooks:
        _, seconds = execute(path, cwd=EXAMPLES, timeout_s=args.timeout)
        figures = sorted(p.name for p in EXAMPLES.glob(f"{path.stem}*.png"))
        print(f"{path.name}: {seconds:5.1f} s -> {', '.join(figures) or 'no figure'}")


if __name__ == "__main__":
    main()
