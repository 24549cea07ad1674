"""Gradients under every transformation.

check_grads (reverse mode, second order) in float64 with respect to every
differentiable argument; values and VJPs of every differentiable argument
against the reference in float32 (the Pallas kernels too); jit, vmap over a
leading axis, grad-of-grad / Hessian-vector products, scan and remat against
the reference; forward mode raises on the custom_vjp kernels and works on
implementation="reference". Each check runs on every op x implementation of
``tests/ops.py`` that has the capabilities it needs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import ops
import pytest
from core_helpers import (
    assert_close,
    check_value_and_vjp,
    cotangent_like,
    float64,
    logits,
    rng,
    value_and_vjps,
)
from jax.test_util import check_grads
from ops import IGNORE

N, C = 4, 5
REDUCTIONS = ("none", "mean")


def _cw(dtype=jnp.float32):
    return jnp.asarray(rng(7).uniform(0.3, 2.0, size=C), dtype)


def _labels(op, batch):
    """``op``'s labels for ``batch`` examples; class ids ignored at
    ``[..., 1]`` where the op takes ``ignore_index``."""
    y = op.labels(batch, C, normalised=False)
    if op.has("ignore_index"):
        y = y.at[..., 1].set(IGNORE)
    return y


def _ct(op, shape, seed=3):
    return cotangent_like(jnp.zeros(op.out_shape(shape)), seed)


def _raw(op, names, fixed, fn=None, **kw):
    """``op`` (``fn``: its reference) as a function of the arrays ``names``."""
    fn = fn or op.raw

    def f(*values):
        return fn(dict(zip(names, values, strict=True)) | fixed, **kw)

    return f


# --- check_grads, float64, order 2, reverse mode ------------------------------


@ops.parametrize("float64", fast=("soft-xla",))
def test_check_grads_float64(op):
    # With respect to every differentiable argument (the logits, the fused
    # loss's x, w and bias, soft labels, class weights, BCE's weights and
    # pos_weight), of the per-example losses and of their mean, without
    # options ("plain": ignore_index only) and with all of them, in one
    # function (one compiled program).
    with float64():
        args, fixed = op.example(N, C, dtype=jnp.float64)
        names = tuple(args)
        plain = op.options(ignore_index=IGNORE)
        every = plain | op.options(
            label_smoothing=0.1, z_loss=0.05, where=jnp.array([True, True, True, False])
        )
        positional = [i for i, k in enumerate(names) if k in op.positional]
        pnames = tuple(names[i] for i in positional)
        plain_fns = [_raw(op, pnames, fixed, reduction=r, **plain) for r in REDUCTIONS]
        every_fns = [_raw(op, names, fixed, reduction=r, **every) for r in REDUCTIONS]

        @jax.jit
        def f(*a):
            p = [a[i] for i in positional]
            return [g(*p) for g in plain_fns] + [g(*a) for g in every_fns]

        check_grads(f, tuple(args.values()), order=2, modes=("rev",))
        assert all(out.dtype == jnp.float64 for out in f(*args.values()))


def test_x64_does_not_leak():
    assert jnp.zeros(1).dtype == jnp.float32


# --- every differentiable argument against the reference, float32 ------------


# Without float64 (the Pallas kernels) check_grads cannot run: their
# gradients are compared with the reference's instead.
@ops.parametrize(exclude=("float64",), pallas=True, fast=("linear-pallas_triton",))
def test_value_and_vjp_every_argument(op):
    args, fixed = op.example(N, C)
    kw = op.options(ignore_index=IGNORE, label_smoothing=0.1, z_loss=0.05)
    names = tuple(args)
    assert set(op.diff) == set(names)
    check_value_and_vjp(
        _raw(op, names, fixed, **kw),
        _raw(op, names, fixed, fn=op.raw_ref, **kw),
        tuple(args.values()),
        argnums=tuple(range(len(names))),
    )


# --- jit, vmap, grad compositions ---------------------------------------------


def _all_options(op):
    return op.options(
        ignore_index=IGNORE, label_smoothing=0.1, class_weights=_cw(), z_loss=0.01
    )


@ops.parametrize(fast=("soft-xla", "bce-xla", "bce-reference"))
def test_jit_and_vmap_over_leading_axis(op):
    # vmap a per-batch mean over a leading "device/micro-batch" axis.
    x = logits((3, N, C))
    y = _labels(op, (3, N))
    kw = _all_options(op)

    def f(v, lab):
        return op(v, lab, reduction="mean", **kw)

    @jax.jit  # one program for the three
    def batched(x, y):
        vals = jax.vmap(f)(x, y)
        grads = jax.vmap(jax.grad(f))(x, y)
        grads2 = jax.grad(lambda v: jax.vmap(f)(v, y).sum())(x)
        return vals, grads, grads2

    vals, grads, grads2 = batched(x, y)
    # The reference, one slice at a time (no vmap on the reference side). The
    # z-loss's mean divides by the count, the cross-entropy's by the sum of
    # class weights (issue 9, class 11).
    for i in range(3):
        val_r, g_r = ops.value_and_vjp(op, x[i], y[i], reduction="mean", ref=True, **kw)
        assert_close(vals[i], val_r)
        assert_close(grads[i], g_r)
        assert_close(grads2[i], g_r)


@ops.parametrize(fast=("soft-xla", "bce-xla"))
def test_vmap_none_reduction_and_in_axes_none(op):
    # Labels shared by the vmapped batch (in_axes None), gradients of both.
    x = logits((3, N, C))
    t = op.labels((N,), C)
    ct = _ct(op, x.shape)
    kw = op.options(z_loss=0.02)
    argnums = (0, 1) if op.has("label_grad") else (0,)

    def vmapped(fn):
        return lambda v, u: jax.vmap(lambda a, b: fn(a, b, **kw), (0, None))(v, u)

    out, grads = value_and_vjps(vmapped(op), (x, t), argnums, ct)
    out_r, grads_r = value_and_vjps(vmapped(op.ref), (x, t), argnums, ct)
    assert_close(out, out_r)
    for g, g_r in zip(grads, grads_r, strict=True):
        assert_close(g, g_r)


@functools.cache
def _grad_of_jit_case(kind):
    """Data, options and the reference's gradients and total (once per kind)."""
    ref = ops.get(kind, "reference")
    x = logits((3, N, C))
    y = _labels(ref, (3, N))
    kw = ref.options(label_smoothing=0.1, ignore_index=IGNORE)

    def fr(v, lab):
        return ref.ref(v, lab, reduction="mean", **kw)

    expected = jax.jit(jax.vmap(jax.grad(fr)))(x, y)
    total = jax.jit(jax.vmap(fr))(x, y).sum()
    return x, y, kw, expected, total


@ops.parametrize(fast=("bce-xla",))
def test_grad_of_jit_jit_of_grad_scan_and_remat(op):
    x, y, kw, expected, total_r = _grad_of_jit_case(op.kind)

    def f(v, lab):
        return op(v, lab, reduction="mean", **kw)

    g_jit_of_grad = jnp.stack([jax.jit(jax.grad(f))(x[i], y[i]) for i in range(3)])
    g_grad_of_jit = jnp.stack([jax.grad(jax.jit(f))(x[i], y[i]) for i in range(3)])

    def body(carry, xs):
        return carry + f(*xs), jax.grad(f)(*xs)

    total, g_scan = jax.lax.scan(body, 0.0, (x, y))
    g_remat = jax.jit(
        jax.grad(lambda v: sum(jax.checkpoint(f)(v[i], y[i]) for i in range(3)))
    )(x)
    for g in (g_jit_of_grad, g_grad_of_jit, g_scan, g_remat):
        assert_close(g, expected)
    assert_close(total, total_r)


@ops.parametrize()
def test_no_tracer_leaks(op):
    x, y = logits((N, C)), _labels(op, (N,))
    kw = op.options(class_weights=_cw(), ignore_index=IGNORE)
    with jax.checking_leaks():
        jax.jit(jax.grad(lambda v, lab: op(v, lab, reduction="mean", **kw)))(x, y)


# --- second order: Hessian-vector products as gradients of gradients ----------


def _hvp(loss, x, v):
    return jax.grad(lambda a: jnp.vdot(jax.grad(loss)(a), v))(x)


@functools.cache
def _hvp_case(kind):
    """Data, options and the reference's HVP (once per kind)."""
    ref = ops.get(kind, "reference")
    x = logits((N, C))
    v = cotangent_like(x, seed=10)
    w = _ct(ref, x.shape, seed=11)
    y = _labels(ref, (N,))
    kw = _all_options(ref) | ref.options(
        z_loss=0.05, pos_weight=jnp.linspace(0.5, 3.0, C)
    )
    expected = jax.jit(
        functools.partial(_hvp, lambda a: jnp.vdot(w, ref.ref(a, y, **kw)))
    )(x, v)
    return x, v, w, y, kw, expected


@ops.parametrize("second_order", fast=("soft-xla", "soft-reference"))
def test_hessian_vector_product_grad_of_grad(op):
    x, v, w, y, kw, expected = _hvp_case(op.kind)

    def loss(a):
        return jnp.vdot(w, op(a, y, **kw))

    assert_close(_hvp(loss, x, v), expected, rtol=1e-4, atol=1e-5)  # eager
    assert_close(
        jax.jit(functools.partial(_hvp, loss))(x, v), expected, rtol=1e-4, atol=1e-5
    )


# --- forward mode -------------------------------------------------------------


@ops.parametrize(exclude=("forward_mode",), pallas=True)
def test_forward_mode_raises_on_custom_vjp(op):
    x = logits((N, C))
    t = cotangent_like(x)
    y = op.labels((N,), C)
    with pytest.raises(TypeError, match="(?i)forward-mode|jvp"):
        jax.jvp(lambda v: op(v, y), (x,), (t,))


@pytest.mark.parametrize("kind", sorted({op.kind for op in ops.OPS}))
def test_forward_mode_raises_on_default_implementation(kind):
    op = ops.get(kind, "xla").default()
    x = logits((N, C))
    with pytest.raises(TypeError):
        jax.jvp(lambda v: op(v, op.labels((N,), C)), (x,), (cotangent_like(x),))


@ops.parametrize("forward_mode", composite=True, fast=("soft-reference",))
def test_forward_mode(op):
    x = logits((N, C))
    t = cotangent_like(x)
    y = op.labels((N,), C)
    # The reference implementation supports forward mode and jax.hessian.
    out, tan = jax.jvp(lambda v: op(v, y), (x,), (t,))
    _, vjp = jax.vjp(lambda v: op(v, y), x)
    # <J t, u> == <t, J^T u>
    u = cotangent_like(out, seed=5)
    np.testing.assert_allclose(jnp.vdot(tan, u), jnp.vdot(t, vjp(u)[0]), rtol=1e-4)
    h = jax.jit(jax.hessian(lambda v: op(v, y).sum()))(x)
    assert h.shape == x.shape + x.shape
    xla = ops.get(op.kind, "xla")
    h_rev = jax.jit(jax.jacrev(jax.grad(lambda v: xla(v, y).sum())))(x)
    assert_close(h, h_rev, rtol=1e-4, atol=1e-6)


@ops.parametrize(
    "forward_mode", composite=True, fast=("soft-reference", "bce-reference")
)
def test_reference_jvp_matches_reference_module(op):
    x, y = logits((N, C)), _labels(op, (N,))
    t = cotangent_like(x)
    kw = _all_options(op)
    _, tan = jax.jvp(lambda v: op(v, y, **kw), (x,), (t,))
    _, tan_r = jax.jvp(lambda v: op.ref(v, y, **kw), (x,), (t,))
    assert_close(tan, tan_r)


# --- gradient w.r.t. the labels (distillation) --------------------------------


@ops.parametrize("label_grad")
def test_distillation_gradient_through_teacher(op):
    # Gradients flow from the loss into a teacher that produces the labels.
    s, te = logits((N, C)), logits((N, C), seed=4)
    wct = _ct(op, s.shape)

    def f(a, b, fn):
        return jnp.vdot(wct, fn(a, op.probs(b)))

    gs = jax.jit(jax.grad(functools.partial(f, fn=op), argnums=(0, 1)))(s, te)
    gr = jax.jit(jax.grad(functools.partial(f, fn=op.ref), argnums=(0, 1)))(s, te)
    assert_close(gs[0], gr[0])
    assert_close(gs[1], gr[1])
    assert float(jnp.abs(gs[1]).max()) > 1e-3
