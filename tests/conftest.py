"""Shared pytest configuration for the xent_jax test suite."""

import pytest
from hypothesis import settings

settings.register_profile(
    "ci", database=None, derandomize=True, deadline=None, max_examples=25
)
settings.load_profile("ci")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Before ``-m`` selects: one case of each parametrised test is fast."""
    import tiers

    tiers.first_case_only(items)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """The fast tier (``-m "not slow"`` over the whole suite) must still run
    every op x implementation of ``tests/ops.py``: a ``slow`` mark that takes
    the last case of one away is an error, not a silent gap."""
    config, items = session.config, session.items
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if config.option.markexpr.strip() != "not slow" or not whole_suite:
        return
    if config.option.keyword:  # -k narrows the run on purpose
        return
    import ops

    ran = set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        ran |= {value.id for value in params.values() if isinstance(value, ops.Op)}
    missing = sorted({op.id for op in ops.OPS} - ran)
    if missing:
        raise pytest.UsageError(f"the fast tier runs no test of {missing}")
