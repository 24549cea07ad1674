"""Self-tests of the independent reference (tests/reference.py).

These pin the reference to hand-computed numbers, optax's documented outputs
and PyTorch's F.cross_entropy formula, so that the package can be checked
against it with confidence.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref


def test_hand_computed_value_and_gradient():
    logits = jnp.array([1.0, 2.0, 0.5])
    loss, grad = jax.value_and_grad(lambda x: ref.integer_xent(x, jnp.array(1)))(logits)
    np.testing.assert_allclose(loss, 0.46437, atol=1e-5)
    np.testing.assert_allclose(grad, [0.23122, -0.37147, 0.14024], atol=1e-5)


def test_optax_docstring_example():
    logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    onehot = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(
        ref.soft_xent(logits, onehot), [0.2761, 2.9518], atol=1e-4
    )
    np.testing.assert_allclose(
        ref.integer_xent(logits, jnp.array([0, 1])), [0.2761, 2.9518], atol=1e-4
    )


@pytest.mark.slow
def test_optax_docstring_axis_tuple_example():
    shape = (1, 2, 3, 4)
    logits = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    labels = jnp.ravel_multi_index((jnp.array([[1, 2]]), jnp.array([[1, 3]])), (3, 4))
    np.testing.assert_allclose(
        ref.integer_xent(logits, labels, axis=(2, 3)), [[6.4587, 0.4587]], atol=1e-4
    )


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
def test_bce_optax_values(preds, labels, expected):
    # Values from optax's SigmoidCrossEntropyTest.
    out = jnp.mean(ref.bce(jnp.array(preds), jnp.array(labels)))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_bce_pos_weight_and_smoothing_by_hand():
    x, y, pw, a, w = 0.3, 0.8, 2.5, 0.2, 0.7
    ys = y * (1 - a) + a / 2
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    expected = w * (pw * ys * sp(-x) + (1 - ys) * sp(x))
    got = ref.bce(
        jnp.array([x]),
        jnp.array([y]),
        pos_weight=jnp.array([pw]),
        label_smoothing=a,
        weights=jnp.array([w]),
    )
    np.testing.assert_allclose(got, [expected], rtol=1e-6)
    sig = 1 / (1 + np.exp(-x))
    g = jax.grad(
        lambda z: ref.bce(
            z, jnp.array([y]), pos_weight=pw, label_smoothing=a, weights=w
        ).sum()
    )(jnp.array([x]))
    np.testing.assert_allclose(g, [w * ((pw * ys + 1 - ys) * sig - pw * ys)], rtol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_integer_matches_pytorch_formula(label_smoothing, weighted, reduction):
    rng = np.random.default_rng(0)
    n, c = 7, 5
    logits = rng.normal(size=(n, c)) * 2
    labels = rng.integers(0, c, size=n)
    labels[[1, 4]] = -100
    weight = rng.uniform(0.2, 2.0, size=c) if weighted else None
    expected = ref.torch_cross_entropy_np(
        logits, labels, weight, -100, label_smoothing, reduction
    )
    kw = dict(ignore_index=-100, label_smoothing=label_smoothing, class_weights=weight)
    per = ref.integer_xent(jnp.asarray(logits, jnp.float32), labels, **kw)
    den = ref.integer_mean_denominator(labels, ignore_index=-100, class_weights=weight)
    got = ref.reduce(per, reduction, den)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


def test_pytorch_formula_by_hand():
    # One example, weights and smoothing, worked out explicitly.
    x = np.array([[0.5, -1.0, 2.0]])
    w = np.array([0.5, 2.0, 1.0])
    lp = x - np.log(np.exp(x).sum())
    e = 0.3
    expected = ((1 - e) * -w[1] * lp[0, 1] + e / 3 * -(w * lp[0]).sum()) / w[1]
    got = ref.torch_cross_entropy_np(x, np.array([1]), w, -100, e, "mean")
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.slow
def test_soft_gradient_closed_form_unnormalised_targets():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=(4, 6)), jnp.float32)  # rows do not sum to 1
    z = 0.05
    g = jax.grad(lambda v: ref.soft_xent(v, t, z_loss=z).sum())(x)
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    expected = (t.sum(-1, keepdims=True) + 2 * z * lse) * jax.nn.softmax(x) - t
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
    gl = jax.grad(lambda v: ref.soft_xent(x, v, label_smoothing=0.2).sum())(t)
    np.testing.assert_allclose(gl, 0.8 * (lse - x), rtol=1e-5)


@pytest.mark.slow
def test_where_and_inf_conventions():
    x = jnp.array([[1.0, -jnp.inf, 0.5], [3.0, 2.0, 1.0]])
    keep = jnp.array([[True, True, True], [False, False, False]])
    loss, g = jax.value_and_grad(
        lambda v: ref.integer_xent(v, jnp.array([0, 1]), where=keep).sum()
    )(x)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-0.5)), rtol=1e-6)
    assert np.all(np.isfinite(g)) and np.all(g[1] == 0)
    # Per-class where: lse only over kept classes, smoothing over C_row = 2.
    keep2 = jnp.array([[True, False, True], [True, True, True]])
    got = ref.integer_xent(x, jnp.array([0, 1]), where=keep2, label_smoothing=0.2)
    lse0 = np.log(np.exp(1.0) + np.exp(0.5))
    exp0 = 0.8 * (lse0 - 1.0) + 0.1 * ((lse0 - 1.0) + (lse0 - 0.5))
    np.testing.assert_allclose(got[0], exp0, rtol=1e-6)


@pytest.mark.slow
def test_reference_matches_optax():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, size=(3, 4)))
    np.testing.assert_allclose(
        ref.integer_xent(x, y),
        optax.losses.softmax_cross_entropy_with_integer_labels(x, y),
        rtol=1e-6,
    )
    t = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32), axis=1)
    np.testing.assert_allclose(
        ref.soft_xent(x, t, axis=1),
        optax.losses.softmax_cross_entropy(x, t, axis=1),
        rtol=1e-6,
    )
    yb = jnp.asarray(rng.uniform(size=(3, 4, 5)), jnp.float32)
    np.testing.assert_allclose(
        ref.bce(x, yb), optax.losses.sigmoid_binary_cross_entropy(x, yb), rtol=1e-6
    )
    np.testing.assert_allclose(
        ref.sigmoid_focal(x, yb, alpha=0.3, gamma=1.5),
        optax.losses.sigmoid_focal_loss(x, yb, alpha=0.3, gamma=1.5),
        rtol=1e-5,
    )
