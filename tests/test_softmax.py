"""softmax_cross_entropy and softmax_cross_entropy_with_integer_labels.

Values and VJPs (random per-example cotangent) against the independent
reference for every option and implementation, reductions, and parity with
optax for what optax shares.
"""

import functools

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
    int_labels,
    logits,
    rng,
    soft_labels,
)

import xent_jax as xj

N, C = 6, 5

# --- case builders ------------------------------------------------------------


def _class_weights(c=C, seed=7):
    return jnp.asarray(rng(seed).uniform(0.3, 2.0, size=c), jnp.float32)


def _per_class_where(shape, labels=None, seed=8, full_row=2):
    keep = rng(seed).uniform(size=shape) < 0.6
    if labels is not None:  # keep the target class where the label is valid
        lab = np.asarray(labels)
        ok = (lab >= 0) & (lab < shape[-1])
        idx = np.nonzero(ok)
        keep[idx + (lab[ok],)] = True
    keep[..., 0] |= ~keep.any(-1)  # at least one kept class ...
    if full_row is not None:
        keep[full_row] = False  # ... except one fully masked row
    return jnp.asarray(keep)


def _ignore(labels, positions=(1, 4), value=-100):
    lab = np.array(labels)
    lab[list(positions)] = value
    return jnp.asarray(lab)


def int_case(name):
    """Returns (logits, labels, axis, where, kwargs)."""
    x = logits((N, C))
    y = int_labels((N,), C)
    axis, where, kw = -1, None, {}
    if name == "plain":
        pass
    elif name == "smoothing":
        kw = dict(label_smoothing=0.15)
    elif name == "class_weights":
        kw = dict(class_weights=_class_weights())
    elif name == "z_loss":
        kw = dict(z_loss=0.05)
    elif name == "ignore_neg":
        y = _ignore(y)
        kw = dict(ignore_index=-100)
    elif name == "ignore_pad0":
        y = y.at[3].set(0)
        kw = dict(ignore_index=0)
    elif name == "where_class":
        where = _per_class_where((N, C), y)
    elif name == "where_example":
        where = jnp.asarray([True, False, True, True, False, True])
    elif name == "combined":
        y = _ignore(y)
        where = _per_class_where((N, C), y)
        kw = dict(
            ignore_index=-100,
            label_smoothing=0.2,
            class_weights=_class_weights(),
            z_loss=0.03,
        )
    elif name == "axis0_3d":
        x = logits((C, 2, 3))
        y = int_labels((2, 3), C)
        axis = 0
        kw = dict(label_smoothing=0.1, class_weights=_class_weights())
    elif name == "axis1_3d_where":
        x = logits((2, C, 3))
        y = int_labels((2, 3), C)
        axis = 1
        keep = np.asarray(rng(9).uniform(size=(2, C, 3)) < 0.7)
        keep[np.arange(2)[:, None], np.asarray(y), np.arange(3)[None, :]] = True
        where = jnp.asarray(keep)
        kw = dict(label_smoothing=0.1)
    elif name == "axis_tuple":
        x = logits((2, 3, 2, 4))
        y = int_labels((2, 2), 12)
        axis = (1, 3)
    elif name == "axis_tuple_opts":
        x = logits((2, 3, 2, 4))
        y = _ignore(int_labels((2, 2), 12), positions=(1,))
        axis = (1, 3)
        kw = dict(
            ignore_index=-100,
            label_smoothing=0.1,
            class_weights=_class_weights(12),
            z_loss=0.02,
        )
    else:
        raise KeyError(name)
    return x, y, axis, where, kw


INT_CASES = [
    "plain",
    "smoothing",
    "class_weights",
    "z_loss",
    "ignore_neg",
    "ignore_pad0",
    "where_class",
    "where_example",
    "combined",
    "axis0_3d",
    "axis1_3d_where",
    "axis_tuple",
    "axis_tuple_opts",
]


def soft_case(name):
    """Returns (logits, labels, axis, where, kwargs)."""
    x = logits((N, C))
    t = soft_labels((N, C))
    axis, where, kw = -1, None, {}
    if name == "plain":
        pass
    elif name == "unnormalised":
        t = soft_labels((N, C), normalised=False) * 1.7
    elif name == "smoothing":
        kw = dict(label_smoothing=0.2)
    elif name == "class_weights":
        kw = dict(class_weights=_class_weights())
    elif name == "z_loss":
        kw = dict(z_loss=0.05)
    elif name == "where_class":
        where = _per_class_where((N, C))
    elif name == "where_example":
        where = jnp.asarray([True, True, False, True, True, False])
    elif name == "combined":
        t = soft_labels((N, C), normalised=False)
        where = _per_class_where((N, C))
        kw = dict(label_smoothing=0.1, class_weights=_class_weights(), z_loss=0.02)
    elif name == "axis0_3d":
        x = logits((C, 2, 3))
        t = soft_labels((C, 2, 3), axis=0)
        axis = 0
        kw = dict(label_smoothing=0.1)
    elif name == "axis_tuple":
        x = logits((2, 3, 2, 4))
        t = soft_labels((2, 3, 2, 4), normalised=False)
        axis = (1, 3)
        kw = dict(label_smoothing=0.1, class_weights=_class_weights(12))
    else:
        raise KeyError(name)
    return x, t, axis, where, kw


SOFT_CASES = [
    "plain",
    "unnormalised",
    "smoothing",
    "class_weights",
    "z_loss",
    "where_class",
    "where_example",
    "combined",
    "axis0_3d",
    "axis_tuple",
]


def _soft_den(x, axis, where):
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % x.ndim for a in axes)
    n_examples = int(np.prod([s for i, s in enumerate(x.shape) if i not in axes]))
    if where is None:
        return n_examples
    w = np.asarray(where)
    if w.ndim == x.ndim:
        w = w.any(axis=axes)
    return int(w.sum())


# --- hand-computed values -----------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_integer(impl):
    x = jnp.array([[1.0, 2.0, 0.5]])
    f = functools.partial(
        xj.softmax_cross_entropy_with_integer_labels, implementation=impl
    )
    loss, g = jax.value_and_grad(lambda v: f(v, jnp.array([1]))[0])(x)
    np.testing.assert_allclose(loss, 0.46437, atol=1e-5)
    np.testing.assert_allclose(g[0], [0.23122, -0.37147, 0.14024], atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_soft(impl):
    x = jnp.array([[1.0, 2.0, 0.5]])
    t = jnp.array([[0.0, 1.0, 0.0]])
    loss, g = jax.value_and_grad(
        lambda v: xj.softmax_cross_entropy(v, t, implementation=impl)[0]
    )(x)
    np.testing.assert_allclose(loss, 0.46437, atol=1e-5)
    np.testing.assert_allclose(g[0], [0.23122, -0.37147, 0.14024], atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_optax_docstring_values(impl):
    x = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    expected = [0.2761, 2.9518]
    out_i = xj.softmax_cross_entropy_with_integer_labels(
        x, jnp.array([0, 1]), implementation=impl
    )
    out_s = xj.softmax_cross_entropy(
        x, jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), implementation=impl
    )
    np.testing.assert_allclose(out_i, expected, atol=1e-4)
    np.testing.assert_allclose(out_s, expected, atol=1e-4)


@pytest.mark.slow
def test_default_implementation_is_custom_vjp():
    x, y, axis, where, kw = int_case("combined")
    f = xj.softmax_cross_entropy_with_integer_labels
    g0 = jax.grad(lambda v: f(v, y, axis, where, **kw).sum())(x)
    g1 = jax.grad(
        lambda v: f(v, y, axis, where, implementation="custom_vjp", **kw).sum()
    )(x)
    np.testing.assert_array_equal(g0, g1)


# --- every option, reduction="none", random cotangent -------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", INT_CASES)
def test_integer_value_and_vjp(impl, case):
    x, y, axis, where, kw = int_case(case)

    def f(v):
        return xj.softmax_cross_entropy_with_integer_labels(
            v, y, axis, where, implementation=impl, **kw
        )

    def fr(v):
        return ref.integer_xent(v, y, axis, where, **kw)

    out, (g,) = check_value_and_vjp(f, fr, (x,))
    assert out.dtype == jnp.float32 and g.dtype == x.dtype


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SOFT_CASES)
def test_soft_value_and_vjp_logits_and_labels(impl, case):
    x, t, axis, where, kw = soft_case(case)

    def f(v, u):
        return xj.softmax_cross_entropy(v, u, axis, where, implementation=impl, **kw)

    def fr(v, u):
        return ref.soft_xent(v, u, axis, where, **kw)

    out, (gx, gt) = check_value_and_vjp(f, fr, (x, t), argnums=(0, 1))
    assert gx.shape == x.shape and gt.shape == t.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_soft_label_gradient_closed_form(impl):
    # dloss/dlabels_c = (1 - a) w_c (lse - x_c) keep_c, also for unnormalised labels.
    x, t, _, _, _ = soft_case("unnormalised")
    w = _class_weights()
    a = 0.25
    g = jax.grad(
        lambda u: xj.softmax_cross_entropy(
            x, u, label_smoothing=a, class_weights=w, implementation=impl
        ).sum()
    )(t)
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    assert_close(g, (1 - a) * w * (lse - x))


@pytest.mark.parametrize("impl", IMPLS)
def test_soft_gradient_rows_with_unnormalised_targets(impl):
    # softmax * sum(t) - t, exact also when the targets do not sum to one.
    x, t, _, _, _ = soft_case("unnormalised")
    g = jax.grad(lambda v: xj.softmax_cross_entropy(v, t, implementation=impl).sum())(x)
    expected = jax.nn.softmax(x) * t.sum(-1, keepdims=True) - t
    assert_close(g, expected)


# --- reductions ---------------------------------------------------------------


REDUCTIONS = [("sum", None), ("mean", None), ("mean", 3.5)]


def _normalizer_for(normalizer, kw):
    """With class weights and a z-loss the mean has two denominators: a
    scalar normalizer is ambiguous there, so the test passes a pair."""
    if normalizer is not None and "class_weights" in kw and kw.get("z_loss"):
        return (normalizer, normalizer - 1.0)
    return normalizer


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction, normalizer", REDUCTIONS)
@pytest.mark.parametrize("case", ["plain", "combined", "axis_tuple_opts"])
def test_integer_reductions(impl, reduction, normalizer, case):
    x, y, axis, where, kw = int_case(case)
    normalizer = _normalizer_for(normalizer, kw)

    def f(v):
        return xj.softmax_cross_entropy_with_integer_labels(
            v,
            y,
            axis,
            where,
            reduction=reduction,
            normalizer=normalizer,
            implementation=impl,
            **kw,
        )

    def fr(v):
        terms = ref.integer_xent_terms(v, y, axis, where, **kw)
        return ref.reduce_terms(terms, reduction, normalizer)

    val, g = jax.value_and_grad(f)(x)
    val_r, g_r = jax.value_and_grad(fr)(x)
    assert val.shape == ()
    assert_close(val, val_r)
    assert_close(g, g_r)


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_mean_is_pytorch_weighted_mean(impl):
    r = rng(11)
    x = r.normal(size=(9, 7)) * 2
    y = r.integers(0, 7, size=9)
    y[[0, 5]] = -100
    w = r.uniform(0.2, 3.0, size=7)
    expected = ref.torch_cross_entropy_np(x, y, w, -100, 0.1, "mean")
    got = xj.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y),
        ignore_index=-100,
        class_weights=jnp.asarray(w, jnp.float32),
        label_smoothing=0.1,
        reduction="mean",
        implementation=impl,
    )
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    # ... which differs from the plain mean of the unreduced losses.
    per = xj.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y),
        ignore_index=-100,
        class_weights=jnp.asarray(w, jnp.float32),
        label_smoothing=0.1,
        implementation=impl,
    )
    assert abs(float(per.mean()) - float(expected)) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction, normalizer", REDUCTIONS)
@pytest.mark.parametrize("case", ["plain", "combined", "where_example"])
def test_soft_reductions(impl, reduction, normalizer, case):
    x, t, axis, where, kw = soft_case(case)
    den = _soft_den(x, axis, where)

    def f(v, u):
        return xj.softmax_cross_entropy(
            v,
            u,
            axis,
            where,
            reduction=reduction,
            normalizer=normalizer,
            implementation=impl,
            **kw,
        )

    def fr(v, u):
        return ref.reduce(
            ref.soft_xent(v, u, axis, where, **kw), reduction, den, normalizer
        )

    val, g = jax.value_and_grad(f, argnums=(0, 1))(x, t)
    val_r, g_r = jax.value_and_grad(fr, argnums=(0, 1))(x, t)
    assert_close(val, val_r)
    assert_close(g[0], g_r[0])
    assert_close(g[1], g_r[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_soft_mean_with_class_weights_divides_by_examples(impl):
    # PyTorch: probability targets' mean divides by the number of examples,
    # not by a weight sum.
    x, t, _, _, _ = soft_case("plain")
    w = _class_weights()
    per = ref.soft_xent(x, t, class_weights=w)
    got = xj.softmax_cross_entropy(
        x, t, class_weights=w, reduction="mean", implementation=impl
    )
    assert_close(got, per.sum() / N)


@pytest.mark.parametrize("impl", IMPLS)
def test_reduction_none_is_default(impl):
    x, y, *_ = int_case("plain")
    f = xj.softmax_cross_entropy_with_integer_labels
    np.testing.assert_array_equal(
        f(x, y, implementation=impl), f(x, y, reduction="none", implementation=impl)
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.slow
def test_gradient_accumulation_with_normalizer(impl):
    # sum over micro-batches of mean(normalizer=global count) == full-batch mean.
    r = rng(12)
    x = jnp.asarray(r.normal(size=(8, C)), jnp.float32)
    y = np.asarray(r.integers(0, C, size=8))
    y[[0, 1, 2, 6]] = -100  # unequal numbers of ignored tokens per micro-batch
    y = jnp.asarray(y)
    w = _class_weights()
    kw = dict(ignore_index=-100, class_weights=w, implementation=impl)
    f = xj.softmax_cross_entropy_with_integer_labels

    full, g_full = jax.value_and_grad(lambda v: f(v, y, reduction="mean", **kw))(x)
    n_global = jnp.sum(jnp.where(y != -100, w[jnp.where(y != -100, y, 0)], 0.0))

    def micro(v, sl):
        return f(v[sl], y[sl], reduction="mean", normalizer=n_global, **kw)

    acc = 0.0
    g_acc = jnp.zeros_like(x)
    for sl in (slice(0, 4), slice(4, 8)):
        val, g = jax.value_and_grad(micro)(x, sl)
        acc += val
        g_acc += g
    assert_close(acc, full)
    assert_close(g_acc, g_full)
    # The naive sum of per-micro-batch means differs.
    naive = sum(
        f(x[sl], y[sl], reduction="mean", **kw) for sl in (slice(0, 4), slice(4, 8))
    )
    assert abs(float(naive) / 2 - float(full)) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("soft", [False, True])
def test_all_ignored_or_masked_mean_is_zero_with_zero_grad(impl, soft):
    x = logits((N, C))
    if soft:
        t = soft_labels((N, C))
        where = jnp.zeros((N,), bool)

        def f(v):
            return xj.softmax_cross_entropy(
                v, t, where=where, reduction="mean", implementation=impl
            )
    else:
        y = jnp.full((N,), -100)

        def f(v):
            return xj.softmax_cross_entropy_with_integer_labels(
                v, y, ignore_index=-100, reduction="mean", implementation=impl
            )

    val, g = jax.jit(jax.value_and_grad(f))(x)
    assert float(val) == 0.0
    np.testing.assert_array_equal(g, jnp.zeros_like(x))


# --- parity with optax --------------------------------------------------------


def _optax_int_cases():
    x3 = logits((2, C, 3))
    y3 = int_labels((2, 3), C)
    x4 = logits((2, 3, 2, 4))
    y4 = int_labels((2, 2), 12)
    x, y = logits((N, C)), int_labels((N,), C)
    wc = _per_class_where((N, C), y, full_row=None)
    we = jnp.asarray([True, False, True, True, True, False])
    return {
        "plain": (x, y, -1, None),
        "axis1": (x3, y3, 1, None),
        "axis_tuple": (x4, y4, (1, 3), None),
        "where_class": (x, y, -1, wc),
        "where_example": (x, y, -1, we),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case", ["plain", "axis1", "axis_tuple", "where_class", "where_example"]
)
def test_integer_parity_with_optax(impl, case):
    x, y, axis, where = _optax_int_cases()[case]

    def f(v):
        return xj.softmax_cross_entropy_with_integer_labels(
            v, y, axis, where, implementation=impl
        )

    def fo(v):
        return optax.losses.softmax_cross_entropy_with_integer_labels(v, y, axis, where)

    check_value_and_vjp(f, fo, (x,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["plain", "axis0", "where_class", "where_example"])
def test_soft_parity_with_optax(impl, case):
    x, t = logits((N, C)), soft_labels((N, C))
    axis, where = -1, None
    if case == "axis0":
        x, t, axis = logits((C, 2, 3)), soft_labels((C, 2, 3), axis=0), 0
    elif case == "where_class":
        where = _per_class_where((N, C), full_row=None)
        t = t * where
    elif case == "where_example":
        where = jnp.asarray([True, False, True, True, True, False])

    def f(v, u):
        return xj.softmax_cross_entropy(v, u, axis, where, implementation=impl)

    def fo(v, u):
        return optax.losses.softmax_cross_entropy(v, u, axis, where)

    # optax's label gradient is NaN in fully masked rows; compare logits only.
    argnums = (0, 1) if where is None else (0,)
    check_value_and_vjp(f, fo, (x, t), argnums=argnums)


# --- chex variants: with and without jit --------------------------------------


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*IMPLS)
    def test_integer_value_and_grad(self, impl):
        x, y, axis, where, kw = int_case("combined")

        @self.variant
        def f(v, lab):
            return xj.softmax_cross_entropy_with_integer_labels(
                v, lab, axis, where, implementation=impl, **kw
            )

        out = f(x, y)
        ct = cotangent_like(out)
        chex.assert_trees_all_close(
            out, ref.integer_xent(x, y, axis, where, **kw), rtol=2e-5, atol=2e-6
        )
        g = jax.vjp(lambda v: f(v, y), x)[1](ct)[0]
        g_r = jax.vjp(lambda v: ref.integer_xent(v, y, axis, where, **kw), x)[1](ct)[0]
        chex.assert_trees_all_close(g, g_r, rtol=2e-5, atol=2e-6)
        chex.assert_type(out, jnp.float32)
        chex.assert_shape(g, x.shape)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*IMPLS)
    def test_soft_value_and_grad(self, impl):
        x, t, axis, where, kw = soft_case("combined")

        @self.variant
        def f(v, u):
            return xj.softmax_cross_entropy(
                v, u, axis, where, implementation=impl, **kw
            )

        out = f(x, t)
        ct = cotangent_like(out)
        chex.assert_trees_all_close(
            out, ref.soft_xent(x, t, axis, where, **kw), rtol=2e-5, atol=2e-6
        )
        g = jax.vjp(f, x, t)[1](ct)
        g_r = jax.vjp(lambda v, u: ref.soft_xent(v, u, axis, where, **kw), x, t)[1](ct)
        chex.assert_trees_all_close(g, g_r, rtol=2e-5, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*IMPLS)
    def test_mean_value_and_grad(self, impl):
        x, y, axis, where, kw = int_case("combined")

        @self.variant
        def f(v, lab):
            return xj.softmax_cross_entropy_with_integer_labels(
                v, lab, axis, where, reduction="mean", implementation=impl, **kw
            )

        val, g = jax.value_and_grad(f)(x, y)
        val_r, g_r = jax.value_and_grad(
            lambda v: ref.mean_of_terms(ref.integer_xent_terms(v, y, axis, where, **kw))
        )(x)
        chex.assert_trees_all_close((val, g), (val_r, g_r), rtol=2e-5, atol=2e-6)
