"""Sphinx configuration of the xent_jax documentation site.

Build it (warnings are errors) from the repository root with::

    sphinx-build -W --keep-going -b html docs build/docs/html

The example notebooks are rendered with their outputs and never executed here
when ``tests/test_notebooks.py`` has run: that test saves each executed notebook
to ``build/docs/notebooks/`` stamped with its source's SHA-256, and this file
copies the fresh ones into ``docs/examples/`` (ignored by git). A notebook
without a fresh executed copy is executed once here, the same way the test does
it, unless ``XENT_DOCS_STRICT`` (set by ``.ci/run``) or ``CI`` is set: then the
build stops, so CI never runs a notebook twice.

Math is typeset by MathJax 3 from files shipped by the ``django-static-mathjax``
wheel and copied into the site, so the site (and its browser test) works
without network access.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))

from sphinx.errors import ConfigError  # noqa: E402
from sphinx.util import inspect as _sphinx_inspect  # noqa: E402

import xent_jax  # noqa: E402

# Sphinx 9 prints an alias inside a union as ``TypeAliasForwardRef('name')``.
if hasattr(_sphinx_inspect, "TypeAliasForwardRef"):
    _sphinx_inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name

EXECUTED = REPO / "build" / "docs" / "notebooks"
STAGED = DOCS / "examples"  # ignored by git; filled below
GENERATED = DOCS / "_generated"  # ignored by git
STATIC_MATHJAX = REPO / "build" / "docs" / "static"

project = "xent_jax"
author = "the xent_jax authors"
copyright = "the xent_jax authors"  # noqa: A001
release = xent_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated", "**/.ipynb_checkpoints"]
root_doc = "index"
nitpicky = False

# --- autodoc / napoleon: Google-style docstrings with reST math ------------------
autodoc_default_options = {"members": False}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Signatures show jax's ``ArrayLike`` by name, not as the union it stands for.
autodoc_type_aliases = {"ArrayLike": "ArrayLike", "AxisName": "Any"}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
python_use_unqualified_type_names = True
add_module_names = True

# --- MyST / myst-nb ----------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_update_mathjax = False  # the MathJax configuration is mathjax_config.js
nb_execution_mode = "off"  # notebooks come executed (see the module docstring)
nb_merge_streams = True
suppress_warnings = ["mystnb.unknown_mime_type"]

# --- HTML --------------------------------------------------------------------------
html_theme = "furo"
html_title = f"xent_jax {release}"
html_static_path = ["_static", str(STATIC_MATHJAX)]
html_css_files = ["custom.css"]
# Sets window.MathJax (and the "typeset" mark the browser test waits for) before
# MathJax itself, which Sphinx adds (deferred) to the pages that have math.
html_js_files = [("mathjax_config.js", {"priority": 200})]
html_show_sourcelink = False
mathjax_path = "mathjax/tex-chtml.js"  # relative to _static


def _strict() -> bool:
    return any(
        os.environ.get(name, "").lower() not in ("", "0", "false")
        for name in ("XENT_DOCS_STRICT", "CI")
    )


def _copy_mathjax() -> None:
    """MathJax's combined TeX-to-CHTML component and its fonts, nothing else."""
    import mathjax  # the django-static-mathjax wheel

    es5 = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    out = STATIC_MATHJAX / "mathjax"
    fonts = pathlib.Path("output", "chtml", "fonts", "woff-v2")
    if (out / "tex-chtml.js").exists() and (out / fonts).is_dir():
        return
    (out / fonts).mkdir(parents=True, exist_ok=True)
    shutil.copy2(es5 / "tex-chtml.js", out / "tex-chtml.js")
    for font in (es5 / fonts).glob("*.woff"):
        shutil.copy2(font, out / fonts / font.name)


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _executed(source: pathlib.Path) -> pathlib.Path | None:
    """The executed copy of ``source`` that tests/test_notebooks.py saved, if
    it was made from the current source."""
    import nbformat

    copy = EXECUTED / source.name
    if not copy.exists():
        return None
    stamp = nbformat.read(copy, as_version=4).metadata.get("xent_jax", {})
    return copy if stamp.get("source_sha256") == _digest(source) else None


def _execute(source: pathlib.Path) -> pathlib.Path:
    """Executes ``source`` once, as tests/test_notebooks.py does, and saves it."""
    import tempfile

    import nbformat

    spec = importlib.util.spec_from_file_location(
        "render_figures", REPO / "examples" / "render_figures.py"
    )
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    os.environ.pop("XENT_WRITE_FIGURES", None)
    with tempfile.TemporaryDirectory() as cwd:
        notebook, seconds = render.execute(source, pathlib.Path(cwd), timeout_s=600)
    print(f"xent_jax docs: executed {source.name} in {seconds:.0f} s")
    notebook.metadata["xent_jax"] = {"source_sha256": _digest(source)}
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, EXECUTED / source.name)
    return EXECUTED / source.name


def _stage_notebooks() -> list[str]:
    """Copies the executed notebooks into docs/examples/; returns their stems."""
    sources = sorted((REPO / "examples").glob("[0-9][0-9]_*.ipynb"))
    missing = [s.name for s in sources if _executed(s) is None]
    if missing and _strict():
        raise ConfigError(
            f"no executed copy of {missing} in {EXECUTED} made from the current "
            "source: run `pytest tests/test_notebooks.py` before the docs build "
            "(CI executes each notebook once, in the tests)."
        )
    STAGED.mkdir(exist_ok=True)
    wanted = {s.name for s in sources}
    for old in STAGED.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()
    for source in sources:
        copy = _executed(source) or _execute(source)
        target = STAGED / source.name
        if not target.exists() or target.read_bytes() != copy.read_bytes():
            shutil.copy2(copy, target)
    return [s.stem for s in sources]


def _aux_reference() -> None:
    """The reference entry of ``Aux``: ``xent_jax.Aux`` where the package exports
    it, else the class where it is defined (until it is exported)."""
    GENERATED.mkdir(exist_ok=True)
    if "Aux" in getattr(xent_jax, "__all__", ()) or hasattr(xent_jax, "Aux"):
        target, note = "xent_jax.Aux", ""
    else:
        target = "xent_jax._aux.Aux"
        note = (
            "\n(Returned by the losses with ``return_aux=True``; not exported at "
            "the top level of this version.)\n"
        )
    fields = "".join(
        f"\n   .. autoattribute:: {target}.{f}\n" for f in xent_jax._aux.Aux._fields
    )
    text = f".. autoclass:: {target}\n{fields}{note}"
    path = GENERATED / "aux.rst"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _check_api_page() -> None:
    """Every public name has an entry in docs/api.rst."""
    text = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"\.\. auto(?:function|class):: xent_jax\.(\w+)", text))
    missing = sorted(set(xent_jax.__all__) - documented - {"Aux"})
    if missing:
        raise ConfigError(f"docs/api.rst has no entry for xent_jax.{missing}")


_copy_mathjax()
NOTEBOOKS = _stage_notebooks()
_aux_reference()
_check_api_page()
