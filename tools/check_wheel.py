"""Builds the sdist and the wheel and checks that the wheel installs clean.

Usage, from anywhere (CI runs it as the last step of the README's test
command)::

    python tools/check_wheel.py          # needs the `build` package (test extra)
    python tools/check_wheel.py --keep   # keep the temporary folder

1. ``python -m build`` builds the sdist, then the wheel from the sdist (so a
   file missing from the sdist fails here too), into a temporary folder.
2. The archives are listed: the wheel must hold every module of the source
   tree and ``xent_jax/py.typed``, and nothing but the package.
3. A fresh virtual environment gets the wheel, not editable, with only its
   runtime dependencies (pip resolves them from the wheel's metadata).
4. A smoke test runs in that environment from a folder outside the source
   tree: the import comes from the environment's site-packages, ``py.typed`` is
   installed, the worked example gives 0.46437, and ``jax.jit(jax.grad(...))``
   gives softmax - onehot.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]
# Development tools that must not come with the wheel.
NOT_RUNTIME = (
    "optax",
    "pytest",
    "sphinx",
    "hypothesis",
    "matplotlib",
    "ruff",
    "flax",
    "equinox",
)

SMOKE = r"""
import importlib.metadata
import importlib.resources
import pathlib
import sys

import jax
import jax.numpy as jnp

import xent_jax

repo = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(xent_jax.__file__).resolve()
assert "site-packages" in where.parts and repo not in where.parents, where
assert (importlib.resources.files("xent_jax") / "py.typed").is_file(), "no py.typed"
assert importlib.metadata.version("xent_jax") == xent_jax.__version__

for name in xent_jax.__all__:
    assert callable(getattr(xent_jax, name)), name

logits, labels = jnp.array([[1.0, 2.0, 0.5]]), jnp.array([1])
loss = xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels)
assert loss.shape == (1,) and abs(float(loss[0]) - 0.46437) < 1e-5, loss


def total(x):
    return xent_jax.softmax_cross_entropy_with_integer_labels(
        x, labels, reduction="sum"
    )


grad = jax.jit(jax.grad(total))(logits)
expected = jax.nn.softmax(logits) - jax.nn.one_hot(labels, 3)
assert jnp.allclose(grad, expected, atol=1e-6), (grad, expected)
print(f"smoke test passed: xent_jax {xent_jax.__version__} from {where.parent}")
print(f"  loss {float(loss[0]):.5f}, jit(grad) {grad.tolist()}")
"""


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], check=True, **kwargs)


def _source_modules() -> set[str]:
    package = REPO / "xent_jax"
    return {
        p.relative_to(REPO).as_posix()
        for p in package.rglob("*.py")
        if "__pycache__" not in p.parts
    }


def _check_archives(dist: pathlib.Path) -> pathlib.Path:
    (wheel,) = dist.glob("xent_jax-*.whl")
    (sdist,) = dist.glob("xent_jax-*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = (_source_modules() | {"xent_jax/py.typed"}) - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    stray = sorted(n for n in names if not n.startswith(("xent_jax/", "xent_jax-")))
    assert not stray, f"the wheel holds files outside the package: {stray}"
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[-1] for n in archive.getnames()}
    for needed in ("pyproject.toml", "README.md", "xent_jax/py.typed"):
        assert needed in names, f"the sdist lacks {needed}"
    print(f"archives: {sdist.name}, {wheel.name} (py.typed included)")
    return wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="xent-wheel-"))
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    times = {}
    try:
        start = time.perf_counter()
        _run([sys.executable, "-m", "build", "-q", "--outdir", tmp / "dist", REPO])
        times["build"] = time.perf_counter() - start
        wheel = _check_archives(tmp / "dist")

        start = time.perf_counter()
        _run([sys.executable, "-m", "venv", tmp / "venv"])
        python = tmp / "venv" / "bin" / "python"
        _run([python, "-m", "pip", "install", "-q", "--no-compile", wheel], env=env)
        times["install"] = time.perf_counter() - start
        listing = _run(
            [python, "-m", "pip", "list", "--format=json"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        installed = {p["name"].lower(): p["version"] for p in json.loads(listing)}
        extra = sorted(set(installed) & set(NOT_RUNTIME))
        assert not extra, f"installing the wheel brought development tools: {extra}"
        print("installed:", " ".join(f"{k}=={v}" for k, v in sorted(installed.items())))

        start = time.perf_counter()
        outside = tmp / "elsewhere"
        outside.mkdir()
        _run([python, "-c", SMOKE, REPO], cwd=outside, env=env)
        times["smoke"] = time.perf_counter() - start
        print("seconds:", ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
