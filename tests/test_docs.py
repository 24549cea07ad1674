"""The documentation site as a reader sees it: the built HTML in headless Chromium.

Run after the docs build (see the README's test command)::

    sphinx-build -W --keep-going -q -b html docs build/docs/html
    pytest tests/test_docs.py

The site is served on 127.0.0.1 (as a web server would serve it) and each page
is loaded by Debian's Chromium, which runs its JavaScript (MathJax typesets the
formulas) before the DOM is read back. The API reference must show every public
name with its signature, its formula typeset without a TeX error, and its
example; the getting-started page its code, its math and its links into the
reference. Screenshots of both pages are left in ``build/docs/screenshots/``.

Where ``XENT_DOCS_STRICT`` (set by ``.ci/run``) or ``CI`` is set, a missing
browser or site fails these tests instead of skipping them. The code blocks of
the getting-started page run in any case.
"""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import re
import shutil
import subprocess
import threading

import pytest

import xent_jax

# A built site and a browser: the full suite only (tests/tiers.py).
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).parents[1]
SITE = pathlib.Path(os.environ.get("XENT_DOCS_HTML", REPO / "build" / "docs" / "html"))
SCREENSHOTS = REPO / "build" / "docs" / "screenshots"
STRICT = any(
    os.environ.get(name, "").lower() not in ("", "0", "false")
    for name in ("XENT_DOCS_STRICT", "CI")
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next(filter(None, map(shutil.which, BROWSERS)), None)
FUNCTIONS = sorted(n for n in xent_jax.__all__ if callable(getattr(xent_jax, n)))
FUNCTIONS = [n for n in FUNCTIONS if not isinstance(getattr(xent_jax, n), type)]
AUX_EXPORTED = hasattr(xent_jax, "Aux")
# Chromium waits this long in virtual time (no real time passes once the page is
# idle) for scripts and fonts before it dumps the DOM or takes the screenshot.
VIRTUAL_TIME_MS = 20_000


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if STRICT:
        pytest.fail(f"{reason} (XENT_DOCS_STRICT or CI is set: this may not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site_url():
    _require(CHROMIUM is not None, "no Chromium (apt-get install -y chromium)")
    _require(
        (SITE / "api.html").exists(),
        f"no built site in {SITE}: run "
        "`sphinx-build -W --keep-going -b html docs build/docs/html` first",
    )
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base's signature)
        pass


def _chromium(tmp_path: pathlib.Path, *args: str) -> str:
    """Runs headless Chromium with ``args``; returns its standard output."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *args,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _dom(url: str, tmp_path: pathlib.Path):
    from bs4 import BeautifulSoup

    html = _chromium(tmp_path, "--dump-dom", url)
    assert html.strip(), f"Chromium returned no DOM for {url}"
    return BeautifulSoup(html, "html.parser")


def _screenshot(url: str, name: str, tmp_path: pathlib.Path) -> pathlib.Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    path.unlink(missing_ok=True)
    _chromium(tmp_path, f"--screenshot={path}", "--window-size=1280,1600", url)
    assert path.exists(), f"Chromium wrote no screenshot of {url}"
    return path


@pytest.fixture(scope="module")
def api(site_url, tmp_path_factory):
    return _dom(f"{site_url}/api.html", tmp_path_factory.mktemp("chromium"))


@pytest.fixture(scope="module")
def getting_started(site_url, tmp_path_factory):
    return _dom(f"{site_url}/getting_started.html", tmp_path_factory.mktemp("chromium"))


def _check_math_typeset(dom, page: str) -> None:
    """MathJax ran in the browser, typeset every formula, and hit no TeX error."""
    assert dom.html.get("data-mathjax") == "typeset", (
        f"MathJax did not finish on {page} (is _static/mathjax/tex-chtml.js there?)"
    )
    assert not dom.select("mjx-merror"), [
        e.get_text() for e in dom.select("mjx-merror")
    ]
    for node in dom.select(".math"):
        assert node.select("mjx-container"), f"{page}: untypeset math {node.get_text()}"
        assert not re.search(r"\\[\[\(]", node.get_text()), node.get_text()


def _entry(dom, name: str):
    """The ``<dt>`` (signature) and ``<dd>`` (docstring) of ``xent_jax.name``."""
    dt = dom.find("dt", id=f"xent_jax.{name}")
    assert dt is not None, f"no API entry for xent_jax.{name}"
    dd = dt.find_next_sibling("dd")
    assert dd is not None, f"xent_jax.{name} has no description"
    return dt, dd


def test_api_reference_typesets_its_math(api):
    _check_math_typeset(api, "api.html")


def test_api_reference_lists_every_public_name(api):
    documented = {
        dt["id"].removeprefix("xent_jax.")
        for dt in api.select("dl.py > dt[id^='xent_jax.']")
    }
    assert set(FUNCTIONS) <= documented, set(FUNCTIONS) - documented
    summary = {a.get_text(strip=True) for a in api.select("table.autosummary a")}
    assert set(FUNCTIONS) <= summary, set(FUNCTIONS) - summary


@pytest.mark.parametrize("name", FUNCTIONS)
def test_api_entry_renders(api, name):
    dt, dd = _entry(api, name)
    assert name in dt.get_text() and "(" in dt.get_text(), dt.get_text()
    # The formula: a display equation typeset into MathJax's output elements.
    display = dd.select("mjx-container[display='true']")
    assert display, f"xent_jax.{name}: no typeset formula"
    assert all(m.select("mjx-math mjx-mi, mjx-math mjx-mo") for m in display)
    # Args and Returns became field lists.
    fields = [f.get_text(" ", strip=True) for f in dd.select("dl.field-list > dt")]
    assert any(f.startswith("Parameters") for f in fields), fields
    assert any(f.startswith("Returns") for f in fields), fields
    # The example: a highlighted doctest that calls the function.
    examples = [pre.get_text() for pre in dd.select("div.doctest pre, pre")]
    calls = [e for e in examples if ">>>" in e and f"xent_jax.{name}(" in e]
    assert calls, f"xent_jax.{name}: no rendered example calling it in {examples}"
    assert dd.select("div.doctest span.gp"), f"xent_jax.{name}: example unhighlighted"


def test_api_documents_aux(api):
    name = "Aux" if AUX_EXPORTED else "_aux.Aux"
    dt, dd = _entry(api, name)
    for field in ("lse", "argmax", "correct", "entropy"):
        assert dd.find("dt", id=f"xent_jax.{name}.{field}"), field


def test_getting_started_renders(getting_started):
    dom = getting_started
    assert dom.find("h1").get_text(strip=True).startswith("Getting started")
    _check_math_typeset(dom, "getting_started.html")
    assert dom.select("div.math mjx-container[display='true']"), "no display math"
    code = [pre.get_text() for pre in dom.select("div.highlight-python pre")]
    assert any("jax.value_and_grad(loss_fn)" in c for c in code), code
    assert any(
        "softmax_cross_entropy_with_integer_labels(logits, labels)" in c for c in code
    )
    assert dom.select("div.highlight-python pre span.kn"), "code is not highlighted"
    assert any(
        "pip install" in pre.get_text() for pre in dom.select("div.highlight-bash pre")
    )
    links = {a.get("href", "") for a in dom.select("a")}
    for name in ("softmax_cross_entropy_with_integer_labels", "linear_cross_entropy"):
        assert f"api.html#xent_jax.{name}" in links, name
    for page in ("api.html", "semantics.html", "examples.html"):
        assert page in links, page


@pytest.mark.parametrize("page", ["api", "getting_started"])
def test_page_screenshot_is_not_blank(site_url, page, tmp_path):
    from PIL import Image

    path = _screenshot(f"{site_url}/{page}.html", page, tmp_path)
    with Image.open(path) as image:
        assert image.size == (1280, 1600), image.size
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50, f"{path} looks blank"


def _python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)


def test_getting_started_code_runs(capsys):
    blocks = _python_blocks(REPO / "docs" / "getting_started.md")
    assert len(blocks) >= 2, blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "getting_started.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "0.4643" in out, out


def test_ci_runs_the_readme_test_command():
    """The README's test command is what .ci/run runs, and what the docs show."""
    readme = (REPO / "README.md").read_text()
    (command,) = [
        line
        for line in readme.splitlines()
        if line.startswith("python3 -m venv") and "pytest" in line
    ]
    for path in (".ci/run", "docs/getting_started.md", "docs/development.md"):
        lines = (REPO / path).read_text().splitlines()
        assert command in lines, f"{path} does not run the README's test command"
    for step in ("tests/test_docs.py", "sphinx-build -W", "tools/check_wheel.py"):
        assert step in command, step
