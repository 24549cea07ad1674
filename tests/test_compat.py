"""Canaries for ``xent_jax._compat``: which branch each JAX-internal or
version-dependent use takes, asserted for the pinned JAX and for the floor.

A JAX upgrade that silently moves a use to its fallback (slower, or an effect
in every jitted loss) fails here instead of going unnoticed; a new JAX with a
branch this table does not know fails too, so the table is updated on purpose.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import xent_jax as xj
from xent_jax import _compat

# The branch each use takes, by JAX version: the floor in pyproject.toml
# (0.10.0 exactly: its AbstractDevice has no platform yet), the version Python
# 3.11 resolves (0.10.x) and the newest CI tests (0.12). A full version is
# looked up before its minor release.
EXPECTED = {
    (0, 10, 0): {
        "checkify": "rule_table",
        "reshard": "jax.sharding.reshard",
        "transpose_detection": "tracer_parent",
        "gpu_lowering": "default_target",
    },
    (0, 10): {
        "checkify": "rule_table",
        "reshard": "jax.sharding.reshard",
        "transpose_detection": "tracer_parent",
        "gpu_lowering": "abstract_device",
    },
    (0, 12): {
        "checkify": "rule_table_ctx",
        "reshard": "jax.sharding.reshard",
        "transpose_detection": "tracer_parent",
        "gpu_lowering": "abstract_device",
    },
}


def _expected_branches():
    version = tuple(int(p) for p in jax.__version__.split(".")[:3])
    for key in (version, version[:2]):
        if key in EXPECTED:
            return EXPECTED[key]
    pytest.fail(
        f"jax {jax.__version__} is not in tests/test_compat.py's table: run "
        f"the suite on it and add its branches, {_compat.BRANCHES}"
    )


def test_branches_match_the_table_for_this_jax():
    assert _compat.BRANCHES == _expected_branches()


def test_every_branch_is_recorded():
    assert set(_compat.BRANCHES) == set(EXPECTED[max(EXPECTED)])


def test_label_check_has_no_effect_on_this_jax():
    # The rule-table branch is the one that keeps jit's fast dispatch path.
    step = jax.jit(lambda v, y: xj.softmax_cross_entropy_with_integer_labels(v, y))
    jaxpr = jax.make_jaxpr(step)(jnp.zeros((2, 3)), jnp.array([0, 1]))
    assert jaxpr.effects == set()


def test_transpose_detection_sees_emb_T_under_jit():
    seen = []

    def f(emb):
        seen.append(_compat.is_transpose_output(emb.T))
        return emb

    jax.jit(f)(jnp.ones((4, 2)))
    assert seen == [True]
    assert not _compat.is_transpose_output(jnp.ones((4, 2)).T)  # eager: a copy


def test_varying_manual_axes_outside_shard_map_is_empty():
    assert _compat.varying_manual_axes(jnp.ones(3)) == frozenset()


def test_enable_x64_context():
    with _compat.enable_x64():
        assert jnp.asarray(np.float64(1.0)).dtype == jnp.float64
    assert jnp.asarray(np.float64(1.0)).dtype == jnp.float32


def test_is_static():
    assert _compat.is_static(3)
    (b,) = export.symbolic_shape("b")
    assert not _compat.is_static(b)
