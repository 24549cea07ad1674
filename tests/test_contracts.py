"""Contracts and bad input: shapes, dtypes, option values, out-of-range labels."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from core_helpers import IMPLS, assert_close, cotangent_like, int_labels, logits
from jax.experimental import checkify

import xent_jax as xj

N, C = 6, 5
INT = xj.softmax_cross_entropy_with_integer_labels
SOFT = xj.softmax_cross_entropy
BCE = xj.sigmoid_binary_cross_entropy


def _shape_re(shape):
    """Matches a shape written as a tuple (6, 1) or a list [6, 1]."""
    inner = r",\s*".join(str(s) for s in shape)
    if len(shape) == 1:
        inner += ",?"
    return rf"[\(\[]{inner}[\)\]]"


def _raises_naming(exc, arg, *shapes):
    pattern = "".join(rf"(?=[\s\S]*{_shape_re(s)})" for s in shapes)
    return pytest.raises(exc, match=rf"(?s)(?=.*\b{arg}\b){pattern}")


# --- shapes -------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_shape", [(N, 1), (N + 1,), (1,), (N, C), (1, N)], ids=str)
def test_integer_labels_wrong_shape(impl, bad_shape):
    x = logits((N, C))
    y = jnp.zeros(bad_shape, jnp.int32)
    with _raises_naming(ValueError, "labels", (N,), bad_shape):
        INT(x, y, implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_labels_wrong_shape_with_axis(impl):
    x = logits((2, C, 3))
    y = jnp.zeros((2, C), jnp.int32)  # class axis is 1: expected (2, 3)
    with _raises_naming(ValueError, "labels", (2, 3), (2, C)):
        INT(x, y, axis=1, implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_shape", [(N, C - 1), (N,), (1, C), (N, C, 1)], ids=str)
def test_soft_labels_wrong_shape(impl, bad_shape):
    x = logits((N, C))
    with _raises_naming(ValueError, "labels", (N, C), bad_shape):
        SOFT(x, jnp.zeros(bad_shape), implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_shape", [(N, 1), (C,), (N, C + 1)], ids=str)
def test_bce_labels_wrong_shape(impl, bad_shape):
    x = logits((N, C))
    with _raises_naming(ValueError, "labels", (N, C), bad_shape):
        BCE(x, jnp.zeros(bad_shape), implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_shape", [(C + 1,), (1, C), (N, C)], ids=str)
def test_class_weights_wrong_shape(impl, bad_shape):
    x, y = logits((N, C)), int_labels((N,), C)
    with _raises_naming(ValueError, "class_weights", (C,), bad_shape):
        INT(x, y, class_weights=jnp.ones(bad_shape), implementation=impl)
    with _raises_naming(ValueError, "class_weights", (C,), bad_shape):
        SOFT(
            x,
            jnp.ones((N, C)) / C,
            class_weights=jnp.ones(bad_shape),
            implementation=impl,
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_pos_weight_not_broadcastable(impl):
    x = logits((N, C))
    with pytest.raises(ValueError, match="pos_weight"):
        BCE(x, jnp.zeros((N, C)), pos_weight=jnp.ones((C + 2,)), implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_where_wrong_shape(impl):
    x, y = logits((N, C)), int_labels((N,), C)
    with pytest.raises(ValueError, match="where"):
        INT(x, y, where=jnp.ones((N + 1,), bool), implementation=impl)


def test_shape_errors_at_trace_time_under_jit():
    x = logits((N, C))
    with _raises_naming(ValueError, "labels", (N,), (N, 1)):
        jax.jit(INT)(x, jnp.zeros((N, 1), jnp.int32))


# --- dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_float_labels_for_integer_loss(impl, dtype):
    x = logits((N, C))
    with pytest.raises(TypeError, match="labels"):
        INT(x, jnp.zeros((N,), dtype), implementation=impl)
    with pytest.raises(TypeError, match="labels"):
        xj.softmax_focal_loss(x, jnp.zeros((N,), dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_logits_rejected(impl):
    xi = jnp.zeros((N, C), jnp.int32)
    with pytest.raises(TypeError, match="logits"):
        INT(xi, jnp.zeros((N,), jnp.int32), implementation=impl)
    with pytest.raises(TypeError, match="logits"):
        SOFT(xi, jnp.zeros((N, C)), implementation=impl)
    with pytest.raises(TypeError, match="logits"):
        BCE(xi, jnp.zeros((N, C)), implementation=impl)


# --- option values ------------------------------------------------------------


@pytest.mark.parametrize("fn", ["integer", "soft", "bce"])
def test_unknown_reduction_and_implementation(fn):
    x = logits((N, C))
    y = int_labels((N,), C) if fn == "integer" else jnp.ones((N, C)) / C
    f = {"integer": INT, "soft": SOFT, "bce": BCE}[fn]
    with pytest.raises(ValueError, match=r"(?s)reduction.*avg|avg.*reduction"):
        f(x, y, reduction="avg")
    with pytest.raises(
        ValueError, match=r"(?s)implementation.*triton|triton.*implementation"
    ):
        f(x, y, implementation="triton")


def test_unknown_reduction_focal():
    with pytest.raises(ValueError, match="reduction"):
        xj.softmax_focal_loss(logits((N, C)), int_labels((N,), C), reduction="avg")


# --- out-of-range integer labels ----------------------------------------------


BAD_LABELS = [
    (C, None),
    (C + 7, None),
    (2**31 - 1, None),
    (-1, None),
    (-100, None),
    (-1, -100),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad, ignore_index", BAD_LABELS, ids=str)
def test_out_of_range_concrete_raises(impl, bad, ignore_index):
    x = logits((2, 4, C))
    y = np.array(int_labels((2, 4), C))
    y[1, 2] = bad
    y[1, 3] = bad  # the first bad position is (1, 2)
    with pytest.raises(ValueError) as info:
        INT(x, jnp.asarray(y), ignore_index=ignore_index, implementation=impl)
    msg = str(info.value)
    assert re.search(rf"(?<![\d-]){bad}(?!\d)", msg), msg
    assert re.search(r"[\(\[]1,\s*2[\)\]]", msg), msg


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_is_not_out_of_range(impl):
    x, y = logits((N, C)), int_labels((N,), C).at[2].set(-100)
    out = INT(x, y, ignore_index=-100, implementation=impl)
    assert out[2] == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [C, -1, -100, 2**31 - 1], ids=str)
def test_out_of_range_under_jit_nan_and_no_gradient_leak(impl, bad):
    x = logits((N, C))
    y = int_labels((N,), C).at[3].set(bad)
    kw = dict(label_smoothing=0.1, class_weights=jnp.linspace(0.5, 2.0, C), z_loss=0.01)

    def f(v, lab):
        return INT(v, lab, ignore_index=-7, implementation=impl, **kw)

    ct = cotangent_like(jnp.zeros((N,)))
    out, vjp = jax.jit(lambda v, lab: jax.vjp(lambda a: f(a, lab), v))(x, y)
    (g,) = vjp(ct)
    assert np.isnan(out[3])
    others = np.arange(N) != 3
    good = jnp.where(others, y, 0)
    out_r, vjp_r = jax.vjp(lambda a: ref.integer_xent(a, good, **kw), x)
    assert_close(out[others], out_r[others])
    g_r = vjp_r(jnp.where(others, ct, 0.0))[0]
    assert_close(g, g_r)
    np.testing.assert_array_equal(g[3], jnp.zeros(C))  # no leak into any class


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_checkify(impl):
    x = logits((N, C))
    y = int_labels((N,), C)
    f = jax.jit(lambda v, lab: INT(v, lab, implementation=impl))
    for wrapped in (checkify.checkify(f), jax.jit(checkify.checkify(f))):
        err, out = wrapped(x, y)
        err.throw()  # valid labels: no error
        assert err.get() is None
        err, out = wrapped(x, y.at[4].set(C + 3))
        assert err.get() is not None
        with pytest.raises(checkify.JaxRuntimeError, match="(?i)label"):
            err.throw()
        assert np.isnan(out[4]) and np.all(np.isfinite(np.delete(np.asarray(out), 4)))


def test_out_of_range_checkify_message_names_labels_and_range():
    y = int_labels((N,), C).at[4].set(C + 3)
    err, _ = checkify.checkify(jax.jit(INT))(logits((N, C)), y)
    with pytest.raises(checkify.JaxRuntimeError, match=rf"(?s)\blabels\b.*\b{C}\b"):
        err.throw()


def test_label_check_adds_no_effect():
    # An effect (checkify.debug_check's) would take every jitted call off jit's
    # C++ fast dispatch path, a fixed ~0.1 ms per call.
    step = jax.value_and_grad(lambda v, lab: INT(v, lab).mean())
    assert jax.make_jaxpr(step)(logits((N, C)), int_labels((N,), C)).effects == set()


def test_out_of_range_checkify_survives_remat():
    # Rematerialisation drops computations nothing uses: the check is on the
    # labels' data path, so it is kept.
    step = jax.jit(jax.grad(jax.checkpoint(lambda v, lab: INT(v, lab).mean())))
    x, y = logits((N, C)), int_labels((N,), C)
    err, _ = checkify.checkify(step)(x, y)
    assert err.get() is None
    err, _ = checkify.checkify(step)(x, y.at[2].set(-1))
    with pytest.raises(checkify.JaxRuntimeError, match="(?i)label"):
        err.throw()


def test_out_of_range_checkify_without_private_rules(monkeypatch):
    # Where jax's private checkify rule table is missing, the public
    # checkify.debug_check takes over: the same error, with an effect.
    from xent_jax import _compat

    monkeypatch.setattr(_compat, "CHECKIFY_RULES", False)
    step = jax.jit(lambda v, lab: INT(v, lab))
    x, y = logits((N, C)), int_labels((N,), C)
    assert jax.make_jaxpr(step)(x, y).effects != set()
    err, out = checkify.checkify(step)(x, y.at[2].set(C))
    assert np.isnan(out[2])
    with pytest.raises(checkify.JaxRuntimeError, match=rf"(?s)\blabels\b.*\b{C}\b"):
        err.throw()
