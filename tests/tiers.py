"""The fast tier: ``pytest -m "not slow" -n auto``.

Every test runs in the full suite (the README's command, CI). The fast tier
leaves out what is marked ``slow``:

- whole tests (``@pytest.mark.slow``): notebooks, the fuzzer, subprocesses
  with many devices, compiles at language-model shapes, checks that repeat a
  kernel the fast tier already compiles with other block sizes or layouts;
- in a parametrised test, the cases given by :func:`slow`, left out of
  :func:`cases`' ``fast`` or of ``ops.parametrize``'s ``fast`` (op ids);
- of the cases left, all but the first (:func:`first_case_only`): the fast
  tier runs each check once. A test marked ``@EVERY_CASE`` keeps all its
  cases: the check of every op x implementation with every option
  (``test_properties.py::test_jit_equals_eager``) and the contracts (shapes,
  dtypes, reductions, options as Python and NumPy values) of every op.

``tests/conftest.py`` applies the rule and refuses a fast tier that leaves an
op x implementation of ``tests/ops.py`` out.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import pytest

SLOW = pytest.mark.slow
EVERY_CASE = pytest.mark.every_case


def slow(*values: Any, id: str | None = None):
    """A parametrisation case (one value per argname) that runs in the full
    suite only."""
    return pytest.param(*values, marks=SLOW, id=id)


def cases(values: Sequence[tuple[Any, ...]], ids: Sequence[str], fast: Collection[str]):
    """``values`` (one tuple per case, a value per argname) as
    ``pytest.param``s with ``ids``; those whose id is not in ``fast`` run in
    the full suite only."""
    unknown = set(fast) - set(ids)
    assert not unknown, unknown
    return [
        pytest.param(*v, id=i, marks=() if i in fast else SLOW)
        for v, i in zip(values, ids, strict=True)
    ]


def first_case_only(items: Sequence[pytest.Item]) -> None:
    """Marks ``slow`` every case of a parametrised test after its first one
    that is not already slow, unless the test is marked ``every_case``."""
    seen = set()
    for item in items:
        if not hasattr(item, "callspec") or item.get_closest_marker("slow"):
            continue
        if item.get_closest_marker("every_case"):
            continue
        test = (item.nodeid.split("[", 1)[0], item.originalname)
        if test in seen:
            item.add_marker(SLOW)
        seen.add(test)
