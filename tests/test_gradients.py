"""Gradients under every transformation.

check_grads (reverse mode, second order) in float64; jit, vmap over a leading
axis, grad-of-grad / Hessian-vector products, scan and remat against the
reference; forward mode raises on the custom_vjp and works on
implementation="reference".
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from core_helpers import (
    IMPLS,
    assert_close,
    cotangent_like,
    float64,
    int_labels,
    logits,
    rng,
    soft_labels,
)
from jax.test_util import check_grads

import xent_jax as xj

N, C = 4, 5


def _cw(dtype=jnp.float32):
    return jnp.asarray(rng(7).uniform(0.3, 2.0, size=C), dtype)


def _int_fn(impl, y, reduction="none", **kw):
    return functools.partial(
        xj.softmax_cross_entropy_with_integer_labels,
        labels=y,
        reduction=reduction,
        implementation=impl,
        **kw,
    )


# --- check_grads, float64, order 2, reverse mode ------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("opts", ["plain", "all"])
def test_check_grads_integer_float64(impl, reduction, opts):
    with float64():
        x = logits((N, C), dtype=jnp.float64)
        y = jnp.array([0, 3, -100, 2])
        kw = dict(ignore_index=-100)
        if opts == "all":
            kw.update(
                label_smoothing=0.1,
                class_weights=_cw(jnp.float64),
                z_loss=0.05,
                where=jnp.array([True, True, True, False]),
            )

        def f(v):
            return xj.softmax_cross_entropy_with_integer_labels(
                v, y, reduction=reduction, implementation=impl, **kw
            )

        check_grads(f, (x,), order=2, modes=("rev",))
        assert f(x).dtype == jnp.float64


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_check_grads_soft_float64(impl, reduction):
    with float64():
        x = logits((N, C), dtype=jnp.float64)
        t = soft_labels((N, C), normalised=False, dtype=jnp.float64)

        def f(v, u):
            return xj.softmax_cross_entropy(
                v,
                u,
                label_smoothing=0.1,
                class_weights=_cw(jnp.float64),
                z_loss=0.05,
                reduction=reduction,
                implementation=impl,
            )

        check_grads(f, (x, t), order=2, modes=("rev",))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_check_grads_bce_float64(impl, reduction):
    with float64():
        x = logits((N, C), dtype=jnp.float64)
        y = soft_labels((N, C), normalised=False, dtype=jnp.float64)

        def f(v):
            return xj.sigmoid_binary_cross_entropy(
                v,
                y,
                pos_weight=jnp.linspace(0.5, 3.0, C),
                label_smoothing=0.1,
                weights=jnp.linspace(0.1, 1.0, N)[:, None],
                reduction=reduction,
                implementation=impl,
            )

        check_grads(f, (x,), order=2, modes=("rev",))


def test_x64_does_not_leak():
    assert jnp.zeros(1).dtype == jnp.float32


# --- jit, vmap, grad compositions ---------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_and_vmap_over_leading_axis(impl):
    # vmap a per-batch mean over a leading "device/micro-batch" axis.
    x = logits((3, N, C))
    y = int_labels((3, N), C).at[1, 2].set(-100)
    kw = dict(ignore_index=-100, label_smoothing=0.1, class_weights=_cw(), z_loss=0.01)

    def f(v, lab):
        return xj.softmax_cross_entropy_with_integer_labels(
            v, lab, reduction="mean", implementation=impl, **kw
        )

    def fr(v, lab):
        # The z-loss's mean divides by the count, the cross-entropy's by the
        # sum of class weights (issue 9, class 11).
        return ref.mean_of_terms(ref.integer_xent_terms(v, lab, **kw))

    vals = jax.jit(jax.vmap(f))(x, y)
    grads = jax.jit(jax.vmap(jax.grad(f)))(x, y)
    grads2 = jax.jit(jax.grad(lambda v: jax.vmap(f)(v, y).sum()))(x)
    # The reference, one slice at a time (no vmap on the reference side).
    fr_vg = jax.jit(jax.value_and_grad(fr))
    for i in range(3):
        val_r, g_r = fr_vg(x[i], y[i])
        assert_close(vals[i], val_r)
        assert_close(grads[i], g_r)
        assert_close(grads2[i], g_r)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_none_reduction_and_in_axes_none(impl):
    x = logits((3, N, C))
    t = soft_labels((N, C))
    ct = cotangent_like(jnp.zeros((3, N)))

    def f(v, u):
        return xj.softmax_cross_entropy(v, u, z_loss=0.02, implementation=impl)

    out, vjp = jax.vjp(lambda v, u: jax.vmap(f, in_axes=(0, None))(v, u), x, t)
    out_r, vjp_r = jax.vjp(
        lambda v, u: jax.vmap(lambda a, b: ref.soft_xent(a, b, z_loss=0.02), (0, None))(
            v, u
        ),
        x,
        t,
    )
    assert_close(out, out_r)
    for g, g_r in zip(vjp(ct), vjp_r(ct), strict=True):
        assert_close(g, g_r)


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_of_jit_jit_of_grad_scan_and_remat(impl):
    x = logits((3, N, C))
    y = int_labels((3, N), C)

    def f(v, lab):
        return xj.softmax_cross_entropy_with_integer_labels(
            v, lab, reduction="mean", implementation=impl, label_smoothing=0.1
        )

    def fr(v, lab):
        return ref.integer_xent(v, lab, label_smoothing=0.1).mean()

    expected = jax.jit(jax.vmap(jax.grad(fr)))(x, y)
    g_jit_of_grad = jnp.stack([jax.jit(jax.grad(f))(x[i], y[i]) for i in range(3)])
    g_grad_of_jit = jnp.stack([jax.grad(jax.jit(f))(x[i], y[i]) for i in range(3)])

    def body(carry, xs):
        return carry + f(*xs), jax.grad(f)(*xs)

    total, g_scan = jax.lax.scan(body, 0.0, (x, y))
    g_remat = jax.grad(lambda v: sum(jax.checkpoint(f)(v[i], y[i]) for i in range(3)))(
        x
    )
    for g in (g_jit_of_grad, g_grad_of_jit, g_scan, g_remat):
        assert_close(g, expected)
    assert_close(total, sum(fr(x[i], y[i]) for i in range(3)))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tracer_leaks(impl):
    x, y = logits((N, C)), int_labels((N,), C)
    with jax.checking_leaks():
        jax.jit(
            jax.grad(
                lambda v, lab: xj.softmax_cross_entropy_with_integer_labels(
                    v, lab, reduction="mean", implementation=impl, class_weights=_cw()
                )
            )
        )(x, y)


# --- second order: Hessian-vector products as gradients of gradients ----------


def _hvp(loss, x, v):
    return jax.grad(lambda a: jnp.vdot(jax.grad(loss)(a), v))(x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["integer", "soft", "bce"])
def test_hessian_vector_product_grad_of_grad(impl, kind):
    x = logits((N, C))
    v = cotangent_like(x, seed=10)
    w = cotangent_like(jnp.zeros((N,)), seed=11)
    if kind == "integer":
        y = int_labels((N,), C).at[1].set(-100)
        kw = dict(
            ignore_index=-100, label_smoothing=0.1, class_weights=_cw(), z_loss=0.05
        )

        def loss(a):
            return jnp.vdot(
                w,
                xj.softmax_cross_entropy_with_integer_labels(
                    a, y, implementation=impl, **kw
                ),
            )

        def loss_r(a):
            return jnp.vdot(w, ref.integer_xent(a, y, **kw))
    elif kind == "soft":
        t = soft_labels((N, C), normalised=False)
        kw = dict(label_smoothing=0.1, class_weights=_cw(), z_loss=0.05)

        def loss(a):
            return jnp.vdot(
                w, xj.softmax_cross_entropy(a, t, implementation=impl, **kw)
            )

        def loss_r(a):
            return jnp.vdot(w, ref.soft_xent(a, t, **kw))
    else:
        y = soft_labels((N, C), normalised=False)
        kw = dict(pos_weight=jnp.linspace(0.5, 3.0, C), label_smoothing=0.1)

        def loss(a):
            return jnp.vdot(
                w[:, None] * jnp.ones((N, C)),
                xj.sigmoid_binary_cross_entropy(a, y, implementation=impl, **kw),
            )

        def loss_r(a):
            return jnp.vdot(w[:, None] * jnp.ones((N, C)), ref.bce(a, y, **kw))

    expected = jax.jit(functools.partial(_hvp, loss_r))(x, v)
    assert_close(_hvp(loss, x, v), expected, rtol=1e-4, atol=1e-5)
    assert_close(
        jax.jit(functools.partial(_hvp, loss))(x, v),
        _hvp(loss_r, x, v),
        rtol=1e-4,
        atol=1e-5,
    )


# --- forward mode -------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda x, impl: xj.softmax_cross_entropy_with_integer_labels(
            x, jnp.array([0, 1, 2, 3]), implementation=impl
        ),
        lambda x, impl: xj.softmax_cross_entropy(
            x, jax.nn.one_hot(jnp.array([0, 1, 2, 3]), C), implementation=impl
        ),
        lambda x, impl: xj.sigmoid_binary_cross_entropy(
            x, jnp.full((N, C), 0.3), implementation=impl
        ),
    ],
    ids=["integer", "soft", "bce"],
)
def test_forward_mode(call):
    x = logits((N, C))
    t = cotangent_like(x)
    with pytest.raises(TypeError, match="(?i)forward-mode|jvp"):
        jax.jvp(lambda v: call(v, "custom_vjp"), (x,), (t,))
    with pytest.raises(TypeError):
        jax.jvp(lambda v: call(v, None), (x,), (t,))
    # The reference implementation supports forward mode and jax.hessian.
    out, tan = jax.jvp(lambda v: call(v, "reference"), (x,), (t,))
    _, vjp = jax.vjp(lambda v: call(v, "reference"), x)
    # <J t, u> == <t, J^T u>
    u = cotangent_like(out, seed=5)
    np.testing.assert_allclose(jnp.vdot(tan, u), jnp.vdot(t, vjp(u)[0]), rtol=1e-4)
    h = jax.jit(jax.hessian(lambda v: call(v, "reference").sum()))(x)
    assert h.shape == x.shape + x.shape
    h_rev = jax.jit(jax.jacrev(jax.grad(lambda v: call(v, "custom_vjp").sum())))(x)
    assert_close(h, h_rev, rtol=1e-4, atol=1e-6)


def test_reference_jvp_matches_reference_module():
    x, y = logits((N, C)), int_labels((N,), C)
    t = cotangent_like(x)
    kw = dict(label_smoothing=0.1, class_weights=_cw(), z_loss=0.02)
    _, tan = jax.jvp(
        lambda v: xj.softmax_cross_entropy_with_integer_labels(
            v, y, implementation="reference", **kw
        ),
        (x,),
        (t,),
    )
    _, tan_r = jax.jvp(lambda v: ref.integer_xent(v, y, **kw), (x,), (t,))
    assert_close(tan, tan_r)


# --- gradient w.r.t. soft labels (distillation) -------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_distillation_gradient_through_teacher(impl):
    # Gradients flow from the loss into a teacher that produces the labels.
    s, te = logits((N, C)), logits((N, C), seed=4)
    wct = cotangent_like(jnp.zeros((N,)))

    def f(a, b, fn):
        return jnp.vdot(wct, fn(a, jax.nn.softmax(b)))

    gs = jax.grad(f, argnums=(0, 1))(
        s, te, functools.partial(xj.softmax_cross_entropy, implementation=impl)
    )
    gr = jax.grad(f, argnums=(0, 1))(s, te, ref.soft_xent)
    assert_close(gs[0], gr[0])
    assert_close(gs[1], gr[1])
    assert float(jnp.abs(gs[1]).max()) > 1e-3
