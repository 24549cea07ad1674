"""Property-based tests (hypothesis, profile "ci" from conftest.py).

Shapes are fixed so that each jitted function compiles once per process.
"""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import IMPLS, assert_close
from hypothesis import given
from hypothesis import strategies as st

import xent_jax as xj

N, C = 3, 5

finite = st.floats(-30.0, 30.0, width=32, allow_subnormal=False)
logits_st = hnp.arrays(np.float32, (N, C), elements=finite)
labels_st = hnp.arrays(np.int32, (N,), elements=st.integers(0, C - 1))
probs_st = hnp.arrays(
    np.float32, (N, C), elements=st.floats(0.0, 1.0, width=32, allow_subnormal=False)
)
shift_st = hnp.arrays(np.float32, (N, 1), elements=st.floats(-50.0, 50.0, width=32))
smooth_st = st.sampled_from([0.0, 0.1, 0.4])


def _normalise(p):
    p = np.asarray(p, np.float64) + 1e-3
    return jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32)


@functools.cache
def _int(impl, label_smoothing=0.0, weighted=False):
    w = jnp.linspace(0.5, 2.0, C) if weighted else None
    return jax.jit(
        functools.partial(
            xj.softmax_cross_entropy_with_integer_labels,
            implementation=impl,
            label_smoothing=label_smoothing,
            class_weights=w,
        )
    )


@functools.cache
def _soft(impl, label_smoothing=0.0, weighted=False):
    w = jnp.linspace(0.5, 2.0, C) if weighted else None
    return jax.jit(
        functools.partial(
            xj.softmax_cross_entropy,
            implementation=impl,
            label_smoothing=label_smoothing,
            class_weights=w,
        )
    )


@functools.cache
def _bce(impl):
    return jax.jit(
        functools.partial(xj.sigmoid_binary_cross_entropy, implementation=impl)
    )


@functools.cache
def _grad_soft(impl):
    return jax.jit(jax.grad(lambda x, t: _soft(impl)(x, t).sum()))


@functools.cache
def _grad_int(impl, label_smoothing):
    return jax.jit(jax.grad(lambda x, y: _int(impl, label_smoothing)(x, y).sum()))


@pytest.mark.parametrize("impl", IMPLS)
@given(x=logits_st, y=labels_st, c=shift_st, a=smooth_st)
def test_shift_invariance(impl, x, y, c, a):
    x = jnp.asarray(x)
    f = _int(impl, a)
    assert_close(f(x + c, y), f(x, y), rtol=1e-4, atol=1e-4)
    t = jax.nn.one_hot(y, C)
    g = _soft(impl, a)
    assert_close(g(x + c, t), g(x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@given(x=logits_st, y=labels_st, a=smooth_st, weighted=st.booleans())
def test_integer_equals_one_hot(impl, x, y, a, weighted):
    x = jnp.asarray(x)
    i = _int(impl, a, weighted)(x, y)
    s = _soft(impl, a, weighted)(x, jax.nn.one_hot(y, C))
    assert_close(i, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@given(
    x=hnp.arrays(np.float32, (N, 2), elements=finite),
    p=hnp.arrays(np.float32, (N,), elements=st.floats(0, 1, width=32)),
)
def test_two_class_softmax_equals_sigmoid_bce(impl, x, p):
    x, p = jnp.asarray(x), jnp.asarray(p)
    t = jnp.stack([1 - p, p], axis=-1)
    soft = _soft(impl)(x, t)
    bce = _bce(impl)(x[:, 1] - x[:, 0], p)
    assert_close(soft, bce, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@given(x=logits_st, y=probs_st)
def test_bce_symmetry(impl, x, y):
    f = _bce(impl)
    assert_close(f(jnp.asarray(x), y), f(-jnp.asarray(x), 1 - y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@given(x=logits_st, y=labels_st)
def test_nonnegative_for_one_hot_targets(impl, x, y):
    x = jnp.asarray(x)
    assert np.all(np.asarray(_int(impl)(x, y)) >= 0)
    assert np.all(np.asarray(_soft(impl)(x, jax.nn.one_hot(y, C))) >= 0)


@pytest.mark.parametrize("impl", IMPLS)
@given(x=logits_st, y=labels_st, p=probs_st, a=smooth_st)
def test_gradient_rows_sum_to_zero_for_normalised_targets(impl, x, y, p, a):
    x = jnp.asarray(x)
    g = _grad_int(impl, a)(x, y)
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5)
    g = _grad_soft(impl)(x, _normalise(p))
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@given(v=st.floats(-1e3, 1e3, width=32), y=labels_st)
def test_uniform_logits_give_log_c(impl, v, y):
    x = jnp.full((N, C), v, jnp.float32)
    np.testing.assert_allclose(_int(impl)(x, y), np.log(C), rtol=1e-5)
