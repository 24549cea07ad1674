"""Numerics: dtypes, -inf masks, extreme logits, NaN isolation, residuals, memory.

Every check runs on each op x implementation of ``tests/ops.py`` that has the
capabilities it needs; the fused loss sees the logits as ``x`` with ``w = I``
(whole ``-inf`` classes in the bias), so it is held to the same numbers.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import ops
import optax
import pytest
from core_helpers import (
    assert_close,
    cotangent_like,
    float64,
    int_labels,
    logits,
    soft_labels,
)
from jax.ad_checkpoint import print_saved_residuals
from ops import IGNORE
from tiers import slow

import xent_jax as xj

N, C = 6, 16
LOW = [jnp.float16, jnp.bfloat16]


# Values and VJPs w.r.t. the logits, compiled once per op, options and shapes
# for all the tests: most checks share one program per op (_std's options).
value_vjp = ops.value_and_vjp


def _std(op):
    return op.every_option(C)


def _ct(op, shape):
    """A random cotangent for ``op``'s per-example losses on ``shape`` logits."""
    return cotangent_like(jnp.zeros(op.out_shape(shape)))


# --- dtypes -------------------------------------------------------------------


@ops.parametrize(composite=True)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_dtype_contract_and_accuracy(op, dtype):
    x = logits((N, C), dtype=dtype)
    y = op.labels((N,), C, dtype=dtype)  # float labels in the logits' dtype
    y32 = y.astype(jnp.float32) if op.has("label_grad") else y
    kw = _std(op)
    ct = _ct(op, x.shape)
    out, g = value_vjp(op, x, y, ct, **kw)
    # The quantised input, computed exactly in float32.
    out_r, g_r = value_vjp(op, x.astype(jnp.float32), y32, ct, ref=True, **kw)
    assert out.dtype == jnp.float32  # 16-bit losses come back in float32
    assert g.dtype == x.dtype  # gradient in the logits' dtype
    # Computed in float32: the loss is not on the 16-bit grid.
    assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    assert_close(g, g_r, dtype)


@ops.parametrize("float64")
def test_float64(op):
    with float64():
        x = logits((N, C), dtype=jnp.float64)
        y = op.labels((N,), C, dtype=jnp.float64)
        kw = op.options(label_smoothing=0.1)
        out, g = value_vjp(op, x, y, reduction="mean", **kw)
        out_r, g_r = value_vjp(op, x, y, reduction="mean", ref=True, **kw)
        assert out.dtype == jnp.float64 and g.dtype == jnp.float64
        assert jax.eval_shape(op, x, y).dtype == jnp.float64
        assert_close(out, out_r, jnp.float64)
        assert_close(g, g_r, jnp.float64)


@ops.parametrize("softmax")
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_loss_not_quantised(op, dtype):
    # A loss around 36 sits on a 0.25-wide bfloat16 grid; ours must not.
    x = jnp.zeros((1, 8), dtype).at[0, 0].set(36.0)
    out = op(x, op.hard(jnp.array([3]), 8))
    expected = float(jax.nn.logsumexp(x.astype(jnp.float32)[0]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


@ops.parametrize("integer_labels")
@pytest.mark.parametrize("dtype", [jnp.float16, slow(jnp.bfloat16), slow(jnp.float32)])
def test_labels_above_2048(op, dtype):
    # Integer labels are never cast to the logits' dtype.
    args = op.random_inputs(2, 3000, dtype, d=8) | dict(labels=jnp.array([2049, 2999]))
    out = jax.jit(op.raw)(args)
    args32 = {k: v.astype(jnp.float32) if k != "labels" else v for k, v in args.items()}
    expected = ops.jitted_ref(op.kind)(args32)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- -inf logits: partly / mostly / fully masked rows x used / ignored --------


def _neg_inf_grid():
    """Rows: normal, partly, mostly (only the label is finite) and fully -inf;
    each used and ignored (label -100)."""
    x = np.array(logits((8, C)))
    y = np.array(int_labels((8,), C))
    y[:] = [3, 3, 5, 5, 7, 7, 0, 0]
    x[2:4, 0] = -np.inf  # partly
    x[4:6, :] = -np.inf  # mostly
    x[4:6, 7] = 1.5
    x[4:6, 2] = 0.5
    x[6:8, :] = -np.inf  # fully
    y[[1, 3, 5, 7]] = -100
    finite_rows = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)  # row 6: used, all -inf
    return jnp.asarray(x), jnp.asarray(y), finite_rows


@ops.parametrize("ignore_index", "row_neg_inf")
@pytest.mark.parametrize("transform", [slow("eager"), "jit", slow("vmap")])
def test_neg_inf_grid_integer(op, transform):
    x, y, ok = _neg_inf_grid()
    # Drop the unspecified case (used row of all -inf) from the batch.
    x, y = x[ok], y[ok]
    kw = dict(ignore_index=-100, class_weights=jnp.linspace(0.5, 2.0, C), z_loss=0.01)

    def f(v, lab):
        return op(v, lab, **kw)

    if transform == "jit":
        f = jax.jit(f)
    elif transform == "vmap":
        f0 = f
        f = jax.vmap(lambda v, lab: f0(v[None], lab[None])[0])
    ct = cotangent_like(jnp.zeros(y.shape))
    out, vjp = jax.vjp(lambda v: f(v, y), x)
    (g,) = vjp(ct)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g)), (out, g)
    out_r, g_r = value_vjp(op, x, y, ct, ref=True, **kw)
    assert_close(out, out_r)
    assert_close(g, g_r)
    assert np.all(np.asarray(g)[np.asarray(y) == -100] == 0)
    # Mean over used rows, gradient too.
    mean, gm = value_vjp(op, x, y, reduction="mean", **kw)
    assert np.isfinite(mean) and np.all(np.isfinite(gm))


@ops.parametrize("where")
@pytest.mark.parametrize("smoothing", [slow(0.0), 0.1])
@pytest.mark.slow
def test_neg_inf_grid_with_where_mask(op, smoothing):
    # -inf logits excluded by `where`: smoothing spreads over kept classes only,
    # and the fully masked row (all -inf, nothing kept) gives loss 0, grad 0.
    # Soft labels with no mass on -inf classes need no mask (rows 0-5).
    x, y, _ = _neg_inf_grid()
    keep = jnp.isfinite(x)
    kw = dict(label_smoothing=smoothing, **op.options(ignore_index=-100))
    masks = [(keep, slice(None))]
    if op.has("soft_labels"):
        t = jnp.where(keep, soft_labels((8, C)), 0.0)
        y = t / jnp.maximum(t.sum(-1, keepdims=True), 1e-30)
        if smoothing == 0:
            masks.append((None, slice(0, 6)))
    wrt_labels = op.has("label_grad")
    for where, rows in masks:
        xr, yr = x[rows], y[rows]
        ct = cotangent_like(jnp.zeros(yr.shape[:1]))
        kwr = kw | dict(where=where, wrt_labels=wrt_labels)
        out, grads = value_vjp(op, xr, yr, ct, **kwr)
        out_r, grads_r = value_vjp(op, xr, yr, ct, ref=True, **kwr)
        g, g_r = (grads[0], grads_r[0]) if wrt_labels else (grads, grads_r)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))
        assert_close(out, out_r)
        assert_close(g, g_r)
        if wrt_labels:
            # The labels' gradient at a -inf logit no mask drops is not
            # compared: lse - x_c = inf for "xla", 0 for the references.
            kept = jnp.isfinite(xr) | (where is not None)
            assert np.all(np.isfinite(grads[1][kept]))
            assert_close(grads[1][kept], grads_r[1][kept])
        if where is not None:
            assert out[6] == 0 and np.all(np.asarray(g)[6] == 0)


@ops.parametrize("softmax")
def test_neg_inf_masked_classes(op):
    # Classes that are -inf in every row (a masked vocabulary; the fused
    # loss's bias): finite losses and gradients, none on the masked classes.
    x = logits((N, C)).at[:, jnp.array([2, 7, 8])].set(-jnp.inf)
    y = jnp.array([0, 3, 5, 9, 15, 1])
    if op.has("soft_labels"):
        y = jnp.where(jnp.isfinite(x), soft_labels((N, C)), 0.0)
    else:
        y = op.hard(y, C)
    kw = op.options(class_weights=jnp.linspace(0.5, 2.0, C), z_loss=0.01)
    if op.has("ignore_index"):
        y, kw = y.at[4].set(IGNORE), kw | dict(ignore_index=IGNORE)
    ct = _ct(op, x.shape)
    out, g = value_vjp(op, x, y, ct, **kw)
    out_r, g_r = value_vjp(op, x, y, ct, ref=True, **kw)
    mean, gm = value_vjp(op, x, y, reduction="mean", **kw)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g)), (out, g)
    assert_close(out, out_r)
    assert_close(g, g_r)
    assert np.all(np.asarray(g)[:, [2, 7, 8]] == 0)
    assert np.isfinite(mean) and np.all(np.isfinite(gm))
    assert np.all(np.asarray(gm)[:, [2, 7, 8]] == 0)


@ops.parametrize()
@pytest.mark.parametrize("dtype", [jnp.float32, slow(jnp.bfloat16)])
def test_extreme_logits(op, dtype):
    x = np.array(logits((N, C)))
    x[0, :] = 0.0
    x[0, 1] = 1e4  # target far below the max
    x[1, :] = -1e4
    x[1, 3] = 1e4
    x[2, :] = 1e4 * np.sign(x[2])
    x[3, 5] = -1e4
    x[4] = np.round(x[4] * 8) / 8 + 2.0**20  # a large common offset
    x = jnp.asarray(x, dtype)
    y = op.hard(jnp.array([0, 3, 4, 5, 1, 2]), C)
    if op.has("elementwise"):
        y = jnp.full(x.shape, 0.3)
    ct = _ct(op, x.shape)
    for kw in (dict(), _std(op)):
        out, g = value_vjp(op, x, y, ct, **kw)
        # The same input in float32 (the reference's shifted coordinates too).
        out_r, g_r = value_vjp(op, x.astype(jnp.float32), y, ct, ref=True, **kw)
        assert np.all(np.isfinite(out)) and np.all(
            np.isfinite(np.asarray(g, np.float32))
        )
        assert_close(out, out_r, rtol=1e-5, atol=1e-3)
        assert_close(g, g_r, dtype)


@ops.parametrize(pallas=True)
def test_nan_logit_poisons_only_its_example(op):
    # A NaN in a scored row makes that row's loss NaN (for the fused loss
    # the whole row of logits: NaN * 0 is NaN), and only that example's.
    x = logits((N, C)).at[2, 4].set(jnp.nan)
    y = op.labels((N,), C)
    kw = _std(op)
    ct = _ct(op, x.shape)
    out, g = value_vjp(op, x, y, ct, **kw)
    out_r, g_r = value_vjp(op, x, y, ct, ref=True, **kw)
    poisoned = np.zeros(out.shape, bool)
    poisoned[(2, 4) if op.has("elementwise") else 2] = True
    np.testing.assert_array_equal(np.isnan(out), poisoned)
    others = ~poisoned
    assert_close(out[others], out_r[others])
    assert_close(np.asarray(g)[others], np.asarray(g_r)[others])


def _unscored_rows(op, **mask):
    """Rows 1, 3, 4 are not scored (``mask``: how) and hold NaN, +inf and
    -inf: loss 0 and exactly zero gradient there, the others as the
    reference."""
    x = logits((N, C)).at[1, 3].set(jnp.nan).at[3, 0].set(jnp.inf)
    x = x.at[4].set(-jnp.inf)
    y = op.labels((N,), C)
    kw = _std(op) | mask
    if "ignore_index" in mask:
        y = y.at[jnp.array([1, 3, 4])].set(mask["ignore_index"])
    ct = _ct(op, x.shape)
    out, g = value_vjp(op, x, y, ct, **kw)
    out_r, g_r = value_vjp(op, x, y, ct, ref=True, **kw)
    mean, gm = value_vjp(op, x, y, reduction="mean", **kw)
    mean_r, gm_r = value_vjp(op, x, y, reduction="mean", ref=True, **kw)
    unscored = np.isin(np.arange(N), [1, 3, 4])
    assert np.all(np.asarray(out)[unscored] == 0)
    assert np.all(np.asarray(g)[unscored] == 0)
    assert np.all(np.asarray(gm)[unscored] == 0)
    assert_close(out, out_r)
    assert_close(g, g_r)
    assert_close(mean, mean_r)
    assert_close(gm, gm_r)


@ops.parametrize("ignore_index", pallas=True)
def test_ignored_rows_get_exact_zero_gradient(op):
    _unscored_rows(op, ignore_index=IGNORE)


@ops.parametrize("where", fast=("soft-reference", "integer-reference"))
def test_rows_masked_by_where_get_exact_zero_gradient(op):
    _unscored_rows(op, where=~np.isin(np.arange(N), [1, 3, 4]))


@ops.parametrize("elementwise", fast=("bce-reference",))
def test_bce_extreme_grid(op):
    xs = jnp.array([-jnp.inf, -1e4, -120.0, -30.0, 0.0, 30.0, 120.0, 1e4, jnp.inf])
    ys = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
    x = jnp.repeat(xs[:, None], 5, axis=1)
    y = jnp.repeat(ys[None, :], 9, axis=0)
    out = op(x, y)
    assert not np.any(np.isnan(out))
    finite_x = np.isfinite(np.asarray(x))
    assert np.all(np.isfinite(np.asarray(out)[finite_x]))
    assert out[0, 0] == 0 and out[-1, -1] == 0  # confident and right
    g = jax.grad(lambda v: op(v, y[1:-1]).sum())(x[1:-1])
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[3], 0.5 - ys, atol=1e-6)  # x = 0: sigmoid(0) - y
    # pos_weight = 1 changes nothing, even at extreme logits.
    out1 = op(x[1:-1], y[1:-1], pos_weight=jnp.ones(5))
    np.testing.assert_array_equal(out1, out[1:-1])


# --- residuals and compiled memory --------------------------------------------

_RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\]\s+(.*)$")


def _computed_residuals(f, x, capsys):
    """Residual shapes that are computed by the forward rule (not inputs)."""
    capsys.readouterr()
    print_saved_residuals(f, x)
    lines = capsys.readouterr().out.strip().splitlines()
    out = []
    for line in lines:
        m = _RESIDUAL.match(line.strip())
        assert m, line
        shape = tuple(int(s) for s in m.group(2).split(",") if s)
        if "from the argument" in m.group(3) or "from a constant" in m.group(3):
            continue
        out.append(shape)
    return lines, out


# The kernels with their own VJP (not plain autodiff).
@ops.parametrize(exclude=("forward_mode",))
@pytest.mark.parametrize("options", ["plain", "all"])
def test_forward_saves_at_most_one_logits_sized_residual(op, options, capsys):
    n, c = 8, 32
    x = logits((n, c))
    y = op.labels((n,), c)
    keep = jnp.broadcast_to(jnp.arange(c) < 30, (n, c))  # an input, not a residual
    kw = op.options(ignore_index=-100)
    if op.has("ignore_index"):
        y = y.at[0].set(-100)
    if options == "all":
        kw.update(
            op.options(
                where=keep,
                label_smoothing=0.1,
                class_weights=jnp.linspace(0.5, 1.5, c),
                z_loss=1e-3,
                pos_weight=jnp.ones(c),
            ),
            reduction="mean",
        )
    args = op.inputs(x, y)  # the fused loss's w = I and bias: constants

    def f(v):
        return op.raw(args | {op.logits_arg: v}, **kw)

    lines, shapes = _computed_residuals(f, x, capsys)
    big = [s for s in shapes if int(np.prod(s)) >= n * c]
    assert len(big) <= 1, lines
    # Everything else is per-example (or per-class) sized.
    assert all(int(np.prod(s)) <= max(n, c) for s in shapes if s not in big), lines


def _temp_bytes(loss_fn, n=256, d=64, c=2048, dtype=jnp.float32):
    h = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((d, c), dtype)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def f(h, w, y):
        return jax.value_and_grad(
            lambda h, w: loss_fn(h @ w, y).mean(), argnums=(0, 1)
        )(h, w)

    compiled = jax.jit(f).lower(h, w, y).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("memory_analysis() unavailable on this backend")
    return mem.temp_size_in_bytes, n * c * jnp.dtype(dtype).itemsize


def test_compiled_temp_memory_one_logits_buffer():
    ours, logits_bytes = _temp_bytes(xj.softmax_cross_entropy_with_integer_labels)
    theirs, _ = _temp_bytes(optax.losses.softmax_cross_entropy_with_integer_labels)
    assert ours <= 1.1 * logits_bytes, (ours, logits_bytes)
    assert theirs >= 1.5 * logits_bytes, (theirs, logits_bytes)  # optax needs two
    assert ours < theirs


def _shifted_logsumexp(x, y):
    del y
    x = x.astype(jnp.float32)
    shift = jax.lax.stop_gradient(x.max(axis=-1, keepdims=True))
    return (shift + jnp.log(jnp.exp(x - shift).sum(axis=-1, keepdims=True)))[:, 0]


def test_compiled_temp_memory_bfloat16_adds_no_buffer():
    # What the backend keeps around a float32 reduction over bfloat16 logits is
    # its own choice (XLA CPU up to jax 0.12.0 computes bfloat16 matmuls in
    # float32; from jax 0.12.1 its YNNPACK reductions take a materialised float32
    # operand). Every softmax loss pays it for the log-sum-exp, so the floor is a
    # bare shifted log-sum-exp of the logits: scoring the label, the custom VJP
    # and the bfloat16 gradient must add no buffer to it.
    dtype = jnp.bfloat16
    ours, logits_bytes = _temp_bytes(
        xj.softmax_cross_entropy_with_integer_labels, dtype=dtype
    )
    theirs, _ = _temp_bytes(
        optax.losses.softmax_cross_entropy_with_integer_labels, dtype=dtype
    )
    floor, _ = _temp_bytes(_shifted_logsumexp, dtype=dtype)
    assert ours <= floor + 0.05 * logits_bytes, (ours, floor, logits_bytes)
    assert ours < theirs, (ours, theirs)


def test_residual_inspection_detects_extra_residuals(capsys):
    # The same inspection on plain autodiff (implementation="reference") sees
    # more than one logits-sized residual, so the check above can fail.
    n, c = 8, 32
    x, y = logits((n, c)), int_labels((n,), c)

    def f(v):
        return xj.softmax_cross_entropy_with_integer_labels(
            v, y, label_smoothing=0.1, z_loss=1e-3, implementation="reference"
        )

    lines, shapes = _computed_residuals(f, x, capsys)
    assert len([s for s in shapes if int(np.prod(s)) >= n * c]) >= 2, lines


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_donated_logits_hold_the_gradient(dtype):
    # value_and_grad with the logits donated (an intermediate of a training
    # step): xent computes the gradient in their buffer, so it needs no other
    # logits-sized buffer, which on a CPU is a new page fault per 4 KiB per
    # call (docs/performance.md). optax needs one: the check can fail.
    n, c = 256, 2048
    logits_bytes = n * c * jnp.dtype(dtype).itemsize

    def memory(loss_fn):
        x = jax.ShapeDtypeStruct((n, c), dtype)
        y = jax.ShapeDtypeStruct((n,), jnp.int32)
        step = jax.value_and_grad(lambda x, y: loss_fn(x, y).mean())
        compiled = jax.jit(step, donate_argnums=0).lower(x, y).compile()
        mem = compiled.memory_analysis()
        if mem is None:
            pytest.skip("memory_analysis() unavailable on this backend")
        return mem

    ours = memory(xj.softmax_cross_entropy_with_integer_labels)
    theirs = memory(optax.losses.softmax_cross_entropy_with_integer_labels)
    # XLA CPU reduces 16-bit logits through a float32 copy (see the bfloat16
    # test above): a temporary of any loss on them, not xent's own.
    floor = 0 if jnp.dtype(dtype).itemsize >= 4 else 4 * n * c
    assert ours.alias_size_in_bytes == logits_bytes, ours
    assert ours.temp_size_in_bytes <= floor + 0.05 * logits_bytes, (ours, floor)
    assert theirs.temp_size_in_bytes >= floor + logits_bytes, (theirs, floor)
