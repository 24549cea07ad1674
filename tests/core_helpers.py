"""Small helpers shared by the core-loss tests (data, tolerances, VJP checks)."""

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("custom_vjp", "reference")

# (rtol, atol) for comparing against the float32/float64 reference.
TOL = {
    jnp.dtype(jnp.float64): (1e-10, 1e-12),
    jnp.dtype(jnp.float32): (2e-5, 2e-6),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (5e-3, 5e-3),
}


def float64():
    """Context manager enabling float64: ``jax.enable_x64`` where it exists
    (recent jax), ``jax.experimental.enable_x64`` before."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def ulps(got, want, dtype):
    """``|got - want|`` in ulps of ``dtype`` at ``want`` (as float64 arrays;
    below the smallest normal, in its ulp)."""
    want = np.asarray(want, np.float64)
    got = np.asarray(got).astype(np.float64)
    info = jnp.finfo(dtype)
    magnitude = np.maximum(np.abs(want), float(info.smallest_normal))
    return np.abs(got - want) / 2.0 ** (np.floor(np.log2(magnitude)) - info.nmant)


def tol(dtype):
    rtol, atol = TOL[jnp.dtype(dtype)]
    return dict(rtol=rtol, atol=atol)


def rng(seed=0):
    return np.random.default_rng(seed)


def logits(shape, seed=0, dtype=jnp.float32, scale=2.0):
    return jnp.asarray(rng(seed).normal(size=shape) * scale, dtype)


def int_labels(shape, n_classes, seed=1):
    return jnp.asarray(rng(seed).integers(0, n_classes, size=shape), jnp.int32)


def soft_labels(shape, seed=2, axis=-1, normalised=True, dtype=jnp.float32):
    u = rng(seed).uniform(0.0, 1.0, size=shape)
    if normalised:
        u = u / u.sum(axis=axis, keepdims=True)
    return jnp.asarray(u, dtype)


def cotangent_like(x, seed=3):
    x = jnp.asarray(x)
    return jnp.asarray(rng(seed).normal(size=x.shape), x.dtype)


def assert_close(actual, expected, dtype=jnp.float32, **kw):
    t = tol(dtype)
    t.update(kw)
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), **t
    )


def check_value_and_vjp(
    f, f_ref, primals, argnums=(0,), seed=3, dtype=jnp.float32, jit=True
):
    """Values and VJPs (random cotangent) of f match f_ref w.r.t. argnums.

    Each side runs as one jitted program by default (compiling a whole
    function is much cheaper than compiling every primitive eagerly); the
    chex-variant tests cover the un-jitted path.
    """

    def restrict(fn):
        def g(*diff):
            args = list(primals)
            for i, a in zip(argnums, diff, strict=True):
                args[i] = a
            return fn(*args)

        return g

    diff = [primals[i] for i in argnums]
    out_shape = jax.eval_shape(restrict(f_ref), *diff)
    ct = cotangent_like(jnp.zeros(out_shape.shape, out_shape.dtype), seed)

    def run(fn, ct, *d):
        out, vjp = jax.vjp(restrict(fn), *d)
        return out, vjp(ct.astype(out.dtype))

    if jit:
        run = jax.jit(run, static_argnums=0)
    out, grads = run(f, ct, *diff)
    out_r, grads_r = run(f_ref, ct, *diff)
    assert out.shape == out_r.shape, (out.shape, out_r.shape)
    assert_close(out, out_r, dtype)
    for g, g_r in zip(grads, grads_r, strict=True):
        assert g.shape == g_r.shape
        assert_close(g, g_r, dtype)
    return out, grads


def value_and_vjps(f, args, argnums, ct, jit=True):
    """``f(*args)`` and its VJPs at ``ct`` w.r.t. ``args[i]``, i in
    ``argnums`` (one program; the other arguments, integer labels say, are
    passed through)."""
    argnums = tuple(argnums)

    def run(ct, *args):
        def g(*diff):
            full = list(args)
            for i, d in zip(argnums, diff, strict=True):
                full[i] = d
            return f(*full)

        out, vjp = jax.vjp(g, *(args[i] for i in argnums))
        return out, vjp(ct.astype(out.dtype))

    return (jax.jit(run) if jit else run)(ct, *args)
