"""sigmoid_binary_cross_entropy: values, VJPs, options, reductions, optax parity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from absl.testing import parameterized
from core_helpers import (
    IMPLS,
    assert_close,
    check_value_and_vjp,
    cotangent_like,
    logits,
    rng,
)

import xent_jax as xj

SHAPE = (6, 5)


def _labels(shape=SHAPE, seed=4, hard=False):
    u = rng(seed).uniform(size=shape)
    if hard:
        u = (u > 0.5).astype(np.float64)
    return jnp.asarray(u, jnp.float32)


def bce_case(name):
    x, y, kw = logits(SHAPE), _labels(), {}
    if name == "plain":
        pass
    elif name == "hard_labels":
        y = _labels(hard=True)
    elif name == "pos_weight_vector":
        kw = dict(pos_weight=jnp.asarray(rng(5).uniform(0.5, 4.0, size=5), jnp.float32))
    elif name == "pos_weight_scalar":
        kw = dict(pos_weight=jnp.float32(3.0))
    elif name == "smoothing":
        kw = dict(label_smoothing=0.2)
    elif name == "weights_elementwise":
        kw = dict(weights=jnp.asarray(rng(6).uniform(0, 2, size=SHAPE), jnp.float32))
    elif name == "weights_broadcast":
        kw = dict(weights=jnp.asarray(rng(6).uniform(0, 2, size=(6, 1)), jnp.float32))
    elif name == "combined":
        kw = dict(
            pos_weight=jnp.asarray(rng(5).uniform(0.5, 4.0, size=5), jnp.float32),
            label_smoothing=0.1,
            weights=jnp.asarray(rng(6).uniform(0, 2, size=SHAPE), jnp.float32),
        )
    elif name == "3d_combined":
        x, y = logits((2, 3, 5)), _labels((2, 3, 5))
        kw = dict(
            pos_weight=jnp.asarray(rng(5).uniform(0.5, 4.0, size=5), jnp.float32),
            label_smoothing=0.1,
        )
    else:
        raise KeyError(name)
    return x, y, kw


BCE_CASES = [
    "plain",
    "hard_labels",
    "pos_weight_vector",
    "pos_weight_scalar",
    "smoothing",
    "weights_elementwise",
    "weights_broadcast",
    "combined",
    "3d_combined",
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", BCE_CASES)
def test_bce_value_and_vjp(impl, case):
    x, y, kw = bce_case(case)

    def f(v):
        return xj.sigmoid_binary_cross_entropy(v, y, implementation=impl, **kw)

    def fr(v):
        return ref.bce(v, y, **kw)

    out, (g,) = check_value_and_vjp(f, fr, (x,))
    assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.mark.parametrize("impl", IMPLS)
def test_bce_gradient_closed_form(impl):
    x, y, kw = bce_case("combined")
    pw, w = kw["pos_weight"], kw["weights"]
    ys = y * 0.9 + 0.05
    g = jax.grad(
        lambda v: xj.sigmoid_binary_cross_entropy(v, y, implementation=impl, **kw).sum()
    )(x)
    expected = w * ((pw * ys + 1 - ys) * jax.nn.sigmoid(x) - pw * ys)
    assert_close(g, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "preds, labels, expected",
    [
        ([-1e9, -1e-9], [1.0, 0.0], 5e8),
        ([-1e9, -1e-9], [0.0, 1.0], 0.3465736),
        ([1e9, 1e-9], [1.0, 0.0], 0.3465736),
        ([1e9, -1e-9], [0.0, 1.0], 5e8),
        ([0.0, 0.0], [1.0, 0.0], 0.6931472),
    ],
)
def test_bce_optax_test_values(impl, preds, labels, expected):
    out = xj.sigmoid_binary_cross_entropy(
        jnp.array(preds), jnp.array(labels), implementation=impl
    )
    np.testing.assert_allclose(jnp.mean(out), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hard", [False, True])
def test_bce_parity_with_optax(impl, hard):
    x, y = logits((2, 3, 5)), _labels((2, 3, 5), hard=hard)
    check_value_and_vjp(
        lambda v: xj.sigmoid_binary_cross_entropy(v, y, implementation=impl),
        lambda v: optax.losses.sigmoid_binary_cross_entropy(v, y),
        (x,),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_pos_weight_one_equals_none(impl):
    x, y, _ = bce_case("plain")
    f = xj.sigmoid_binary_cross_entropy
    a = f(x, y, implementation=impl)
    b = f(x, y, pos_weight=jnp.ones((5,)), implementation=impl)
    assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_pos_weight_broadcasts_along_last_axis(impl):
    x, y, _ = bce_case("plain")
    pw = jnp.arange(1.0, 6.0)
    out = xj.sigmoid_binary_cross_entropy(x, y, pos_weight=pw, implementation=impl)
    for c in range(5):
        col = xj.sigmoid_binary_cross_entropy(
            x[:, c], y[:, c], pos_weight=pw[c], implementation=impl
        )
        assert_close(out[:, c], col)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "reduction, normalizer", [("sum", None), ("mean", None), ("mean", 7.0)]
)
@pytest.mark.parametrize("case", ["plain", "combined"])
def test_bce_reductions(impl, reduction, normalizer, case):
    x, y, kw = bce_case(case)

    def f(v):
        return xj.sigmoid_binary_cross_entropy(
            v, y, reduction=reduction, normalizer=normalizer, implementation=impl, **kw
        )

    def fr(v):
        # BCE "mean" divides by the number of elements; weights not included.
        return ref.reduce(ref.bce(v, y, **kw), reduction, x.size, normalizer)

    val, g = jax.value_and_grad(f)(x)
    val_r, g_r = jax.value_and_grad(fr)(x)
    assert val.shape == ()
    assert_close(val, val_r)
    assert_close(g, g_r)


class BCEVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*IMPLS)
    def test_value_and_grad(self, impl):
        x, y, kw = bce_case("combined")

        @self.variant
        def f(v, lab):
            return xj.sigmoid_binary_cross_entropy(v, lab, implementation=impl, **kw)

        out = f(x, y)
        ct = cotangent_like(out)
        g = jax.vjp(lambda v: f(v, y), x)[1](ct)[0]
        g_r = jax.vjp(lambda v: ref.bce(v, y, **kw), x)[1](ct)[0]
        chex.assert_trees_all_close(out, ref.bce(x, y, **kw), rtol=2e-5, atol=2e-6)
        chex.assert_trees_all_close(g, g_r, rtol=2e-5, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*IMPLS)
    def test_mean_value_and_grad(self, impl):
        x, y, kw = bce_case("combined")

        @self.variant
        def f(v, lab):
            return xj.sigmoid_binary_cross_entropy(
                v, lab, reduction="mean", implementation=impl, **kw
            )

        val, g = jax.value_and_grad(f)(x, y)
        val_r, g_r = jax.value_and_grad(lambda v: ref.bce(v, y, **kw).mean())(x)
        chex.assert_trees_all_close((val, g), (val_r, g_r), rtol=2e-5, atol=2e-6)
