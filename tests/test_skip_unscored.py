"""``linear_cross_entropy(..., skip_unscored=True)`` (issue 30): the scored
rows are partitioned first and the loops stop after their last token block.

Every value and gradient must equal the loss with every row computed (the
``"reference"`` implementation, in float64) at 0%, 50% and 100% unscored rows,
for every reduction and with the options that change which rows are scored
(``ignore_index``, out-of-range labels under ``jit``, ``where``, ``shift``,
``segment_ids``); the unscored rows' gradients are exactly 0 even where their
``x`` is NaN. Sharding is in ``sharding_checks.case_skip_unscored``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import float64
from jax import export

from xent_jax import linear_cross_entropy
from xent_jax._linear import backward, layout

N, D, V = 37, 6, 40
IGNORE = -100
BLOCKS = (4, 16)  # several token blocks and a partial last one
OPTIONS = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-2)


def _data(unscored: float, seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D))
    w = rng.normal(size=(D, V)) * 0.7
    b = rng.normal(size=V)
    cw = rng.uniform(0.2, 2.0, V)
    y = rng.integers(0, V, n)
    y[rng.permutation(n)[: round(unscored * n)]] = IGNORE
    return x, w, b, cw, y


def _value_and_grads(x, w, b, cw, y, **opts):
    def loss(x, w, b, cw):
        out = linear_cross_entropy(x, w, y, bias=b, class_weights=cw, **opts)
        return jnp.sum(out * np.linspace(0.5, 1.5, out.size).reshape(out.shape))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, w, b, cw)


def _assert_close(got, want, rtol=1e-12, atol=1e-12):
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, h, rtol=rtol, atol=atol)


@pytest.mark.parametrize("unscored", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("block_size", [BLOCKS, None])
def test_equals_every_row_computed(unscored, reduction, block_size):
    with float64():
        args = _data(unscored)
        opts = dict(OPTIONS, reduction=reduction)
        got = _value_and_grads(*args, skip_unscored=True, block_size=block_size, **opts)
        want = _value_and_grads(*args, implementation="reference", **opts)
        _assert_close(got, want)


def test_every_row_unscored_gives_zero_and_zero_gradients_despite_nan():
    x, w, b, cw, y = _data(1.0)
    x[::3] = np.nan  # an unscored row's x never reaches a gradient
    for reduction in ("mean", "sum", "none"):
        value, grads = _value_and_grads(
            x,
            w,
            b,
            cw,
            y,
            skip_unscored=True,
            block_size=BLOCKS,
            **dict(OPTIONS, reduction=reduction),
        )
        assert float(value) == 0.0
        for g in grads:
            assert np.all(np.asarray(g) == 0), g


def test_nan_in_a_scored_row_gives_nan_and_unscored_rows_zero():
    x, w, b, cw, y = _data(0.5)
    scored = np.flatnonzero(y != IGNORE)
    x[scored[0], 0] = np.nan
    opts = dict(OPTIONS, reduction="none", block_size=BLOCKS)
    loss = linear_cross_entropy(x, w, y, skip_unscored=True, **opts)
    want = linear_cross_entropy(x, w, y, **opts)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(want))
    dx = jax.grad(
        lambda x: jnp.sum(linear_cross_entropy(x, w, y, skip_unscored=True, **opts))
    )(x)
    assert np.all(np.asarray(dx)[y == IGNORE] == 0)
    assert np.isnan(np.asarray(dx)[scored[0]]).all()


@pytest.mark.parametrize("reduction", ["mean", "mean_per_segment"])
def test_shift_segments_and_where_in_a_batch(reduction):
    """Packed sequences: the last token of each segment, the `where`-masked
    prompt and the padding are unscored and skipped."""
    with float64():
        rng = np.random.default_rng(3)
        batch, seq = 3, 12
        x = rng.normal(size=(batch, seq, D))
        w = rng.normal(size=(D, V)) * 0.7
        y = rng.integers(0, V, (batch, seq))
        segment_ids = np.repeat([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]], batch, 0)
        where = np.arange(seq)[None] >= np.array([[2], [4], [0]])  # prompts
        opts = dict(
            shift=1,
            segment_ids=segment_ids,
            segment_padding_id=0,
            where=where,
            reduction=reduction,
            label_smoothing=0.1,
        )

        def vg(**kw):
            loss = lambda x, w: linear_cross_entropy(x, w, y, **opts, **kw)  # noqa: E731
            return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

        _assert_close(
            vg(skip_unscored=True, block_size=BLOCKS), vg(implementation="reference")
        )


def test_out_of_range_labels_under_jit_stay_nan():
    """An out-of-range label is not scored: skipped, yet its loss stays NaN
    (the labels' check, not the kernel, makes it)."""
    x, w, b, cw, y = _data(0.25)
    y[5] = V + 3
    opts = dict(ignore_index=IGNORE, reduction="none", block_size=BLOCKS)
    f = jax.jit(
        lambda x, y, s: linear_cross_entropy(x, w, y, skip_unscored=s, **opts),
        static_argnums=2,
    )
    np.testing.assert_array_equal(f(x, y, True), f(x, y, False))
    assert np.isnan(f(x, y, True)[5])


def test_aux_of_unscored_rows_is_zero_and_scored_rows_unchanged():
    x, w, b, cw, y = _data(0.5)
    opts = dict(ignore_index=IGNORE, return_aux=True, block_size=BLOCKS)
    loss, aux = linear_cross_entropy(x, w, y, skip_unscored=True, **opts)
    want_loss, want = linear_cross_entropy(x, w, y, **opts)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    scored = y != IGNORE
    np.testing.assert_array_equal(aux.scored, scored)
    for name in ("lse", "entropy", "argmax"):
        got, ref = np.asarray(getattr(aux, name)), np.asarray(getattr(want, name))
        assert np.all(got[~scored] == 0), name
        np.testing.assert_allclose(got[scored], ref[scored], rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(aux.correct, want.correct)


def test_vmap_with_a_different_count_per_example():
    x, w, b, cw, y = _data(0.0, n=4 * 10)
    y = y.reshape(4, 10)
    y[0] = IGNORE  # none scored
    y[1, 3:] = IGNORE
    y[2, ::2] = IGNORE
    xs = x.reshape(4, 10, D)

    def vg(**kw):
        loss = lambda x, y: linear_cross_entropy(  # noqa: E731
            x, w, y, ignore_index=IGNORE, reduction="sum", block_size=(3, 16), **kw
        )
        return jax.vmap(jax.value_and_grad(loss))(xs, y)

    _assert_close(vg(skip_unscored=True), vg(), rtol=2e-6, atol=2e-6)


def test_export_with_a_symbolic_token_count():
    x, w, b, cw, y = _data(0.5)
    x, w = x.astype(np.float32), w.astype(np.float32)
    (n,) = export.symbolic_shape("n")

    def loss(x, y):
        return linear_cross_entropy(x, w, y, ignore_index=IGNORE, skip_unscored=True)

    spec = (
        jax.ShapeDtypeStruct((n, D), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    exported = export.export(jax.jit(jax.value_and_grad(loss)))(*spec)
    got = exported.call(x, y.astype(np.int32))
    want = jax.value_and_grad(
        lambda x, y: linear_cross_entropy(x, w, y, ignore_index=IGNORE)
    )(x, y)
    _assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_bfloat16_equals_every_row_computed():
    x, w, b, cw, y = _data(0.5)
    x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    def vg(**kw):
        loss = lambda x, w: linear_cross_entropy(x, w, y, ignore_index=IGNORE, **kw)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    (got, (dx, dw)), (want, (dx_want, dw_want)) = vg(skip_unscored=True), vg()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(dx, dx_want)  # each row's own sums: equal
    # dW sums the rows in another order before its one rounding to bfloat16
    np.testing.assert_allclose(np.float32(dw), np.float32(dw_want), rtol=2**-7)


@pytest.mark.parametrize("value", ["True", 1, None])
def test_refuses_a_non_boolean(value):
    x, w, b, cw, y = _data(0.0)
    with pytest.raises(TypeError, match="skip_unscored"):
        linear_cross_entropy(x, w, y, skip_unscored=value)


@pytest.mark.parametrize("active", [0, 1, 7, 8, 9, 23, 24, 25, 27, 40])
def test_only_the_active_blocks_run(active):
    """``layout.for_blocks`` with ``active``: the blocks holding one of the
    first ``active`` entries run (none for 0), never past the total."""

    def body(start, size, seen):
        return jax.lax.dynamic_update_slice(
            seen, jnp.ones((size,), seen.dtype), (start,)
        )

    seen = jax.jit(
        lambda a: layout.for_blocks(27, 8, body, jnp.zeros(27, jnp.int32), a)
    )(active)
    blocks_run = -(-min(active, 27) // 8)
    want = np.zeros(27, np.int32)
    want[: min(27, 8 * blocks_run)] = 1
    np.testing.assert_array_equal(seen, want)


def test_layout_caps_the_token_block_in_quarters():
    big = layout.choose(None, 2048, 32768, 512, False, False, skip_unscored=True)
    # the vocabulary block grows to keep the block's size, within the budget
    assert (big.token_block, big.vocab_block * big.groups) == (512, 2048)
    wide = layout.choose(None, 1024, 131072, 256, False, False, skip_unscored=True)
    assert (wide.token_block, wide.vocab_block * wide.groups) == (256, 2048)
    small = layout.choose(None, 512, 32768, 512, False, False, skip_unscored=True)
    assert small.token_block == layout.SKIP_MIN_TOKEN_BLOCK
    fixed = layout.choose((64, 128), 4096, 32768, 512, False, False, True)
    assert fixed.token_block == 64  # a token block given is kept


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_temporaries_grow_by_at_most_one_copy_of_x(dtype):
    """x and dx are gathered and scattered block by block, never copied
    whole: the compiled temporaries stay within the default's plus N·D."""
    n, d, v = 2048, 256, 8192
    specs = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def temp(skip):
        loss = lambda x, w, y: linear_cross_entropy(x, w, y, skip_unscored=skip)  # noqa: E731
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return step.lower(*specs).compile().memory_analysis().temp_size_in_bytes

    assert temp(True) <= temp(False) + n * d * jnp.dtype(dtype).itemsize


def test_a_large_16bit_dx_keeps_its_accumulator_split():
    """A 16-bit dx whose float32 accumulator passes backward.DX_SPLIT_BYTES is
    held in two halves, the high one in the result's buffer, with the rows
    gathered and scattered too: unsplit it was a float32 [N, D] beside the
    result (259 MiB at 16384 x 4096 x 151936 compiled for TPU, over the fused
    loss's 256 MiB; tests/test_deviceless.py)."""
    n, d, v = 8192, 1024, 2048
    assert n * d * 4 > backward.DX_SPLIT_BYTES
    specs = (
        jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def temp(skip):
        loss = lambda x, w, y: linear_cross_entropy(x, w, y, skip_unscored=skip)  # noqa: E731
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return step.lower(*specs).compile().memory_analysis().temp_size_in_bytes

    assert temp(True) <= temp(False) + 2**20


def test_a_split_16bit_dx_has_the_bits_of_the_plain_accumulator(monkeypatch):
    """The split accumulator gathered and scattered by rows holds the same
    float32 sums: dx equals the plain accumulator's bit for bit, with the
    unscored rows exactly zero."""
    n, d, v = 512, 64, 1000
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.1, jnp.bfloat16)
    labels = rng.integers(0, v, n)
    labels[rng.random(n) < 0.5] = -100
    y = jnp.asarray(labels, jnp.int32)

    def dx(split_bytes):
        monkeypatch.setattr(backward, "DX_SPLIT_BYTES", split_bytes)
        loss = lambda x: linear_cross_entropy(  # noqa: E731
            x, w, y, ignore_index=-100, skip_unscored=True, block_size=(256, 128)
        )
        return np.asarray(jax.jit(jax.grad(loss))(x).astype(jnp.float32))

    split, plain = dx(0), dx(2**62)
    np.testing.assert_array_equal(split, plain)
    assert not split[labels == -100].any() and split[labels != -100].any()
