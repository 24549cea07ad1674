"""Property-based tests (hypothesis, profile "ci" from conftest.py).

Each property runs on every op x implementation of ``tests/ops.py`` that has
the capabilities it needs (not the Pallas kernels: interpreted, they are too
slow for many examples). Shapes are fixed so that each jitted function
compiles once per process. vmap equals a loop: test_gradients's
test_jit_and_vmap_over_leading_axis.
"""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import ops
from core_helpers import assert_close, cotangent_like, logits
from hypothesis import given
from hypothesis import strategies as st
from ops import IGNORE
from tiers import EVERY_CASE

N, C = 3, 5

finite = st.floats(-30.0, 30.0, width=32, allow_subnormal=False)
logits_st = hnp.arrays(np.float32, (N, C), elements=finite)
labels_st = hnp.arrays(np.int32, (N,), elements=st.integers(0, C - 1))
probs_st = hnp.arrays(
    np.float32, (N, C), elements=st.floats(0.0, 1.0, width=32, allow_subnormal=False)
)
shift_st = hnp.arrays(np.float32, (N, 1), elements=st.floats(-50.0, 50.0, width=32))
smooth_st = st.sampled_from([0.0, 0.1, 0.4])
mask_st = hnp.arrays(np.bool_, (N,), elements=st.booleans())
CW = jnp.linspace(0.5, 2.0, C)


def _normalise(p):
    p = np.asarray(p, np.float64) + 1e-3
    return jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32)


@functools.cache
def _loss(op, reduction="none", label_smoothing=0.0, ignore=False):
    """``op`` jitted, ``f(x, labels, class_weights=None, where=None)`` (the
    array options are arguments: one program for all the values)."""
    static = op.options(label_smoothing=label_smoothing)
    if ignore:
        static.update(ignore_index=IGNORE)

    def f(x, labels, class_weights=None, where=None):
        kw = dict(static)
        if class_weights is not None:
            kw["class_weights"] = class_weights
        if where is not None:
            kw["where"] = where
        return op(x, labels, reduction=reduction, **kw)

    return jax.jit(f)


@functools.cache
def _grad(op, label_smoothing):
    f = _loss(op, label_smoothing=label_smoothing)
    return jax.jit(jax.grad(lambda x, y: f(x, y).sum()))


@ops.parametrize("softmax")
@given(x=logits_st, y=labels_st, c=shift_st, a=smooth_st)
def test_shift_invariance(op, x, y, c, a):
    x = jnp.asarray(x)
    f = _loss(op, label_smoothing=a)
    t = op.hard(y, C)
    assert_close(f(x + c, t), f(x, t), rtol=1e-4, atol=1e-4)


@ops.parametrize("softmax", "class_weights")
@given(x=logits_st, y=labels_st, a=smooth_st, perm=st.permutations(range(C)))
def test_permuting_the_classes(op, x, y, a, perm):
    # Classes, labels and class weights permuted together: the same losses.
    x, perm = jnp.asarray(x), np.asarray(perm)
    inverse = np.argsort(perm)  # class c moves to position inverse[c]
    f = _loss(op, label_smoothing=a)
    t = op.hard(y, C)
    t_perm = inverse[y] if op.has("integer_labels") else t[:, perm]
    assert_close(f(x[:, perm], t_perm, CW[perm]), f(x, t, CW), rtol=1e-5, atol=1e-5)


@ops.parametrize("integer_labels")
@given(x=logits_st, y=labels_st, a=smooth_st, weighted=st.booleans())
def test_integer_equals_one_hot(op, x, y, a, weighted):
    x = jnp.asarray(x)
    soft = ops.counterpart(op, "soft")
    w = CW if weighted else None
    i = _loss(op, label_smoothing=a)(x, y, w)
    s = _loss(soft, label_smoothing=a)(x, jax.nn.one_hot(y, C), w)
    assert_close(i, s, rtol=1e-5, atol=1e-5)


@ops.parametrize("soft_labels")
@given(
    x=hnp.arrays(np.float32, (N, 2), elements=finite),
    p=hnp.arrays(np.float32, (N,), elements=st.floats(0, 1, width=32)),
)
def test_two_class_softmax_equals_sigmoid_bce(op, x, p):
    x, p = jnp.asarray(x), jnp.asarray(p)
    t = jnp.stack([1 - p, p], axis=-1)
    soft = _loss(op)(x, t)
    bce = _loss(ops.counterpart(op, "bce"))(x[:, 1] - x[:, 0], p)
    assert_close(soft, bce, rtol=1e-4, atol=1e-4)


@ops.parametrize("elementwise")
@given(x=logits_st, y=probs_st)
def test_bce_symmetry(op, x, y):
    f = _loss(op)
    assert_close(f(jnp.asarray(x), y), f(-jnp.asarray(x), 1 - y), rtol=1e-5, atol=1e-5)


@ops.parametrize()
@given(x=logits_st, y=labels_st)
def test_nonnegative_for_one_hot_targets(op, x, y):
    x = jnp.asarray(x)
    assert np.all(np.asarray(_loss(op)(x, op.hard(y, C))) >= 0)


@ops.parametrize("softmax")
@given(x=logits_st, y=labels_st, p=probs_st, a=smooth_st)
def test_gradient_rows_sum_to_zero_for_normalised_targets(op, x, y, p, a):
    x = jnp.asarray(x)
    t = y if op.has("integer_labels") else _normalise(p)
    g = _grad(op, a)(x, t)
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-5)


@ops.parametrize("softmax")
@given(v=st.floats(-1e3, 1e3, width=32), y=labels_st)
def test_uniform_logits_give_log_c(op, v, y):
    x = jnp.full((N, C), v, jnp.float32)
    np.testing.assert_allclose(_loss(op)(x, op.hard(y, C)), np.log(C), rtol=1e-5)


@ops.parametrize()
@given(x=logits_st, y=labels_st, p=probs_st, dropped=mask_st)
def test_mean_is_sum_over_scored_count(op, x, y, p, dropped):
    # Without class weights the mean divides the sum by the number of scored
    # examples (ignored ones left out): of elements for BCE.
    x = jnp.asarray(x)
    t = jnp.asarray(y) if op.has("integer_labels") else _normalise(p)
    count = N * C if op.has("elementwise") else N
    ignore = op.has("ignore_index")
    if ignore:
        t = jnp.where(dropped, IGNORE, t)
        count = int(np.sum(~dropped))
    total = _loss(op, "sum", ignore=ignore)(x, t)
    mean = _loss(op, "mean", ignore=ignore)(x, t)
    expected = total / count if count else 0.0
    assert_close(mean, expected, rtol=1e-5, atol=1e-6)


def _check_dropping_equals_slicing(op, x, t, dropped, **drop):
    kept = ~dropped
    ignore = "ignore_index" in drop
    for reduction in ("sum", "mean"):
        f = _loss(op, reduction, ignore=ignore)
        out = f(x, t, where=drop.get("where"))
        # The kept rows alone (padded to N rows, the padding left out of the
        # sum: the shapes stay fixed).
        rows = np.concatenate([np.flatnonzero(kept), np.zeros(N, int)])[:N]
        n_kept = int(kept.sum())
        per = _loss(op, ignore=ignore)(x[rows], t[rows])[:n_kept]
        if reduction == "sum":
            expected = jnp.sum(per)
        else:
            expected = jnp.mean(per) if n_kept else 0.0
        assert_close(out, expected, rtol=1e-5, atol=1e-6)


@ops.parametrize("ignore_index")
@given(x=logits_st, y=labels_st, dropped=mask_st)
def test_ignore_index_equals_slicing(op, x, y, dropped):
    x, y = jnp.asarray(x), jnp.asarray(y)
    t = jnp.where(dropped, IGNORE, y)
    _check_dropping_equals_slicing(op, x, t, dropped, ignore_index=IGNORE)


@ops.parametrize("where")
@given(x=logits_st, y=labels_st, p=probs_st, dropped=mask_st)
def test_per_example_where_equals_slicing(op, x, y, p, dropped):
    x = jnp.asarray(x)
    t = jnp.asarray(y) if op.has("integer_labels") else _normalise(p)
    _check_dropping_equals_slicing(op, x, t, dropped, where=jnp.asarray(~dropped))


@EVERY_CASE
@ops.parametrize()
def test_jit_equals_eager(op):
    # With every option, eager (op by op) as jitted (the jitted program is
    # test_numerics's when they run together; eager VJPs: the eager
    # Hessian-vector products of test_gradients).
    x = logits((6, 16))
    y = op.labels((6,), 16)
    kw = op.every_option(16)
    ct = cotangent_like(jnp.zeros(op.out_shape(x.shape)))
    out, _ = ops.value_and_vjp(op, x, y, ct, **kw)
    assert_close(op(x, y, **kw), out)
