"""Numerics: dtypes, -inf masks, extreme logits, NaN isolation, residuals, memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from core_helpers import (
    IMPLS,
    assert_close,
    cotangent_like,
    float64,
    int_labels,
    logits,
    soft_labels,
)
from jax.ad_checkpoint import print_saved_residuals

import xent_jax as xj

N, C = 6, 16
LOW = [jnp.float16, jnp.bfloat16]


# --- dtypes -------------------------------------------------------------------


def _dtype_inputs(dtype):
    x = logits((N, C), dtype=dtype)
    return x, int_labels((N,), C), soft_labels((N, C))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("kind", ["integer", "soft", "bce"])
def test_dtype_contract_and_accuracy(impl, dtype, kind):
    x, y, t = _dtype_inputs(dtype)
    x32 = x.astype(jnp.float32)  # the quantised input, computed exactly in f32
    kw = dict(implementation=impl)
    if kind == "integer":
        kw.update(label_smoothing=0.1, z_loss=0.01)

        def f(v):
            return xj.softmax_cross_entropy_with_integer_labels(v, y, **kw)

        def fr(v):
            return ref.integer_xent(v, y, label_smoothing=0.1, z_loss=0.01)
    elif kind == "soft":

        def f(v):
            return xj.softmax_cross_entropy(v, t.astype(dtype), **kw)

        def fr(v):
            return ref.soft_xent(v, t.astype(dtype).astype(jnp.float32))
    else:

        def f(v):
            return xj.sigmoid_binary_cross_entropy(v, t.astype(dtype), **kw)

        def fr(v):
            return ref.bce(v, t.astype(dtype).astype(jnp.float32))

    out, vjp = jax.vjp(f, x)
    assert out.dtype == jnp.float32  # 16-bit losses come back in float32
    out_r, vjp_r = jax.vjp(fr, x32)
    # Computed in float32: the loss is not on the 16-bit grid.
    assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    ct = cotangent_like(out)
    (g,) = vjp(ct)
    (g_r,) = vjp_r(ct)
    assert g.dtype == x.dtype  # gradient in the logits' dtype
    assert_close(g, g_r, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64(impl):
    with float64():
        x = logits((N, C), dtype=jnp.float64)
        y = int_labels((N,), C)
        out, g = jax.jit(
            jax.value_and_grad(
                lambda v: xj.softmax_cross_entropy_with_integer_labels(
                    v, y, reduction="mean", label_smoothing=0.1, implementation=impl
                )
            )
        )(x)
        out_r, g_r = jax.jit(
            jax.value_and_grad(
                lambda v: ref.integer_xent(v, y, label_smoothing=0.1).mean()
            )
        )(x)
        assert out.dtype == jnp.float64 and g.dtype == jnp.float64
        assert_close(out, out_r, jnp.float64)
        assert_close(g, g_r, jnp.float64)
        b = xj.sigmoid_binary_cross_entropy(
            x, jnp.full_like(x, 0.3), implementation=impl
        )
        assert b.dtype == jnp.float64


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_loss_not_quantised(impl, dtype):
    # A loss around 36 sits on a 0.25-wide bfloat16 grid; ours must not.
    x = jnp.zeros((1, 8), dtype).at[0, 0].set(36.0)
    out = xj.softmax_cross_entropy_with_integer_labels(
        x, jnp.array([3]), implementation=impl
    )
    expected = float(jax.nn.logsumexp(x.astype(jnp.float32)[0]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_labels_above_2048(impl, dtype):
    # Integer labels are never cast to the logits' dtype.
    x = logits((2, 3000), dtype=dtype)
    y = jnp.array([2049, 2999])
    out = xj.softmax_cross_entropy_with_integer_labels(x, y, implementation=impl)
    expected = ref.integer_xent(x.astype(jnp.float32), y)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _vjp_apply(f, x, ct):
    out, vjp = jax.vjp(f, x)
    return out, vjp(ct)


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", ["eager", "jit", "vmap"])
def test_neg_inf_grid_integer(impl, transform):
    x, y, ok = _neg_inf_grid()
    # Drop the unspecified case (used row of all -inf) from the batch.
    x, y = x[ok], y[ok]
    kw = dict(ignore_index=-100, class_weights=jnp.linspace(0.5, 2.0, C), z_loss=0.01)

    def f(v, lab):
        return xj.softmax_cross_entropy_with_integer_labels(
            v, lab, implementation=impl, **kw
        )

    if transform == "jit":
        f = jax.jit(f)
    elif transform == "vmap":
        f0 = f
        f = jax.vmap(lambda v, lab: f0(v[None], lab[None])[0])
    ct = cotangent_like(jnp.zeros(y.shape))
    out, vjp = jax.vjp(lambda v: f(v, y), x)
    (g,) = vjp(ct)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g)), (out, g)
    out_r, (g_r,) = jax.jit(
        lambda v: _vjp_apply(lambda a: ref.integer_xent(a, y, **kw), v, ct)
    )(x)
    assert_close(out, out_r)
    assert_close(g, g_r)
    assert np.all(np.asarray(g)[np.asarray(y) == -100] == 0)
    # Mean over used rows, gradient too.
    mean, gm = jax.value_and_grad(
        lambda v: xj.softmax_cross_entropy_with_integer_labels(
            v, y, reduction="mean", implementation=impl, **kw
        )
    )(x)
    assert np.isfinite(mean) and np.all(np.isfinite(gm))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_neg_inf_grid_with_where_mask(impl, smoothing):
    # -inf logits excluded by `where`: smoothing spreads over kept classes only,
    # and the fully masked row (all -inf, nothing kept) gives loss 0, grad 0.
    x, y, _ = _neg_inf_grid()
    keep = jnp.isfinite(x)
    kw = dict(ignore_index=-100, label_smoothing=smoothing)

    def f(v):
        return xj.softmax_cross_entropy_with_integer_labels(
            v, y, where=keep, implementation=impl, **kw
        )

    ct = cotangent_like(jnp.zeros(y.shape))
    out, vjp = jax.jit(lambda v: jax.vjp(f, v))(x)
    (g,) = vjp(ct)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))
    out_r, (g_r,) = jax.jit(
        lambda v: _vjp_apply(lambda a: ref.integer_xent(a, y, where=keep, **kw), v, ct)
    )(x)
    assert_close(out, out_r)
    assert_close(g, g_r)
    assert out[6] == 0 and np.all(np.asarray(g)[6] == 0)
    # Soft labels with no mass on -inf classes, with and without the mask.
    t = jnp.where(keep, soft_labels((8, C)), 0.0)
    t = t / jnp.maximum(t.sum(-1, keepdims=True), 1e-30)
    for where in (keep, None):
        rows = slice(0, 6) if where is None else slice(None)

        def fs(v, u, where=where):
            return xj.softmax_cross_entropy(v, u, where=where, implementation=impl)

        val, (gx, gt) = jax.jit(
            jax.value_and_grad(lambda v, u, fs=fs: fs(v, u).sum(), (0, 1))
        )(x[rows], t[rows])
        assert np.isfinite(val) and np.all(np.isfinite(gx))
        gx_r = jax.grad(
            lambda v, u=t[rows], where=where: ref.soft_xent(v, u, where=where).sum()
        )(x[rows])
        assert_close(gx, gx_r)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_logits(impl, dtype):
    x = np.array(logits((N, C)))
    x[0, :] = 0.0
    x[0, 1] = 1e4  # target far below the max
    x[1, :] = -1e4
    x[1, 3] = 1e4
    x[2, :] = 1e4 * np.sign(x[2])
    x[3, 5] = -1e4
    x = jnp.asarray(x, dtype)
    y = jnp.array([0, 3, 4, 5, 1, 2])
    x32 = x.astype(jnp.float32)
    ct = cotangent_like(jnp.zeros((N,)))
    for kw in (dict(), dict(label_smoothing=0.1, z_loss=1e-4)):
        out, vjp = jax.vjp(
            lambda v, kw=kw: xj.softmax_cross_entropy_with_integer_labels(
                v, y, implementation=impl, **kw
            ),
            x,
        )
        (g,) = vjp(ct)
        assert np.all(np.isfinite(out)) and np.all(
            np.isfinite(np.asarray(g, np.float32))
        )
        out_r, vjp_r = jax.vjp(lambda v, kw=kw: ref.integer_xent(v, y, **kw), x32)
        assert_close(out, out_r, rtol=1e-5, atol=1e-3)
        assert_close(g, vjp_r(ct)[0], dtype)
    b, gb = jax.value_and_grad(
        lambda v: xj.sigmoid_binary_cross_entropy(
            v, jnp.full(v.shape, 0.3, v.dtype), pos_weight=2.0, implementation=impl
        ).sum()
    )(x)
    assert np.isfinite(b) and np.all(np.isfinite(np.asarray(gb, np.float32)))


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_logit_poisons_only_its_example(impl):
    x = logits((N, C)).at[2, 4].set(jnp.nan)
    y = int_labels((N,), C)
    t = soft_labels((N, C))
    ct = cotangent_like(jnp.zeros((N,)))
    others = np.arange(N) != 2
    for f, fr in (
        (
            lambda v: xj.softmax_cross_entropy_with_integer_labels(
                v, y, implementation=impl, label_smoothing=0.1
            ),
            lambda v: ref.integer_xent(v, y, label_smoothing=0.1),
        ),
        (
            lambda v: xj.softmax_cross_entropy(v, t, implementation=impl),
            lambda v: ref.soft_xent(v, t),
        ),
    ):
        out, vjp = jax.jit(lambda v, f=f: jax.vjp(f, v))(x)
        (g,) = vjp(ct)
        assert np.isnan(out[2])
        out_r, vjp_r = jax.vjp(fr, x)
        assert_close(out[others], out_r[others])
        assert_close(np.asarray(g)[others], np.asarray(vjp_r(ct)[0])[others])
    bce = xj.sigmoid_binary_cross_entropy(x, t, implementation=impl)
    assert np.isnan(bce[2, 4]) and np.sum(np.isnan(bce)) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_bce_extreme_grid(impl):
    xs = jnp.array([-jnp.inf, -1e4, -120.0, -30.0, 0.0, 30.0, 120.0, 1e4, jnp.inf])
    ys = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
    x = jnp.repeat(xs[:, None], 5, axis=1)
    y = jnp.repeat(ys[None, :], 9, axis=0)
    out = xj.sigmoid_binary_cross_entropy(x, y, implementation=impl)
    assert not np.any(np.isnan(out))
    finite_x = np.isfinite(np.asarray(x))
    assert np.all(np.isfinite(np.asarray(out)[finite_x]))
    assert out[0, 0] == 0 and out[-1, -1] == 0  # confident and right
    g = jax.grad(
        lambda v: xj.sigmoid_binary_cross_entropy(v, y[1:-1], implementation=impl).sum()
    )(x[1:-1])
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[3], 0.5 - ys, atol=1e-6)  # x = 0: sigmoid(0) - y
    # pos_weight = 1 changes nothing, even at extreme logits.
    out1 = xj.sigmoid_binary_cross_entropy(
        x[1:-1], y[1:-1], pos_weight=jnp.ones(5), implementation=impl
    )
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


@pytest.mark.parametrize(
    "kind", ["integer", "integer_all_options", "soft", "soft_where", "bce"]
)
def test_forward_saves_at_most_one_logits_sized_residual(kind, capsys):
    n, c = 8, 32
    x = logits((n, c))
    y = int_labels((n,), c).at[0].set(-100)
    t = soft_labels((n, c))
    keep = jnp.broadcast_to(jnp.arange(c) < 30, (n, c))  # an input, not a residual
    if kind == "integer":

        def f(v):
            return xj.softmax_cross_entropy_with_integer_labels(v, y, ignore_index=-100)
    elif kind == "integer_all_options":

        def f(v):
            return xj.softmax_cross_entropy_with_integer_labels(
                v,
                y,
                where=keep,
                ignore_index=-100,
                label_smoothing=0.1,
                class_weights=jnp.linspace(0.5, 1.5, c),
                z_loss=1e-3,
                reduction="mean",
            )
    elif kind == "soft":

        def f(v):
            return xj.softmax_cross_entropy(v, t, label_smoothing=0.1, z_loss=1e-3)
    elif kind == "soft_where":

        def f(v):
            return xj.softmax_cross_entropy(v, t, where=keep)
    else:

        def f(v):
            return xj.sigmoid_binary_cross_entropy(v, t, pos_weight=jnp.ones(c))

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


def test_compiled_temp_memory_bfloat16_adds_no_buffer():
    # A backend may compute bfloat16 matmuls in float32 (XLA CPU does): then the
    # float32 product, twice the logits' bytes, and float32 copies of h and w
    # are temporaries of any loss on h @ w. The loss's own buffer must fit in
    # them: compare with a linear loss, whose gradient needs no such buffer.
    dtype = jnp.bfloat16
    ours, logits_bytes = _temp_bytes(
        xj.softmax_cross_entropy_with_integer_labels, dtype=dtype
    )
    theirs, _ = _temp_bytes(
        optax.losses.softmax_cross_entropy_with_integer_labels, dtype=dtype
    )
    floor, _ = _temp_bytes(
        lambda x, y: jnp.sum(x.astype(jnp.float32) * y[:, None], axis=-1),
        dtype=dtype,
    )
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
