"""optax-compatible extras and softmax_focal_loss.

safe_softmax_cross_entropy, poly_loss_cross_entropy, sigmoid_focal_loss,
kl_divergence, kl_divergence_with_log_targets and smooth_labels against optax
and the reference (values and VJPs with random cotangents); softmax_focal_loss
against the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from core_helpers import (
    assert_close,
    check_value_and_vjp,
    int_labels,
    logits,
    rng,
    soft_labels,
)

import xent_jax as xj

N, C = 6, 5


def _where_class(shape=(N, C), seed=8):
    keep = rng(seed).uniform(size=shape) < 0.7
    keep[..., 0] = True
    return jnp.asarray(keep)


# --- safe_softmax_cross_entropy -----------------------------------------------


def test_safe_softmax_cross_entropy_matches_optax_and_reference():
    x, t = logits((N, C)), soft_labels((N, C))
    check_value_and_vjp(
        xj.safe_softmax_cross_entropy,
        optax.losses.safe_softmax_cross_entropy,
        (x, t),
        argnums=(0, 1),
    )
    assert_close(xj.safe_softmax_cross_entropy(x, t), ref.safe_soft_xent(x, t))


@pytest.mark.slow
def test_safe_softmax_cross_entropy_neg_inf_with_zero_labels():
    x = jnp.array([[0.0, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, 2.0]])
    t = jnp.array([[0.3, 0.0, 0.7], [0.0, 0.0, 1.0]])
    out, vjp = jax.vjp(lambda v: xj.safe_softmax_cross_entropy(v, t), x)
    out_o = optax.losses.safe_softmax_cross_entropy(x, t)
    assert np.all(np.isfinite(out))
    assert_close(out, out_o)
    assert_close(out[1], 0.0)
    g = vjp(jnp.array([0.7, -1.3]))[0]
    assert np.all(np.isfinite(g))
    g_o = jax.vjp(lambda v: optax.losses.safe_softmax_cross_entropy(v, t), x)[1](
        jnp.array([0.7, -1.3])
    )[0]
    assert_close(g, g_o)


# --- poly_loss_cross_entropy --------------------------------------------------


@pytest.mark.parametrize(
    "eps, expected",
    [(2, [0.4823, 1.2567]), (0, [0.1698, 0.8247]), (-0.5, [0.0917, 0.7168])],
)
def test_poly_loss_optax_test_values(eps, expected):
    x = jnp.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]])
    t = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]])
    np.testing.assert_allclose(
        xj.poly_loss_cross_entropy(x, t, epsilon=eps), expected, atol=1e-4
    )


@pytest.mark.parametrize("variant", ["plain", "axis0", "where"])
def test_poly_loss_matches_optax(variant):
    x, t = logits((N, C)), soft_labels((N, C))
    kw = {}
    if variant == "axis0":
        x, t = logits((C, 2, 3)), soft_labels((C, 2, 3), axis=0)
        kw = dict(axis=0)
    elif variant == "where":
        kw = dict(where=_where_class())
    check_value_and_vjp(
        lambda v, u: xj.poly_loss_cross_entropy(v, u, epsilon=1.5, **kw),
        lambda v, u: optax.losses.poly_loss_cross_entropy(v, u, epsilon=1.5, **kw),
        (x, t),
        # optax's label gradient is NaN at masked classes; compare logits there.
        argnums=(0,) if variant == "where" else (0, 1),
    )
    if variant == "plain":
        assert_close(
            xj.poly_loss_cross_entropy(x, t, epsilon=1.5), ref.poly_loss(x, t, 1.5)
        )


# --- sigmoid_focal_loss -------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0])
def test_sigmoid_focal_matches_optax(alpha, gamma):
    x = logits((N, C))
    y = jnp.asarray(rng(4).uniform(size=(N, C)) > 0.5, jnp.float32)
    check_value_and_vjp(
        lambda v: xj.sigmoid_focal_loss(v, y, alpha=alpha, gamma=gamma),
        lambda v: optax.losses.sigmoid_focal_loss(v, y, alpha=alpha, gamma=gamma),
        (x,),
    )
    assert_close(
        xj.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma),
        ref.sigmoid_focal(x, y, alpha=alpha, gamma=gamma),
        rtol=1e-5,
        atol=1e-6,
    )


def test_sigmoid_focal_extreme_logits_finite_gradients():
    x = jnp.array([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    for y in (0.0, 1.0):
        g = jax.grad(
            lambda v, y=y: xj.sigmoid_focal_loss(v, jnp.full_like(v, y)).sum()
        )(x)
        assert np.all(np.isfinite(g))


# --- kl divergences, smooth_labels --------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "zeros", "axis0", "where"])
def test_kl_divergence_matches_optax(variant):
    lp = jax.nn.log_softmax(logits((N, C)))
    t = soft_labels((N, C))
    kw = {}
    if variant == "zeros":
        t = t.at[:, 1].set(0.0)
    elif variant == "axis0":
        lp = jax.nn.log_softmax(logits((C, 2, 3)), axis=0)
        t = soft_labels((C, 2, 3), axis=0)
        kw = dict(axis=0)
    elif variant == "where":
        kw = dict(where=_where_class())
    check_value_and_vjp(
        lambda a: xj.kl_divergence(a, t, **kw),
        lambda a: optax.losses.kl_divergence(a, t, **kw),
        (lp,),
    )
    if variant in ("plain", "zeros"):
        assert_close(xj.kl_divergence(lp, t), ref.kl_divergence(lp, t))


@pytest.mark.parametrize("variant", ["plain", "axis0", "where"])
def test_kl_divergence_with_log_targets_matches_optax(variant):
    lp = jax.nn.log_softmax(logits((N, C)))
    lt = jax.nn.log_softmax(logits((N, C), seed=5))
    kw = {}
    if variant == "axis0":
        lp = jax.nn.log_softmax(logits((C, 2, 3)), axis=0)
        lt = jax.nn.log_softmax(logits((C, 2, 3), seed=5), axis=0)
        kw = dict(axis=0)
    elif variant == "where":
        kw = dict(where=_where_class())
    check_value_and_vjp(
        lambda a, b: xj.kl_divergence_with_log_targets(a, b, **kw),
        lambda a, b: optax.losses.kl_divergence_with_log_targets(a, b, **kw),
        (lp, lt),
        argnums=(0, 1),
    )
    if variant == "plain":
        assert_close(
            xj.kl_divergence_with_log_targets(lp, lt),
            ref.kl_divergence_with_log_targets(lp, lt),
        )


@pytest.mark.parametrize("variant", ["plain", "axis0", "where"])
def test_smooth_labels_matches_optax(variant):
    t = jax.nn.one_hot(int_labels((N,), C), C)
    kw = {}
    if variant == "axis0":
        t = jnp.moveaxis(jax.nn.one_hot(int_labels((2, 3), C), C), -1, 0)
        kw = dict(axis=0)
    elif variant == "where":
        kw = dict(where=_where_class())
    out = xj.smooth_labels(t, 0.2, **kw)
    assert_close(out, optax.smooth_labels(t, 0.2, **kw), rtol=1e-6, atol=1e-7)
    if variant == "plain":
        assert_close(out, ref.smooth_labels(t, 0.2))


# --- softmax_focal_loss -------------------------------------------------------


def _alpha(kind):
    if kind == "none":
        return None
    if kind == "scalar":
        return 0.25
    return jnp.asarray(rng(9).uniform(0.1, 1.0, size=C), jnp.float32)


@pytest.mark.parametrize("alpha", ["none", "scalar", "per_class"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_focal_value_and_vjp(alpha, gamma):
    x, y = logits((N, C)), int_labels((N,), C)
    a = _alpha(alpha)
    check_value_and_vjp(
        lambda v: xj.softmax_focal_loss(v, y, gamma=gamma, alpha=a),
        lambda v: ref.softmax_focal(v, y, gamma=gamma, alpha=a),
        (x,),
    )


def test_softmax_focal_gamma0_equals_cross_entropy():
    x, y = logits((N, C)), int_labels((N,), C)
    assert_close(
        xj.softmax_focal_loss(x, y, gamma=0.0),
        xj.softmax_cross_entropy_with_integer_labels(x, y),
    )


@pytest.mark.parametrize("variant", ["ignore", "where_class", "where_example", "axis0"])
def test_softmax_focal_options(variant):
    x, y = logits((N, C)), int_labels((N,), C)
    kw = dict(gamma=2.0, alpha=_alpha("per_class"))
    if variant == "ignore":
        y = y.at[jnp.array([1, 4])].set(-100)
        kw["ignore_index"] = -100
    elif variant == "where_class":
        keep = np.array(_where_class())
        keep[np.arange(N), np.asarray(y)] = True
        keep[2] = False
        kw["where"] = jnp.asarray(keep)
    elif variant == "where_example":
        kw["where"] = jnp.asarray([True, False, True, True, False, True])
    elif variant == "axis0":
        x, y = logits((C, 2, 3)), int_labels((2, 3), C)
        kw["axis"] = 0
    out, (g,) = check_value_and_vjp(
        lambda v: xj.softmax_focal_loss(v, y, **kw),
        lambda v: ref.softmax_focal(v, y, **kw),
        (x,),
    )
    if variant == "ignore":
        assert out[1] == 0 and out[4] == 0
        assert np.all(np.asarray(g)[[1, 4]] == 0)


@pytest.mark.parametrize(
    "reduction, normalizer", [("sum", None), ("mean", None), ("mean", 2.5)]
)
@pytest.mark.slow
def test_softmax_focal_reductions(reduction, normalizer):
    x, y = logits((N, C)), int_labels((N,), C)
    y = y.at[jnp.array([1, 4])].set(-100)
    kw = dict(gamma=2.0, ignore_index=-100)

    def f(v):
        return xj.softmax_focal_loss(
            v, y, reduction=reduction, normalizer=normalizer, **kw
        )

    def fr(v):
        # Without alpha the mean divides by the number of non-ignored examples.
        return ref.reduce(ref.softmax_focal(v, y, **kw), reduction, N - 2, normalizer)

    val, g = jax.value_and_grad(f)(x)
    val_r, g_r = jax.value_and_grad(fr)(x)
    assert_close(val, val_r)
    assert_close(g, g_r)


@pytest.mark.slow
def test_softmax_focal_extreme_logits_finite():
    # Computed in log space: no clipped probabilities, no NaN/inf for confident
    # or very wrong predictions.
    x = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [50.0, 0.0, -50.0]])
    y = jnp.array([0, 0, 2])
    out, g = jax.value_and_grad(lambda v: xj.softmax_focal_loss(v, y).sum())(x)
    per = xj.softmax_focal_loss(x, y)
    assert np.all(np.isfinite(per)) and np.all(np.isfinite(g))
    assert_close(per[0], 0.0)
    assert_close(per[1], 2e4, rtol=1e-5)
    assert_close(per[2], 100.0, rtol=1e-5)
