"""Contracts and bad input: shapes, dtypes, option values, out-of-range labels.

Every check runs on each op x implementation of ``tests/ops.py`` that has the
capabilities it needs (``ops.parametrize``); the ids name both
(``linear-pallas_tpu``). Errors raised while tracing cost no kernel run, so
the Pallas implementations get those checks too.
"""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import ops
import pytest
from core_helpers import assert_close, cotangent_like, int_labels, logits
from jax import export
from jax.experimental import checkify
from ops import IGNORE
from tiers import EVERY_CASE

import xent_jax as xj
from xent_jax import _registry

N, C = 6, 5


def _shape_re(shape):
    """Matches a shape written as a tuple (6, 1) or a list [6, 1]."""
    inner = r",\s*".join(str(s) for s in shape)
    if len(shape) == 1:
        inner += ",?"
    return rf"[\(\[]{inner}[\)\]]"


def _raises_naming(exc, arg, *shapes):
    pattern = "".join(rf"(?=[\s\S]*{_shape_re(s)})" for s in shapes)
    return pytest.raises(exc, match=rf"(?s)(?=.*\b{arg}\b){pattern}")


# --- the registry -------------------------------------------------------------


def test_registry_covers_every_implementation():
    # A new implementation must declare its capabilities in tests/ops.py.
    for kind, spec in ops._KINDS.items():
        names = _registry.names(spec["registry"])
        assert {"xla", "reference"} <= set(names)
        assert {op.impl for op in ops.OPS if op.kind == kind} == set(names)
        assert set(names) <= set(ops._IMPLS), set(names) - set(ops._IMPLS)
    for op in ops.OPS:
        assert op.caps <= set(ops.CAPABILITIES), op.caps - set(ops.CAPABILITIES)
        assert sum(op.has(c) for c in ("softmax", "elementwise")) == 1, op
        assert set(op.diff) <= set(op.example(2, 3)[0]), op


# --- shapes -------------------------------------------------------------------

# Wrong label shapes, by kind of labels (expected: N for class ids, (N, C) else).
BAD_LABEL_SHAPES = {
    "integer_labels": [(N, 1), (N + 1,), (1,), (N, C), (1, N)],
    "soft_labels": [(N, C - 1), (N,), (1, C), (N, C, 1)],
    "elementwise": [(N, 1), (C,), (N, C + 1)],
}


def _label_kind(op):
    (kind,) = [k for k in BAD_LABEL_SHAPES if op.has(k)]
    return kind


def _bad_label_cases():
    for op in ops.select(pallas=True, composite=True):
        for shape in BAD_LABEL_SHAPES[_label_kind(op)]:
            yield pytest.param(op, shape, id=f"{op.id}-{shape}")


@EVERY_CASE
@pytest.mark.parametrize("op, bad_shape", list(_bad_label_cases()))
def test_labels_wrong_shape(op, bad_shape):
    x = logits((N, C))
    good = op.labels((N,), C)
    with _raises_naming(ValueError, "labels", good.shape, bad_shape):
        op(x, jnp.zeros(bad_shape, good.dtype))


@ops.parametrize("integer_labels", "axis", composite=True)
def test_integer_labels_wrong_shape_with_axis(op):
    x = logits((2, C, 3))
    y = jnp.zeros((2, C), jnp.int32)  # class axis is 1: expected (2, 3)
    with _raises_naming(ValueError, "labels", (2, 3), (2, C)):
        op(x, y, axis=1)


@EVERY_CASE
@ops.parametrize("class_weights", pallas=True, composite=True)
@pytest.mark.parametrize("bad_shape", [(C + 1,), (1, C), (N, C)], ids=str)
def test_class_weights_wrong_shape(op, bad_shape):
    x, y = logits((N, C)), op.labels((N,), C)
    with _raises_naming(ValueError, "class_weights", (C,), bad_shape):
        op(x, y, class_weights=jnp.ones(bad_shape))


@ops.parametrize("pos_weight", composite=True)
def test_pos_weight_not_broadcastable(op):
    x, y = logits((N, C)), op.labels((N,), C)
    with pytest.raises(ValueError, match="pos_weight"):
        op(x, y, pos_weight=jnp.ones((C + 2,)))


@ops.parametrize("where", composite=True)
def test_where_wrong_shape(op):
    x, y = logits((N, C)), op.labels((N,), C)
    with pytest.raises(ValueError, match="where"):
        op(x, y, where=jnp.ones((N + 1,), bool))


@EVERY_CASE
@ops.parametrize(pallas=True, composite=True)
def test_shape_errors_at_trace_time_under_jit(op):
    x = logits((N, C))
    good = op.labels((N,), C)
    bad = BAD_LABEL_SHAPES[_label_kind(op)][0]
    with _raises_naming(ValueError, "labels", good.shape, bad):
        jax.jit(lambda v, lab: op(v, lab))(x, jnp.zeros(bad, good.dtype))


def _contract_violations(op):
    """(what, arrays) pairs: the op's arguments with one contract broken."""
    args = op.inputs(logits((N, C)), op.labels((N,), C))
    bad_labels = BAD_LABEL_SHAPES[_label_kind(op)][0]
    yield "labels shape", dict(args, labels=jnp.zeros(bad_labels, args["labels"].dtype))
    first = next(n for n in ("logits", "x") if n in args)
    yield f"{first} dtype", dict(args, **{first: args[first].astype(jnp.int32)})
    if op.kind == "linear":
        yield "w rank", dict(args, w=args["w"][None])
        yield "x last axis", dict(args, x=jnp.pad(args["x"], ((0, 0), (0, 1))))
    if op.has("where"):
        yield "where shape", dict(args, where=jnp.ones((N + 1,), bool))
    if op.has("class_weights"):
        yield "class_weights shape", dict(args, class_weights=jnp.ones((C + 1,)))


def _error(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


@EVERY_CASE
@ops.parametrize(pallas=True, composite=True)
@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_contracts_fire_the_same_when_lowered_for_each_platform(op, platform):
    # chex checks shapes and dtypes while tracing: lowering for a TPU or a GPU
    # this host does not have raises what an eager call on CPU raises.
    lower = export.export(jax.jit(op.raw), platforms=[platform])
    for what, arrays in _contract_violations(op):
        specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
        eager = _error(lambda a=arrays: op.raw(a))
        # where's shape has two valid forms: no single chex assertion.
        assert eager[1].startswith("[Chex]") or what == "where shape", eager
        assert eager == _error(lambda s=specs: lower(s)), what


@ops.parametrize(composite=True, fast=("integer-xla",))
def test_contracts_hold_with_chex_asserts_disabled(op):
    # chex.disable_asserts() switches off the user's own assertions; a loss
    # with labels of the wrong shape would otherwise broadcast them silently.
    what, arrays = next(_contract_violations(op))
    chex.disable_asserts()
    try:
        with pytest.raises(ValueError, match="labels"):
            op.raw(arrays)
        chex.assert_rank(jnp.zeros(()), 1)  # still disabled for the user
    finally:
        chex.enable_asserts()


# --- output shapes and dtypes -------------------------------------------------


@EVERY_CASE
@ops.parametrize(pallas=True, composite=True)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_output_shape_and_dtype_for_every_reduction(op, dtype):
    # 16-bit inputs give float32 losses; a reduction gives a scalar. (Shapes
    # and dtypes are static: traced, not run.)
    x = logits((2, 3, C), dtype=dtype)
    y = op.labels((2, 3), C, dtype=dtype)
    out = jax.eval_shape(lambda v: {r: op(v, y, reduction=r) for r in op.reductions}, x)
    assert set(out) == set(op.reductions) >= {"none", "sum", "mean"}
    for r, value in out.items():
        assert value.shape == op.out_shape(x.shape, r), (r, value.shape)
        assert value.dtype == jnp.float32, (r, value.dtype)


# --- dtypes -------------------------------------------------------------------


@EVERY_CASE
@ops.parametrize("integer_labels", pallas=True, composite=True)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_float_labels_for_integer_loss(op, dtype):
    x = logits((N, C))
    with pytest.raises(TypeError, match="labels"):
        op(x, jnp.zeros((N,), dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_float_labels_for_focal_loss(dtype):
    with pytest.raises(TypeError, match="labels"):
        xj.softmax_focal_loss(logits((N, C)), jnp.zeros((N,), dtype))


@EVERY_CASE
@ops.parametrize(pallas=True, composite=True)
def test_integer_floating_inputs_rejected(op):
    # logits (the fused loss: x, w and bias) must be floating.
    args = op.inputs(logits((N, C)), op.labels((N,), C))
    names = [n for n in ("logits", "x", "w", "bias") if n in args]
    assert names
    for name in names:
        bad = dict(args, **{name: jnp.zeros(args[name].shape, jnp.int32)})
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            op.raw(bad)


# --- option values ------------------------------------------------------------


@EVERY_CASE
@ops.parametrize(pallas=True, composite=True)
def test_unknown_reduction_and_implementation(op):
    x, y = logits((N, C)), op.labels((N,), C)
    with pytest.raises(ValueError, match=r"(?s)reduction.*avg|avg.*reduction"):
        op(x, y, reduction="avg")
    with pytest.raises(
        ValueError, match=r"(?s)implementation.*triton|triton.*implementation"
    ):
        dataclasses.replace(op, impl="triton")(x, y)


def test_unknown_reduction_focal():
    with pytest.raises(ValueError, match="reduction"):
        xj.softmax_focal_loss(logits((N, C)), int_labels((N,), C), reduction="avg")


@EVERY_CASE
@ops.parametrize(composite=True)
def test_static_options_accept_python_and_numpy_scalars(op):
    # Static options are Python numbers, numpy scalars or 0-d numpy arrays,
    # all the same option: the same program (array options: class 2 of
    # test_regressions_bad_input.py).
    x = logits((N, C))
    y = op.labels((N,), C)
    if op.has("ignore_index"):
        y = y.at[1].set(IGNORE)
    values = op.options(label_smoothing=0.25, z_loss=0.5, ignore_index=IGNORE)
    assert values

    def program(**kw):
        return str(jax.make_jaxpr(lambda v: op(v, y, **kw))(x))

    want = program(**values)
    assert program(**(values | dict(label_smoothing=0.5))) != want  # it is seen
    forms = [(np.float32, np.int32), (np.float64, np.int64), (np.array, np.array)]
    for real, integer in forms:
        kw = {
            k: (real if isinstance(v, float) else integer)(v) for k, v in values.items()
        }
        assert program(**kw) == want, kw


# --- out-of-range integer labels ----------------------------------------------


BAD_LABELS = [
    (C, None),
    (C + 7, None),
    (2**31 - 1, None),
    (-1, None),
    (-100, None),
    (-1, -100),
]


@EVERY_CASE
@ops.parametrize("integer_labels", pallas=True, composite=True)
@pytest.mark.parametrize("bad, ignore_index", BAD_LABELS, ids=str)
def test_out_of_range_concrete_raises(op, bad, ignore_index):
    x = logits((2, 4, C))
    y = np.array(int_labels((2, 4), C))
    y[1, 2] = bad
    y[1, 3] = bad  # the first bad position is (1, 2)
    with pytest.raises(ValueError) as info:
        op(x, jnp.asarray(y), ignore_index=ignore_index)
    msg = str(info.value)
    assert re.search(rf"(?<![\d-]){bad}(?!\d)", msg), msg
    assert re.search(r"[\(\[]1,\s*2[\)\]]", msg), msg


@ops.parametrize("ignore_index", composite=True)
def test_ignore_index_is_not_out_of_range(op):
    x, y = logits((N, C)), int_labels((N,), C).at[2].set(-100)
    out = op(x, y, ignore_index=-100)
    assert out[2] == 0


@ops.parametrize("integer_labels", composite=True)
@pytest.mark.parametrize("bad", [C, -1, -100, 2**31 - 1], ids=str)
def test_out_of_range_under_jit_nan_and_no_gradient_leak(op, bad):
    x = logits((N, C))
    y = int_labels((N,), C).at[3].set(bad)
    kw = dict(label_smoothing=0.1, class_weights=jnp.linspace(0.5, 2.0, C), z_loss=0.01)
    ct = cotangent_like(jnp.zeros((N,)))
    # Jitted, the labels an argument: one program for every bad value.
    out, g = ops.value_and_vjp(op, x, y, ct, ignore_index=-7, **kw)
    assert np.isnan(out[3])
    others = np.arange(N) != 3
    good = jnp.where(others, y, 0)
    out_r, g_r = ops.value_and_vjp(
        op, x, good, jnp.where(others, ct, 0.0), ref=True, **kw
    )
    assert_close(out[others], out_r[others])
    assert_close(g, g_r)
    np.testing.assert_array_equal(g[3], jnp.zeros(C))  # no leak into any class


@ops.parametrize("integer_labels", composite=True)
def test_out_of_range_checkify(op):
    x = logits((N, C))
    y = int_labels((N,), C)
    f = jax.jit(lambda v, lab: op(v, lab))
    for wrapped in (checkify.checkify(f), jax.jit(checkify.checkify(f))):
        err, out = wrapped(x, y)
        err.throw()  # valid labels: no error
        assert err.get() is None
        err, out = wrapped(x, y.at[4].set(C + 3))
        assert err.get() is not None
        with pytest.raises(checkify.JaxRuntimeError, match="(?i)label"):
            err.throw()
        assert np.isnan(out[4]) and np.all(np.isfinite(np.delete(np.asarray(out), 4)))


@ops.parametrize("integer_labels", composite=True)
def test_out_of_range_checkify_message_names_labels_and_range(op):
    y = int_labels((N,), C).at[4].set(C + 3)
    err, _ = checkify.checkify(jax.jit(lambda v, lab: op(v, lab)))(logits((N, C)), y)
    with pytest.raises(checkify.JaxRuntimeError, match=rf"(?s)\blabels\b.*\b{C}\b"):
        err.throw()


@ops.parametrize("integer_labels", composite=True)
def test_label_check_adds_no_effect(op):
    # An effect (checkify.debug_check's) would take every jitted call off jit's
    # C++ fast dispatch path, a fixed ~0.1 ms per call.
    step = jax.value_and_grad(lambda v, lab: op(v, lab).mean())
    assert jax.make_jaxpr(step)(logits((N, C)), int_labels((N,), C)).effects == set()


@ops.parametrize("integer_labels", composite=True)
def test_out_of_range_checkify_survives_remat(op):
    # Rematerialisation drops computations nothing uses: the check is on the
    # labels' data path, so it is kept.
    step = jax.jit(jax.grad(jax.checkpoint(lambda v, lab: op(v, lab).mean())))
    x, y = logits((N, C)), int_labels((N,), C)
    err, _ = checkify.checkify(step)(x, y)
    assert err.get() is None
    err, _ = checkify.checkify(step)(x, y.at[2].set(-1))
    with pytest.raises(checkify.JaxRuntimeError, match="(?i)label"):
        err.throw()


@ops.parametrize("integer_labels", composite=True)
def test_out_of_range_checkify_without_private_rules(op, monkeypatch):
    # Where jax's private checkify rule table is missing, the public
    # checkify.debug_check takes over: the same error, with an effect.
    from xent_jax import _compat

    monkeypatch.setattr(_compat, "CHECKIFY_RULES", False)
    step = jax.jit(lambda v, lab: op(v, lab))
    x, y = logits((N, C)), int_labels((N,), C)
    assert jax.make_jaxpr(step)(x, y).effects != set()
    err, out = checkify.checkify(step)(x, y.at[2].set(C))
    assert np.isnan(out[2])
    with pytest.raises(checkify.JaxRuntimeError, match=rf"(?s)\blabels\b.*\b{C}\b"):
        err.throw()
