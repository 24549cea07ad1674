"""Tests of the fused linear + cross-entropy loss (``linear_cross_entropy``).

The oracle is ``implementation="reference"``: the logits ``x @ w + b``
materialised and fed to the core loss (itself checked against the independent
reference in ``tests/reference.py``), cross-checked once against optax here.
Shapes are tiny and the block sizes are chosen so that every loop has several
full blocks and a partial last block, in tokens and in classes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from tiers import cases, slow

from xent_jax import _sharding, linear_cross_entropy
from xent_jax._compat import is_transpose_output as _is_transposed
from xent_jax._linear import layout

N, D = 13, 8
V = 200  # divisible by 8: the vocabulary is processed as 8 groups of 25
# (_grouped_view: on one device the kernel would take one group).
V_ODD = 203  # prime-ish: one group
IGNORE = -100

# (token_block, vocab_block): several full blocks plus a remainder in both.
BLOCKS = [None, 7, (5, 24), (4, 64), (N, V_ODD)]

TOL = {
    jnp.dtype(jnp.float32): dict(rtol=2e-5, atol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=2e-2),
}


@pytest.fixture(autouse=True)
def _grouped_view(monkeypatch):
    """This module runs the vocabulary as groups side by side, the layout a
    vocabulary sharded by GSPMD needs; one device alone takes one group."""
    monkeypatch.setattr(_sharding, "vocab_may_be_split", lambda: True)


def test_one_device_takes_one_vocabulary_group(monkeypatch):
    """Where no sharding can split ``w`` the kernel does not view it as ``[D,
    G, V/G]``: under the TPU's tiled layouts that view is a copy of ``w`` and
    of ``dw`` (1162 MiB at Gemma-2's head, tests/test_deviceless.py)."""
    monkeypatch.undo()
    assert jax.device_count() == 1
    assert layout.choose(None, N, V, D, False, False).groups == 1
    assert layout.choose(None, N, V, D, False, False, grouped_view=True).groups == 8
    seen = []
    real = layout.choose

    def recorded(*args, **kwargs):
        chosen = real(*args, **kwargs)
        seen.append(chosen.groups)
        return chosen

    monkeypatch.setattr(layout, "choose", recorded)
    x, w, b, y, _ = _data()
    loss = lambda w: linear_cross_entropy(x, w, y, bias=b, ignore_index=IGNORE)  # noqa: E731
    jax.jit(jax.grad(loss))(w)
    assert seen and set(seen) == {1}, seen


def _data(v=V, dtype=jnp.float32, seed=0, n=N, d=D, labels=None):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.7, dtype)
    b = jnp.asarray(rng.normal(size=(v,)), dtype)
    if labels is None:
        labels = rng.integers(0, v, size=n)
        labels[2] = IGNORE
        labels[-1] = v - 1  # the last class: in the last, partial block
        labels[-2] = v - 2
    y = jnp.asarray(labels, jnp.int32)
    cw = jnp.asarray(rng.uniform(0.2, 2.0, size=(v,)), jnp.float32)
    return x, w, b, y, cw


def _close(a, b, dtype=jnp.float32, scale=None):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    t = dict(TOL[jnp.dtype(dtype)])
    if scale is not None:  # absolute tolerance relative to the array's size
        t["atol"] = t["atol"] * max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, **t)


def _vjp_check(
    opts, x, w, b, y, dtype=jnp.float32, block_size=None, seed=3, tied=False
):
    """Values and VJPs w.r.t. (x, w, bias) under a random cotangent. ``tied``:
    ``w`` is a tied embedding ``[V, D]``, passed to the loss as ``w.T``."""

    def f(impl):
        def fn(x, w, b):
            o = dict(opts)
            if o.pop("with_bias", True):
                o["bias"] = b
            if tied:
                # The [V, D] path is taken (under jit, for the blockwise loss).
                assert _is_transposed(w.T) or impl == "reference"
            return linear_cross_entropy(
                x,
                w.T if tied else w,
                y,
                implementation=impl,
                block_size=block_size if impl == "blockwise" else None,
                **o,
            )

        return fn

    @jax.jit
    def value_and_vjp(x, w, b, ct):
        out, vjp = jax.vjp(f("blockwise"), x, w, b)
        out_r, vjp_r = jax.vjp(f("reference"), x, w, b)
        return out, out_r, vjp(ct.astype(out.dtype)), vjp_r(ct.astype(out_r.dtype))

    shape = jax.eval_shape(f("reference"), x, w, b).shape
    ct = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    out, out_r, grads, grads_r = value_and_vjp(x, w, b, ct)
    assert out.shape == out_r.shape and out.dtype == out_r.dtype
    _close(out, out_r, dtype, scale=True)
    for g, g_r, p in zip(grads, grads_r, (x, w, b), strict=True):
        assert g.dtype == p.dtype and g.shape == p.shape
        _close(g, g_r, dtype, scale=True)
    return out, grads


OPTIONS = {
    "plain": dict(),
    "no_bias": dict(with_bias=False),
    "ignore": dict(ignore_index=IGNORE),
    "smoothing": dict(ignore_index=IGNORE, label_smoothing=0.1),
    "class_weights": dict(ignore_index=IGNORE, class_weights="cw"),
    "z_loss": dict(ignore_index=IGNORE, z_loss=1e-2),
    "softcap": dict(ignore_index=IGNORE, logit_softcap=3.0),
    "all": dict(
        ignore_index=IGNORE,
        label_smoothing=0.2,
        class_weights="cw",
        z_loss=1e-3,
        logit_softcap=5.0,
    ),
}


def _opts(name, cw, y):
    o = dict(OPTIONS[name])
    if o.get("class_weights") == "cw":
        o["class_weights"] = cw
    if "ignore_index" not in o:
        y = jnp.where(y == IGNORE, 0, y)
    return o, y


CASES = [(name, jnp.float32) for name in OPTIONS] + [
    (name, jnp.bfloat16) for name in ("plain", "no_bias", "all")
]


@pytest.mark.parametrize(
    "name,dtype",
    cases(CASES, [f"{n}-{jnp.dtype(d).name}" for n, d in CASES], fast=["all-float32"]),
)
def test_matches_reference_random_cotangent(name, dtype):
    """reduction="none" with a non-uniform cotangent: dx, dw and dbias."""
    x, w, b, y, cw = _data(dtype=dtype)
    opts, y = _opts(name, cw, y)
    _vjp_check(dict(opts, reduction="none"), x, w, b, y, dtype, block_size=(5, 24))


TIED_CASES = [
    ("all", jnp.float32, (5, 24)),
    ("plain", jnp.float32, 7),
    ("class_weights", jnp.float32, None),
    ("all", jnp.bfloat16, (4, 64)),
]


@pytest.mark.parametrize(
    "name,dtype,block_size",
    TIED_CASES,
    ids=[f"{n}-{jnp.dtype(d).name}-{b}" for n, d, b in TIED_CASES],
)
@pytest.mark.slow
def test_tied_embedding_matches_reference(name, dtype, block_size):
    """``emb.T`` runs the [V, D] path: values and gradients w.r.t. ``emb``."""
    for v in (V, V_ODD):
        x, w, b, y, cw = _data(v=v, dtype=dtype)
        opts, y = _opts(name, cw, y)
        _vjp_check(
            dict(opts, reduction="none"),
            x,
            w.T,
            b,
            y,
            dtype,
            block_size=block_size,
            tied=True,
        )


def test_tied_embedding_filtering_is_exact_at_zero():
    x, w, b, y, cw = _data()
    opts = dict(ignore_index=IGNORE, filter_threshold=0.0, logit_softcap=4.0)
    _vjp_check(dict(opts, reduction="none"), x, w.T, b, y, block_size=7, tied=True)


def test_transpose_detection():
    emb = jnp.ones((6, 4))
    assert not _is_transposed(emb.T)  # eager: already a copy
    seen = []

    def loss(emb, w):
        seen.append((_is_transposed(emb.T), _is_transposed(w), _is_transposed(emb)))
        return jnp.sum(emb.T) + jnp.sum(w)

    jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(emb, emb.T)
    jax.jit(jax.vmap(jax.grad(loss)))(emb[None], emb.T[None])
    assert seen == [(True, False, False)] * 2


@pytest.mark.parametrize(
    "block_size,v",
    [(b, V) for b in BLOCKS[:1]]
    + [slow(b, V) for b in BLOCKS[1:]]
    + [slow(*c) for c in [(7, V_ODD), ((5, 24), V_ODD), ((N, V_ODD), V_ODD)]],
    ids=str,
)
def test_block_sizes(block_size, v):
    """Labels sit in the last, partial block (see _data); V = 203 is one group."""
    x, w, b, y, cw = _data(v=v)
    opts = dict(ignore_index=IGNORE, class_weights=cw, reduction="none")
    _vjp_check(opts, x, w, b, y, block_size=block_size)


@pytest.mark.parametrize("reduction", ["mean", slow("sum")])
def test_reductions(reduction):
    x, w, b, y, cw = _data()
    opts = dict(class_weights=cw, ignore_index=IGNORE, reduction=reduction)
    _vjp_check(opts, x, w, b, y, block_size=(5, 24))


def test_matches_optax():
    x, w, b, y, _ = _data()
    y = jnp.where(y == IGNORE, 0, y)

    def ours(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, block_size=(4, 64))

    def theirs(x, w, b):
        return optax.losses.softmax_cross_entropy_with_integer_labels(
            x @ w + b, y
        ).mean()

    v, g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(x, w, b)
    v_r, g_r = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1, 2)))(x, w, b)
    _close(v, v_r)
    for a, r in zip(g, g_r, strict=True):
        _close(a, r)


@pytest.mark.parametrize("name", ["plain", "all"])
@pytest.mark.slow
def test_invariant_to_block_size(name):
    x, w, b, y, cw = _data()
    opts, y = _opts(name, cw, y)
    opts.pop("with_bias", None)
    results = []
    for bs in [7, (5, 24), (N, V)]:
        f = jax.value_and_grad(
            lambda x, w, b, bs=bs: linear_cross_entropy(
                x, w, y, bias=b, block_size=bs, reduction="sum", **opts
            ),
            argnums=(0, 1, 2),
        )
        results.append(jax.jit(f)(x, w, b))
    for value, grads in results[1:]:
        _close(value, results[0][0])
        for g, g0 in zip(grads, results[0][1], strict=True):
            _close(g, g0)


@pytest.mark.slow
def test_invariant_to_batch_splitting():
    """Sums over two halves (and a 3-D batch) equal the sum over the batch."""
    x, w, b, y, cw = _data(n=16)
    opts = dict(bias=b, ignore_index=IGNORE, class_weights=cw, label_smoothing=0.1)

    def total(x, w, y):
        return linear_cross_entropy(x, w, y, reduction="sum", **opts)

    step = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    full = step(x, w, y)
    a, c = step(x[:8], w, y[:8]), step(x[8:], w, y[8:])
    _close(a[0] + c[0], full[0])
    _close(jnp.concatenate([a[1][0], c[1][0]]), full[1][0])
    _close(a[1][1] + c[1][1], full[1][1])
    batched = jax.jit(total)(x.reshape(2, 8, D), w, y.reshape(2, 8))
    _close(batched, full[0])
    per_example = linear_cross_entropy(
        x.reshape(4, 4, D), w, y.reshape(4, 4), reduction="none", **opts
    )
    assert per_example.shape == (4, 4)


@pytest.mark.slow
def test_masked_vocabulary_with_minus_inf_bias():
    x, w, b, y, cw = _data()
    masked = np.zeros(V, bool)
    masked[::7] = True
    masked[V - 3] = True
    y = jnp.where(jnp.asarray(masked)[jnp.clip(y, 0)], 1, y)  # labels unmasked
    b = jnp.where(jnp.asarray(masked), -jnp.inf, b)
    for opts in [dict(ignore_index=IGNORE), dict(ignore_index=IGNORE, z_loss=1e-2)]:
        out, (dx, dw, db) = _vjp_check(
            dict(opts, reduction="none"), x, w, b, y, block_size=(5, 24)
        )
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx))
        assert np.all(np.asarray(dw)[:, masked] == 0)
        assert np.all(np.asarray(db)[masked] == 0)
    # A label on a masked class has an infinite loss, as for -inf logits.
    y_bad = y.at[0].set(0)
    loss = linear_cross_entropy(x, w, y_bad, bias=b, reduction="none", block_size=7)
    assert loss[0] == np.inf


@pytest.mark.parametrize("name", [slow("all"), slow("class_weights"), "plain"])
@pytest.mark.slow
def test_padded_vocabulary_num_classes(name):
    """num_classes=V masks padding columns (random, large, any bias): values
    and gradients equal the unpadded loss, padding gets no gradient, labels
    at or past num_classes are out of range. Blockwise and reference, with
    the padding inside and across the last block."""
    x, w, b, y, cw = _data(v=V_ODD)
    opts, y = _opts(name, cw, y)
    pad = 13
    rng = np.random.default_rng(9)
    w_pad = jnp.concatenate([w, jnp.asarray(rng.normal(size=(D, pad)) * 9)], 1)
    b_pad = jnp.concatenate([b, jnp.full((pad,), 5.0)])
    cw_pad = jnp.concatenate([cw, jnp.full((pad,), 3.0)])
    if "class_weights" in opts:
        opts["class_weights"] = cw_pad
    ct = jnp.asarray(rng.normal(size=N), jnp.float32)

    def objective(x, w, b, impl, **kw):
        out = linear_cross_entropy(
            x, w, y, bias=b, reduction="none", implementation=impl, **kw
        )
        return jnp.sum(ct * out)

    unpadded = dict(opts)
    if "class_weights" in opts:
        unpadded["class_weights"] = cw
    want = jax.value_and_grad(objective, argnums=(0, 1, 2))(
        x, w, b, "reference", **unpadded
    )
    for impl, block_size in [("reference", None), ("blockwise", (5, 24))]:
        kw = dict(opts, num_classes=V_ODD)
        if block_size:
            kw["block_size"] = block_size
        value, (dx, dw, db) = jax.value_and_grad(objective, argnums=(0, 1, 2))(
            x, w_pad, b_pad, impl, **kw
        )
        _close(value, want[0], scale=True)
        for got, ref in zip((dx, dw[:, :V_ODD], db[:V_ODD]), want[1], strict=True):
            _close(got, ref, scale=True)
        assert np.all(np.asarray(dw[:, V_ODD:]) == 0)
        assert np.all(np.asarray(db[V_ODD:]) == 0)
    with pytest.raises(
        ValueError, match=r"out of range: class ids must lie in \[0, 203\)"
    ):
        linear_cross_entropy(x, w_pad, y.at[0].set(V_ODD), num_classes=V_ODD)


@pytest.mark.slow
def test_return_lse():
    x, w, b, y, cw = _data()
    y = jnp.where(y == IGNORE, 0, y)

    def f(impl):
        def fn(x, w):
            loss, lse = linear_cross_entropy(
                x,
                w,
                y,
                bias=b,
                logit_softcap=4.0,
                return_lse=True,
                implementation=impl,
                block_size=(5, 24) if impl == "blockwise" else None,
            )
            return loss + 0.3 * jnp.sum(jnp.sin(lse)), lse

        return fn

    (v, lse), g = jax.jit(
        jax.value_and_grad(f("blockwise"), argnums=(0, 1), has_aux=True)
    )(x, w)
    (v_r, lse_r), g_r = jax.jit(
        jax.value_and_grad(f("reference"), argnums=(0, 1), has_aux=True)
    )(x, w)
    expected = jax.nn.logsumexp(4.0 * jnp.tanh((x @ w + b) / 4.0), axis=-1)
    _close(lse, expected)
    _close(lse_r, expected)
    _close(v, v_r)
    for a, r in zip(g, g_r, strict=True):
        _close(a, r)


@pytest.mark.slow
def test_filter_threshold_zero_is_exact():
    """With threshold 0 nothing is skipped: only the sparse label path differs."""
    x, w, b, y, _ = _data()
    _vjp_check(
        dict(ignore_index=IGNORE, filter_threshold=0.0, reduction="none"),
        x,
        w,
        b,
        y,
        block_size=(5, 24),
    )
    _vjp_check(
        dict(
            ignore_index=IGNORE,
            filter_threshold=0.0,
            logit_softcap=3.0,
            reduction="none",
        ),
        x,
        w,
        b,
        y,
        block_size=(5, 24),
    )


@pytest.mark.parametrize(
    "dtype", [jnp.float32, slow(jnp.bfloat16)], ids=["f32", "bf16"]
)
@pytest.mark.parametrize("w_layout", ["dv", slow("vd"), slow("tied")])
@pytest.mark.parametrize("v,block_size", [(V, (5, 24)), slow(V_ODD, 7), slow(V, None)])
@pytest.mark.slow
def test_filter_skipping_every_block_leaves_the_label_term(
    dtype, w_layout, v, block_size
):
    """With threshold 1 every block is skipped (each p < 1), and what is left
    is the label term alone: the gradient of ``-sum_i g_i zhat_{i, y_i}``
    with ``zhat`` the capped, tempered logits. Threshold 0 skips nothing and
    is the exact gradient (up to the order of reductions). Skipped blocks
    apply the label term in the loop (their label's column by a gather and
    scatters). ``tied``: a ``[V, D]`` embedding passed as ``emb.T``."""
    x, w, b, y, _ = _data(v, dtype)
    cap, temp = 3.0, 1.5
    scored = y != IGNORE
    g = 1.0 / jnp.sum(scored)

    def loss(thr):
        def f(x, w, b):
            return linear_cross_entropy(
                x,
                w.T if w_layout == "tied" else w,
                y,
                bias=b,
                ignore_index=IGNORE,
                logit_softcap=cap,
                temperature=temp,
                z_loss=1e-2,
                filter_threshold=thr,
                block_size=block_size,
                w_layout="vd" if w_layout == "vd" else "dv",
            )

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    def label_logits(x, w, b):
        z = (x.astype(jnp.float32) @ w.astype(jnp.float32) + b) / temp
        z = cap * jnp.tanh(z / cap)
        z_y = jnp.take_along_axis(z, jnp.where(scored, y, 0)[:, None], axis=1)
        return -g * jnp.sum(jnp.where(scored, z_y[:, 0], 0))

    args = (x, w if w_layout == "dv" else w.T, b)
    got = loss(1.0)(*args)
    want = jax.grad(label_logits, argnums=(0, 1, 2))(x, w, b)
    for a, r in zip(
        got,
        want[:1] + (want[1] if w_layout == "dv" else want[1].T,) + want[2:],
        strict=True,
    ):
        _close(a, r, dtype, scale=True)
    exact = loss(None)(*args)
    for a, r in zip(loss(0.0)(*args), exact, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), r, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_filter_threshold_error_bound():
    """Skipped blocks change each logit's gradient by less than thr * coef.

    Mean reduction: coef = 1 / N for every scored row, so with E the error in
    d loss / d logits (|E| <= thr / N), dx = E w^T and dw = x^T E are bounded
    by thr / N * sum_c |w_dc| and thr / N * sum_i |x_id|.
    """
    rng = np.random.default_rng(5)
    n, d, v = 32, 16, 512
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 1.5, jnp.float32)  # peaked softmax
    y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
    # Skips about 5% of the blocks. (At 1e-3 it skipped none, and the check
    # below passed only because the label term's order of summation differed.)
    thr = 1e-2

    def grads(threshold):
        return jax.jit(
            jax.grad(
                lambda x, w: linear_cross_entropy(
                    x, w, y, filter_threshold=threshold, block_size=(8, 32)
                ),
                argnums=(0, 1),
            )
        )(x, w)

    (dx, dw), (dx0, dw0) = grads(thr), grads(None)
    err_x, err_w = np.abs(dx - dx0), np.abs(dw - dw0)
    bound_x = thr / n * np.sum(np.abs(np.asarray(w)), axis=1)[None, :]
    bound_w = thr / n * np.sum(np.abs(np.asarray(x)), axis=0)[:, None]
    assert np.all(err_x <= bound_x + 1e-7)
    assert np.all(err_w <= bound_w + 1e-7)
    # blocks were really skipped (skipping none is exact: a test above)
    assert err_x.max() > 0 and err_w.max() > 0
    # The label term is never filtered: the loss still decreases along -grad.
    assert np.max(np.abs(dw)) > 10 * np.max(err_w)


@pytest.mark.slow
def test_dtypes_of_outputs():
    x, w, b, y, _ = _data(dtype=jnp.bfloat16)
    y = jnp.where(y == IGNORE, 0, y)
    loss, lse = linear_cross_entropy(x, w, y, bias=b, return_lse=True)
    assert loss.dtype == jnp.float32 and lse.dtype == jnp.float32
    dx, dw, db = jax.jit(
        jax.grad(
            lambda x, w, b: linear_cross_entropy(x, w, y, bias=b), argnums=(0, 1, 2)
        )
    )(x, w, b)
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16,) * 3


def test_all_ignored_mean_is_zero():
    x, w, b, y, _ = _data()
    y = jnp.full_like(y, IGNORE)
    f = jax.jit(
        jax.value_and_grad(
            lambda x, w: linear_cross_entropy(x, w, y, ignore_index=IGNORE),
            argnums=(0, 1),
        )
    )
    value, (dx, dw) = f(x, w)
    assert value == 0 and not np.any(dx) and not np.any(dw)


def test_normalizer():
    x, w, b, y, _ = _data()
    y = jnp.where(y == IGNORE, 0, y)
    total = linear_cross_entropy(x, w, y, reduction="sum")
    _close(linear_cross_entropy(x, w, y, normalizer=100.0), total / 100.0)


# --- bad inputs ---------------------------------------------------------------


def test_shape_and_dtype_errors():
    x, w, b, y, cw = _data()
    with pytest.raises(TypeError, match="x"):
        linear_cross_entropy(x.astype(jnp.int32), w, y)
    with pytest.raises(TypeError, match="w"):
        linear_cross_entropy(x, w.astype(jnp.int32), y)
    with pytest.raises(TypeError, match="labels"):
        linear_cross_entropy(x, w, y.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        linear_cross_entropy(x[:, :5], w, y)
    with pytest.raises(ValueError, match=r"w must have shape"):
        linear_cross_entropy(x, w[None], y)
    with pytest.raises(ValueError, match=r"labels must have shape \(13,\)"):
        linear_cross_entropy(x, w, y[:, None])
    with pytest.raises(ValueError, match=r"bias must have shape \(200,\)"):
        linear_cross_entropy(x, w, y, bias=b[:10], ignore_index=IGNORE)
    with pytest.raises(ValueError, match=r"class_weights must have shape"):
        linear_cross_entropy(x, w, y, class_weights=cw[:5], ignore_index=IGNORE)
    with pytest.raises(ValueError, match="implementation"):
        linear_cross_entropy(x, w, y, ignore_index=IGNORE, implementation="fast")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, y, ignore_index=IGNORE, reduction="avg")
    with pytest.raises(ValueError, match="block_size"):
        linear_cross_entropy(x, w, y, ignore_index=IGNORE, block_size=(1, 2, 3))
    with pytest.raises(ValueError, match="logit_softcap"):
        linear_cross_entropy(x, w, y, ignore_index=IGNORE, logit_softcap=0.0)
    with pytest.raises(NameError, match="unbound axis name"):  # outside shard_map
        linear_cross_entropy(x, w, y, ignore_index=IGNORE, axis_name="v")
    with pytest.raises(ValueError, match=r"num_classes must lie in \[1, 200\]"):
        linear_cross_entropy(x, w, y, ignore_index=IGNORE, num_classes=201)


def test_out_of_range_labels():
    x, w, b, y, _ = _data()
    y = y.at[4].set(V)
    with pytest.raises(ValueError, match=r"labels\[4\] = 200 is out of range"):
        linear_cross_entropy(x, w, y, ignore_index=IGNORE)

    # Under jit: NaN loss for that example, no gradient from it, and checkify
    # reports the bad label.
    def f(x, w, y):
        return linear_cross_entropy(x, w, y, ignore_index=IGNORE, reduction="none")

    loss = jax.jit(f)(x, w, y)
    assert np.isnan(loss[4]) and np.all(np.isfinite(np.delete(np.asarray(loss), 4)))
    dx = jax.jit(jax.grad(lambda x, y: jnp.nansum(f(x, w, y))))(x, y)
    assert not np.any(dx[4])
    err, _ = jax.jit(checkify.checkify(f))(x, w, y)
    with pytest.raises(checkify.JaxRuntimeError, match="out"):
        err.throw()


# --- memory -------------------------------------------------------------------


def _temp_bytes(
    n, d, v, dtype=jnp.float32, block_size=(256, 1024), tied=False, layout="dv", **kw
):
    """Compiled temp bytes of value_and_grad of the mean loss w.r.t. x and w;
    ``tied``: w is [V, D] passed as ``w.T``; ``layout="vd"``: w is [V, D]."""
    x = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((v, d) if tied or layout == "vd" else (d, v), dtype)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    kw = dict(dict(z_loss=1e-4), **kw)

    def loss(x, w, y):
        out = linear_cross_entropy(
            x, w.T if tied else w, y, block_size=block_size, w_layout=layout, **kw
        )
        return out[0] if isinstance(out, tuple) else out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(x, w, y).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.slow
def test_temp_memory_far_below_logits_and_flat_in_vocab(dtype):
    """Compile only: no [N, V] buffer, no full-size upcast of w, no copy of a
    transposed (tied) w."""
    n, d = 2048, 256
    temps = {v: _temp_bytes(n, d, v, dtype) for v in (16384, 65536)}
    logits_bytes = n * 16384 * 4
    assert temps[16384] < logits_bytes / 8, temps
    assert temps[65536] <= temps[16384] * 1.05 + 2**20, temps
    w_bytes = d * 65536 * jnp.dtype(dtype).itemsize
    # (a copy of w or dw would be w_bytes, an upcast 2 w_bytes; a bfloat16 dw
    # is written in spans of 8 MiB here, a quarter of it)
    assert temps[65536] < w_bytes / 2, temps
    # A tied embedding passed as emb.T: neither W nor dW is copied.
    tied = _temp_bytes(n, d, 65536, dtype, tied=True)
    assert tied <= temps[65536] * 1.05 + 2**20, (tied, temps)
    # An embedding passed as [V, D] with w_layout="vd": neither is copied.
    rows = _temp_bytes(n, d, 65536, dtype, layout="vd")
    assert rows <= temps[65536] * 1.05 + 2**20, (rows, temps)


@pytest.mark.parametrize("filter_threshold", [None, 1e-6], ids=["plain", "filter"])
@pytest.mark.slow
def test_default_blocks_fit_the_temp_budget_at_large_depth(filter_threshold):
    """Compile only, float32, D = 2304 (issue 11): the default blocks shrink to
    their budget (the [token_block, D] and [D, vocab_block] blocks were 71 MiB),
    and neither more tokens nor more classes add temporaries (the filter's
    label term was an [N, D] update, its cond a copy of all of dx)."""
    kw = dict(block_size=None, filter_threshold=filter_threshold, z_loss=0.0)
    temps = {
        (n, v): _temp_bytes(n, 2304, v, **kw)
        for n, v in ((4096, 16384), (8192, 16384), (8192, 65536))
    }
    bound = (32 if filter_threshold is None else 36) * 2**20  # (the cond's copies)
    assert max(temps.values()) <= bound, {k: t / 2**20 for k, t in temps.items()}
    assert temps[8192, 65536] <= temps[4096, 16384] + 2**20, temps


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.slow
def test_filtered_gradients_add_no_temporaries_at_lm_shapes(dtype):
    """Compile only, at Gemma-2's head (N=8192, D=2304, V=256000; issue 11):
    with gradient filtering the label term of skipped blocks is applied in
    the loop. Applied after it, it made a 16-bit dw pass through two
    conversions of all of it (1.1 GiB each) and kept dx in float32 (1,269 MiB
    of temporaries in bfloat16, against 64 without the filter)."""
    n, d, v = 8192, 2304, 256000
    kw = dict(block_size=None, z_loss=0.0)
    plain = _temp_bytes(n, d, v, dtype, **kw)
    filtered = _temp_bytes(n, d, v, dtype, filter_threshold=1e-6, **kw)
    assert filtered <= plain + 12 * 2**20, (filtered / 2**20, plain / 2**20)


@pytest.mark.slow
def test_bfloat16_dx_accumulator_is_half_in_temporaries():
    """Compile only, bfloat16 at N=8192, D=2304 (issue 11): dx accumulates in
    float32 held as two 16-bit halves, the high one in the result's buffer,
    so the temporaries hold 36 MiB of it, not a 72 MiB float32 [N, D]."""
    n, d = 8192, 2304
    temp = _temp_bytes(n, d, 16384, jnp.bfloat16, block_size=None, z_loss=0.0)
    assert temp <= n * d * 2 + 32 * 2**20, temp / 2**20  # was 95.7 MiB


_SPLIT_DX_OPTIONS = {
    "plain": {},
    "filter": dict(filter_threshold=1e-3),
    "aux_bias_vd": dict(return_aux=True, bias=True, w_layout="vd", z_loss=1e-3),
    "smoothing_weights_softcap": dict(
        label_smoothing=0.1, class_weights=True, logit_softcap=3.0, temperature=0.8
    ),
}


def _sixteen_bit_case(name, dtype, v):
    """A jitted, vmapped value_and_grad of the fused loss with the options of
    ``_SPLIT_DX_OPTIONS[name]``, 16-bit, several token and vocabulary blocks."""
    opts = dict(_SPLIT_DX_OPTIONS[name])
    r = np.random.default_rng(12)
    n, d = 24, 16
    x = jnp.asarray(r.normal(size=(2, n, d)), dtype)
    rows = opts.get("w_layout") == "vd"
    w = jnp.asarray(r.normal(size=(v, d) if rows else (d, v)) * 0.4, dtype)
    y = r.integers(0, v, n).astype(np.int32)
    y[:3] = -100
    if opts.pop("bias", False):
        opts["bias"] = jnp.asarray(r.normal(size=v) * 0.3, dtype)
    if opts.get("class_weights"):
        opts["class_weights"] = jnp.asarray(r.uniform(0.5, 2, v), jnp.float32)

    def objective(x, w):
        out = linear_cross_entropy(
            x, w, y, ignore_index=-100, block_size=(8, 16), **opts
        )
        if isinstance(out, tuple):
            out = out[0] + 0.1 * jnp.mean(out[1].entropy) + 0.01 * jnp.mean(out[1].lse)
        return out

    def jitted():
        jax.clear_caches()
        vg = jax.value_and_grad(objective, argnums=(0, 1))
        return jax.jit(jax.vmap(vg, in_axes=(0, None)))

    def run():
        return jitted()(x, w)

    run.lowered_text = lambda: jitted().lower(x, w).as_text()
    return run


def _assert_same_bits(got, want):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(
            np.asarray(g, np.float32), np.asarray(e, np.float32)
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(_SPLIT_DX_OPTIONS))
@pytest.mark.slow
def test_split_dx_accumulator_changes_no_bit(monkeypatch, name, dtype):
    """A 16-bit dx accumulated as ``layout.SplitFloat32`` (forced here at any
    size) gives every bit of the plain float32 accumulator, with every option,
    several token blocks and under vmap. (The sharded modes:
    ``sharding_checks.case_linear_bfloat16_split_dx``.)"""
    from xent_jax._linear import backward, layout

    run = _sixteen_bit_case(name, dtype, v=40)
    splits = []
    split = layout.SplitFloat32.split
    with monkeypatch.context() as m:
        m.setattr(backward, "DX_SPLIT_BYTES", 0)
        m.setattr(layout.SplitFloat32, "split", lambda a: splits.append(1) or split(a))
        got = run()
    assert splits, "the split accumulator was not used"
    _assert_same_bits(got, run())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(_SPLIT_DX_OPTIONS))
@pytest.mark.slow
def test_dw_spans_change_no_bit(monkeypatch, name, dtype):
    """A 16-bit dw written one vocabulary block per span (each span put into
    dw as raw bits) gives every bit of dw written as a single span, with every
    option and under vmap."""
    from xent_jax._linear import backward

    run = _sixteen_bit_case(name, dtype, v=64)
    spans = []  # (columns per group, vocabulary block, span)
    dw_span = backward._dw_span

    def recorded(per_group, block, *rest):
        spans.append((per_group, block, dw_span(per_group, block, *rest)))
        return spans[-1][-1]

    with monkeypatch.context() as m:
        for name_ in ("DW_SPAN_BYTES", "DW_SPAN_MAX_BYTES"):
            m.setattr(backward, name_, 1)
        m.setattr(backward, "_dw_span", recorded)
        got = run()
    assert spans, "dw was not written in spans"
    for per_group, block, span in spans:  # one block per span, several spans
        assert span == block < per_group, spans
    with monkeypatch.context() as m:
        m.setattr(backward, "DW_SPAN_BYTES", 2**40)
        m.setattr(backward, "DW_SPAN_MAX_BYTES", 2**40)
        want = run()
    _assert_same_bits(got, want)


@pytest.mark.parametrize("name", ["plain", slow("aux_bias_vd"), slow("filter")])
def test_dw_in_one_pass_off_cpu_changes_no_bit(monkeypatch, name):
    """Issue 27: the spans are XLA CPU's alone (``DW_SPAN_PLATFORMS``); on TPU
    and GPU a 16-bit dw is updated block by block in one pass. Taken on the
    CPU, that path gives every bit of the spans' dw."""
    from xent_jax._linear import backward

    run = _sixteen_bit_case(name, jnp.bfloat16, v=64)
    with monkeypatch.context() as m:
        for name_ in ("DW_SPAN_BYTES", "DW_SPAN_MAX_BYTES"):
            m.setattr(backward, name_, 1)  # a span per vocabulary block
        assert "ui16" in run.lowered_text()  # the spans, as raw bits
        in_spans = run()
    with monkeypatch.context() as m:
        m.setattr(backward, "DW_SPAN_PLATFORMS", ())
        assert "ui16" not in run.lowered_text()
        one_pass = run()
    _assert_same_bits(one_pass, in_spans)


@pytest.mark.parametrize("n", [1024, 8192])
def test_dw_spans_bound_the_passes_over_a_16_bit_dw(n):
    """Gemma-2's head in bfloat16 (D=2304, V=256000; issue 11): XLA CPU
    rewrites all of a 16-bit dw for each span put into it, so spans of 8 MiB
    made 250 passes over 1.1 GiB (158 s of value_and_grad at N=1024, against
    44 s in float32). The spans grow with dw / N, up to 64 MiB, and divide the
    blocks (at most twice the passes of N / 128)."""
    from xent_jax._linear import backward
    from xent_jax._linear import layout as lay

    d, v = 2304, 256000
    lo = lay.choose(None, n, v, d, rows=False, padded=False)
    per_group = v // lo.groups
    dw_bytes = d * v * 2
    budget = backward._span_bytes(dw_bytes, n)
    span = backward._dw_span(per_group, lo.vocab_block, dw_bytes, budget)
    passes = per_group // span
    assert passes <= 2 * max(n // backward.DW_SPAN_ROWS, 18), passes
    assert span * lo.groups * d * 2 <= 64 * 2**20, span


@pytest.mark.slow
def test_temp_memory_with_every_option_at_lm_shape():
    """N=8192, D=1024, V=131072 (issue 13): with every option on, the fused
    loss's temporaries stay within 64 MiB (the logits would be 4 GiB)."""
    segment_ids = jnp.repeat(jnp.arange(8), 1024).reshape(8, 1024)
    kw = dict(
        label_smoothing=0.1,
        class_weights=jnp.ones(131072),
        logit_softcap=30.0,
        temperature=0.9,
        return_aux=True,
        shift=1,
        ignore_index=-100,
        reduction="mean_per_segment",
    )

    def loss(x, w, y):
        out, aux = linear_cross_entropy(
            x, w, y, segment_ids=segment_ids, block_size=None, **kw
        )
        return out + 1e-3 * jnp.mean(aux.entropy)

    x = jax.ShapeDtypeStruct((8, 1024, 1024), jnp.float32)
    w = jax.ShapeDtypeStruct((1024, 131072), jnp.float32)
    y = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = step.lower(x, w, y).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 64 * 2**20, temp / 2**20


@pytest.mark.slow
def test_sharded_vocabulary_is_not_gathered():
    """Under jit with w sharded on V (4 CPU devices): no all-gather, same loss."""
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from xent_jax import linear_cross_entropy as lce
        mesh = jax.make_mesh((4,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(16, 1024)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 1024, 64), jnp.int32)
        ws = jax.device_put(w, NamedSharding(mesh, P(None, "v")))
        f = jax.jit(jax.value_and_grad(
            lambda x, w, y: lce(x, w, y, block_size=(32, 128)), argnums=(0, 1)))
        compiled = f.lower(x, ws, y).compile()  # once: its HLO and its values
        assert "all-gather" not in compiled.as_text(), "w was gathered"
        (v, (dx, dw)) = compiled(x, ws, y)
        (vr, (dxr, dwr)) = jax.value_and_grad(
            lambda x, w: lce(x, w, y, implementation="reference"), argnums=(0, 1)
        )(x, w)
        np.testing.assert_allclose(v, vr, rtol=1e-5)
        np.testing.assert_allclose(dw, dwr, rtol=1e-4, atol=1e-6)
        assert dw.sharding.spec == P(None, "v"), dw.sharding
        print("ok")
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("implementation", [None, "pallas_tpu", "pallas_triton"])
@pytest.mark.slow
def test_filtered_bfloat16_gradients_are_as_accurate_as_unfiltered(implementation):
    """Regression (found by the benchmark's realistic case): with
    ``filter_threshold`` the label term of dw and db is added after the loop
    (the Pallas kernels; the XLA loop now adds it per skipped block); it was
    scatter-added in bfloat16 one example at a time, so a frequent
    label's column of dw took one rounding per example (0.00806 for a true
    0.00422), and db's two parts were rounded separately before cancelling.
    Now each column takes one rounding, and db stays in float32 until the end:
    the filtered bfloat16 gradients are as close to float32 as the unfiltered."""
    rng = np.random.default_rng(0)
    n, d, v = 1024, 16, 64
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.1, jnp.bfloat16)
    b = jnp.zeros((v,), jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, 3, size=n))  # three very frequent labels

    def grads(dtype, **kw):
        def f(x, w, b):
            x, w, b = (a.astype(dtype) for a in (x, w, b))
            return linear_cross_entropy(
                x, w, y, bias=b, implementation=implementation, **kw
            )

        return jax.jit(jax.grad(f, argnums=(1, 2)))(x, w, b)

    exact = grads(jnp.float32)
    plain = grads(jnp.bfloat16)
    filtered = grads(jnp.bfloat16, filter_threshold=1e-30)
    for e, p, f in zip(exact, plain, filtered, strict=True):
        err_plain = float(jnp.max(jnp.abs(p.astype(jnp.float32) - e)))
        err_filtered = float(jnp.max(jnp.abs(f.astype(jnp.float32) - e)))
        assert err_filtered <= 2 * err_plain + 2**-12, (err_filtered, err_plain)


def test_filtered_bfloat16_empty_batch():
    """Found by the fuzzer: the per-column merge of the filter's label term
    (16-bit dw) built a length-1 mask for an empty batch and failed to trace."""
    x = jnp.zeros((0, 3), jnp.bfloat16)
    w = jnp.ones((3, 8), jnp.bfloat16)
    y = jnp.zeros((0,), jnp.int32)

    def f(x, w):
        return linear_cross_entropy(x, w, y, filter_threshold=1e-30, reduction="sum")

    dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    assert dx.shape == (0, 3) and np.all(np.asarray(dw, np.float32) == 0)


def test_bfloat16_dx_of_cancelling_terms_is_within_one_rounding_of_dz():
    """A fuzzer find (2026-12-07), the documented error model rather than a
    bug: the backward pass rounds the logits' gradient dz once, to the 16-bit
    products' inputs (docs/semantics.md), so a dx element that is a
    cancelling sum of dz terms carries that rounding whole. Here dz is -0.159
    and 0.159 at w = -2 and dx is -0.00029: bfloat16 gives -0.0019, within
    u * sum_c |dz_c| |w_dc| (u = 2^-8) and far outside a float32-eps bound,
    which the fuzzer's tolerance used to apply (fuzz_strategies._dz_rounding)."""
    x = np.array([[-0.75, -1.875, -1.75, -2.0]], np.float32)
    w = np.array(
        [
            [-0.375, 1.5, 0.25, -1.875, 1.125],
            [1.0, 1.375, -1.375, -1.75, 1.5],
            [-2.0, 0.125, -1.75, -0.875, -0.125],
            [-0.375, -0.375, -2.0, -2.0, -1.5],
        ],
        np.float32,
    )
    y = np.array([3], np.int32)
    z = x.astype(np.float64) @ w
    e = np.exp(z - z.max())
    p = e / e.sum()
    dz = -0.5 * (p - np.eye(5)[3])
    want = dz @ w.T.astype(np.float64)

    def loss(x):
        return linear_cross_entropy(
            x, jnp.asarray(w, jnp.bfloat16), y, reduction="none"
        )

    _, vjp = jax.vjp(loss, jnp.asarray(x, jnp.bfloat16))
    got = np.asarray(vjp(jnp.full((1,), -0.5, jnp.float32))[0], np.float64)
    bound = 2.0**-8 * (np.abs(dz) @ np.abs(w.T)) + 2.0**-7 * np.abs(want)
    assert np.all(np.abs(got - want) <= bound), (got, want, bound)
    assert np.abs(got - want)[0, 3] > 1e-3  # the rounding of dz, not of dx
