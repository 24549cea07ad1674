"""Regression tests for the bad-input bug classes 1-11.

One test (or a few) per class, named after it, each with its reproducer. The
expected values come from the float64 reference (``tests/reference.py``) or
from hand-computed numbers. The classes:

1. narrow / unsigned label dtypes, numpy / Python labels, exact comparisons;
2. numpy arrays and Python sequences for every array argument, under every
   transformation;
3. true gradients with respect to class weights, BCE weights and pos_weight,
   focal alpha and the normalizer (mean denominators included);
4. ``z_loss=0`` adds nothing (no ``0 * inf``);
5. a NaN in any kept class of a scored row makes that row's loss NaN;
6. unscored rows get exactly zero gradient whatever their logits;
7. a large common offset costs no accuracy (shifted coordinates);
8. options are never truncated or coerced;
9. clear errors (no OverflowError; per-example ``where`` for the poly loss;
   ``axis=None``; list labels; a traced ``num_classes``);
10. ``jax.export`` with symbolic dimensions;
11. the mean's denominators with class weights and z-loss.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from core_helpers import float64
from jax.experimental import checkify
from tiers import slow

import xent_jax as xj

ICE = xj.softmax_cross_entropy_with_integer_labels
SCE = xj.softmax_cross_entropy
BCE = xj.sigmoid_binary_cross_entropy
LCE = xj.linear_cross_entropy
FOCAL = xj.softmax_focal_loss

NARROW = ("int8", "int16", "int32", "uint8", "uint16", "uint32")


class _JittedReference:
    """``R.f(*args, **kwargs)``: ``reference.f`` under ``jax.jit`` (positional
    arguments traced, keywords closed over). Eager evaluation compiles every
    primitive separately, which is what makes eager JAX slow here."""

    def __getattr__(self, name):
        fn = getattr(ref, name)

        def call(*args, **kw):
            dyn = [i for i, a in enumerate(args) if not isinstance(a, str | int)]

            def run(*values):
                full = list(args)
                for i, v in zip(dyn, values, strict=True):
                    full[i] = v
                return fn(*full, **kw)

            return jax.jit(run)(*(args[i] for i in dyn))

        return call


R = _JittedReference()


def _close(actual, expected, rtol=2e-6, atol=2e-6):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol, atol
    )


def _logits(shape, seed=0, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, "f4")


# --- class 1: label dtypes ------------------------------------------------------------


@pytest.mark.parametrize("dtype", NARROW)
def test_class01_narrow_label_dtypes(dtype):
    """``ICE(jnp.zeros((1, 50257)), jnp.array([5], jnp.int16))`` is log(50257)
    = 10.8249 for every label dtype, eager and under jit: the class count is
    not converted to the labels' dtype."""
    x = jnp.zeros((1, 50257))
    y = jnp.array([5], dtype)
    _close(jax.jit(ICE)(x, y), [math.log(50257)])
    if dtype == "int16":  # eager too: concrete labels are range-checked
        _close(ICE(x, y), [math.log(50257)])


@pytest.mark.parametrize("dtype", ("int64", "uint64"))
def test_class01_64_bit_label_dtypes(dtype):
    """64-bit labels (x64): a value that int32 would wrap into a class id
    (2**32 + 3 -> 3) is out of range, never class 3."""
    with float64():
        x = jnp.zeros((2, 7))
        _close(jax.jit(ICE)(x, jnp.array([5, 6], dtype)), [math.log(7)] * 2)
        bad = jnp.array([2**32 + 3, 1], dtype)
        with pytest.raises(ValueError, match="label"):
            ICE(x, bad)
        out = jax.jit(ICE)(x, bad)
        assert np.isnan(out[0]) and np.isclose(out[1], math.log(7))


def test_class01_int64_labels_without_x64_documented_truncation():
    """docs/semantics.md ("What the package cannot see"): with x64 off, a
    NumPy int64 label of 2**32 + 1 raises outside ``jit`` (the loss sees the
    real value) and arrives as class 1 inside ``jit``, which JAX truncates to
    int32 at the boundary before the loss can see it."""
    assert not jax.config.jax_enable_x64
    x = _logits((1, 7))
    y = np.array([2**32 + 1], np.int64)
    with pytest.raises(ValueError, match="out of range"):
        ICE(x, y)
    with warnings.catch_warnings():  # JAX may warn that it truncates
        warnings.simplefilter("ignore")
        out = jax.jit(ICE)(x, y)
    _close(out, ICE(x, np.array([1], np.int32)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_class01_uint8_label_156_with_ignore_index_minus_100(jit):
    """uint8 labels cannot hold -100: 156 (-100 wrapped to 8 bits) is class
    156, scored, and ``ignore_index=-100`` matches nothing."""
    x = _logits((2, 200))
    y = jnp.array([156, 3], jnp.uint8)
    f = functools.partial(ICE, ignore_index=-100)
    out = (jax.jit(f) if jit else f)(x, y)
    _close(out, R.integer_xent(x, y, ignore_index=-100))
    lse = jax.nn.logsumexp(x[0])
    _close(out[0], lse - x[0, 156], rtol=1e-6)


@pytest.mark.parametrize(
    "dtype, value, ignore_index",
    [
        ("uint32", 2**32 - 100, -100),  # int32 would wrap it to ignore_index
        ("uint16", 2**16 - 100, -100),
        ("uint8", 255, -1),  # 8-bit -1
        ("int8", -100, None),  # -100 without ignore_index
        ("int16", 258, None),  # 8-bit truncation would give class 2
    ],
)
def test_class01_out_of_range_labels_never_wrap(dtype, value, ignore_index):
    """Out-of-range labels raise for concrete inputs and give NaN (zero
    gradient) under jit, whatever the dtype; no wrap-around."""
    x = _logits((2, 5))
    y = np.array([value, 1], dtype)
    f = functools.partial(ICE, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="label"):
        f(x, y)
    out = jax.jit(f)(x, y)
    assert np.isnan(out[0])
    _close(out[1], R.integer_xent(x[1:], y[1:].astype(np.int32)))
    g = jax.jit(jax.grad(lambda v, y: f(v, y).sum()))(x, y)  # labels traced
    assert np.all(np.asarray(g[0]) == 0) and np.all(np.isfinite(g))


@pytest.mark.parametrize("reduction", ["mean", "mean_per_segment"])
@pytest.mark.slow
def test_class01_mean_over_only_out_of_range_labels_is_nan(reduction):
    """Found by the differential fuzzer (issue 9): under jit, a batch whose
    every label is out of range (an off-by-one vocabulary) has no scored
    example, so the mean's denominator is 0 and the mean was a silent 0. A
    NaN total now stays NaN whatever the denominator."""
    x = _logits((3, 5))
    y = jnp.array([5, 5, -1])
    for f in (ICE, xj.softmax_focal_loss):
        out = jax.jit(lambda x, y, f=f: f(x, y, reduction=reduction))
        if f is xj.softmax_focal_loss and reduction == "mean_per_segment":
            continue
        assert np.isnan(out(x, y)), f
    h, w = _logits((3, 4)), _logits((4, 5), seed=2)
    lce = jax.jit(lambda y: xj.linear_cross_entropy(h, w, y, reduction=reduction))
    assert np.isnan(lce(y))
    # All ignored (no out-of-range label): still 0, with zero gradient.
    f = jax.jit(
        lambda x: ICE(x, jnp.array([-100] * 3), ignore_index=-100, reduction=reduction)
    )
    assert float(f(x)) == 0.0
    assert np.all(np.asarray(jax.grad(f)(x)) == 0)
    # normalizer=0 with a NaN row: a NaN mean, and still zero gradient (the
    # NaN passes through without the undivided total's gradient).
    x_nan = x.at[0, 1].set(jnp.nan)
    g = jax.grad(
        lambda x: ICE(x, jnp.array([0, 1, 2]), reduction="mean", normalizer=0.0)
    )(x_nan)
    assert np.all(np.asarray(g) == 0)


def test_class01_label_forms():
    """Labels as numpy arrays of any integer dtype, Python ints and Python
    lists; bool labels are a TypeError."""
    x = _logits((2, 3))
    want = R.integer_xent(x, jnp.array([0, 2]))
    _close(ICE(x, [0, 2]), want)  # eager
    _close(jax.jit(lambda v: ICE(v, np.array([0, 2], np.uint16)))(x), want)
    _close(jax.jit(lambda v: ICE(v, [0, 2]))(x), want)
    _close(jax.jit(lambda v: ICE(v, 0))(x[0]), want[0])  # a Python int label
    with pytest.raises(TypeError):
        ICE(x, jnp.array([True, False]))
    with pytest.raises(TypeError):
        ICE(x, [True, False])


def test_class01_checkify_reports_no_false_error_for_valid_narrow_labels():
    """checkify(jit(loss)) reports nothing for valid int8 / uint8 labels (uint8
    156 with ignore_index=-100 included), and reports out-of-range ones."""
    x = _logits((2, 200))

    def f(v, y):
        return ICE(v, y, ignore_index=-100)

    checked = checkify.checkify(jax.jit(f))
    for y in (jnp.array([156, 3], jnp.uint8), jnp.array([127, -100], jnp.int8)):
        err, out = checked(x, y)
        assert err.get() is None, err.get()
        assert np.all(np.isfinite(out))
    err, _ = checked(x, jnp.array([-3, 1], jnp.int8))
    assert err.get() is not None


def test_class01_narrow_labels_in_linear_cross_entropy():
    """The fused loss with 300 classes (more than 8-bit labels hold) and int8 /
    uint8 labels (uint8 with ignore_index=-100, which it cannot hold)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 300)), jnp.float32)
    want = R.linear_xent(x, w, jnp.array([5, 100, 7]))
    f = jax.jit(functools.partial(LCE, reduction="none", ignore_index=-100))
    for dtype in ("int8", "uint8"):
        _close(f(x, w, jnp.array([5, 100, 7], dtype)), want, rtol=1e-5)


# --- class 2: numpy / Python values everywhere ----------------------------------------

X23 = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
Y2 = np.array([0, 2], np.int32)
P23 = np.array([[0.2, 0.3, 0.5], [0.6, 0.0, 0.4]], np.float32)
W3 = np.array([0.5, 1.0, 2.0], np.float32)
HX = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
HW = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)

_CLASS02 = {
    "integer": (
        lambda v, a: ICE(
            v,
            a["labels"],
            where=a["where"],
            class_weights=a["class_weights"],
            reduction="mean",
            normalizer=a["normalizer"],
        ),
        dict(
            labels=Y2,
            where=np.array([[True, False, True], [True, True, True]]),
            class_weights=W3,
            normalizer=np.float32(3.0),
        ),
    ),
    "soft": (
        lambda v, a: SCE(
            v, a["labels"], where=a["where"], class_weights=a["class_weights"]
        ),
        dict(labels=P23, where=np.array([True, False]), class_weights=W3),
    ),
    "bce": (
        lambda v, a: BCE(
            v, a["labels"], weights=a["weights"], pos_weight=a["pos_weight"]
        ),
        dict(labels=P23, weights=W3, pos_weight=W3[::-1].copy()),
    ),
    "focal": (
        lambda v, a: FOCAL(v, a["labels"], alpha=a["alpha"], where=a["where"]),
        dict(labels=Y2, alpha=W3, where=np.array([True, True])),
    ),
    "linear": (
        lambda v, a: LCE(
            HX + v[:, :1],
            HW,
            a["labels"],
            bias=a["bias"],
            class_weights=a["class_weights"],
            reduction="none",
        ),
        dict(labels=Y2, bias=W3, class_weights=W3[::-1].copy()),
    ),
}


@pytest.mark.parametrize("loss", list(_CLASS02))
def test_class02_numpy_and_python_values_everywhere(loss):
    """Every array argument (labels, soft labels, where, class_weights,
    normalizer, BCE weights and pos_weight, focal alpha, bias) accepts numpy
    arrays, jnp arrays and Python sequences, under eager, jit, vmap, grad and
    jit(grad), with the same result (a Python sequence is a constant closed
    over; numpy arrays are also passed through jit as arguments)."""
    f, values = _CLASS02[loss]
    as_jnp = {k: jnp.asarray(v) for k, v in values.items()}
    as_list = {k: np.asarray(v).tolist() for k, v in values.items()}
    want = jax.jit(lambda v: f(v, as_jnp))(X23)
    want_g = jax.jit(jax.grad(lambda v: jnp.sum(f(v, as_jnp))))(X23)
    _close(f(X23, values), want, rtol=1e-5)  # eager, numpy
    _close(f(X23, as_list), want, rtol=1e-5)  # eager, Python
    _close(jax.jit(f)(X23, values), want, rtol=1e-5)  # numpy traced by jit
    if loss != "linear":  # eager grad (op by op; the fused loss's loops are slow)
        g = jax.grad(lambda v: jnp.sum(f(v, values)))(X23)
        _close(g, want_g, rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v, as_list))))(X23)
    _close(g, want_g, rtol=1e-5, atol=1e-6)
    out = jax.jit(jax.vmap(lambda v: f(v, as_list)))(np.stack([X23, X23]))
    _close(out[1], want, rtol=1e-5)


# --- class 3: gradients with respect to weights ---------------------------------------


def _grads_match(f, f_ref, args, argnums, rtol=1e-5, atol=1e-6):
    g = jax.jit(jax.grad(f, argnums=argnums))(*args)
    g_ref = jax.jit(jax.grad(f_ref, argnums=argnums))(*args)
    for a, b in zip(g, g_ref, strict=True):
        _close(a, b, rtol=rtol, atol=atol)
        assert np.any(np.asarray(b) != 0)


@pytest.mark.parametrize("reduction", [slow("none"), slow("sum"), "mean"])
def test_class03_class_weights_gradient(reduction):
    """d/d class_weights is the true gradient, for integer and soft labels
    (with smoothing and z-loss); with "mean" the denominator sum w[label]
    depends on the weights and is differentiated too."""
    x = _logits((5, 4))
    y = jnp.array([0, 3, 1, 1, -100])
    p = jax.nn.softmax(_logits((5, 4), seed=1))
    w = jnp.array([0.5, 1.0, 2.0, 1.5])
    opts = dict(label_smoothing=0.1)  # z-loss: class 11

    def f_int(x, w):
        return jnp.sum(
            ICE(x, y, ignore_index=-100, class_weights=w, reduction=reduction, **opts)
        )

    def r_int(x, w):
        t = ref.integer_xent_terms(x, y, ignore_index=-100, class_weights=w, **opts)
        return jnp.sum(ref.reduce_terms(t, reduction))

    _grads_match(f_int, r_int, (x, w), (0, 1))

    def f_soft(x, w):
        return jnp.sum(SCE(x, p, class_weights=w, reduction=reduction, **opts))

    def r_soft(x, w):
        t = ref.soft_xent_terms(x, p, class_weights=w, **opts)
        return jnp.sum(ref.reduce_terms(t, reduction))

    _grads_match(f_soft, r_soft, (x, w), (0, 1))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_class03_class_weights_gradient_linear(reduction):
    """The fused loss: d/d class_weights (and x, w, bias) is the true gradient."""
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    cw = jnp.linspace(0.5, 2.0, 8)
    y = jnp.array([0, 7, 3, -100, 2, 2])
    opts = dict(ignore_index=-100, label_smoothing=0.1)  # z-loss: class 11

    def f(h, w, b, cw):
        out = LCE(h, w, y, bias=b, class_weights=cw, reduction=reduction, **opts)
        return jnp.sum(out)

    def r(h, w, b, cw):
        t = ref.linear_xent_terms(h, w, y, bias=b, class_weights=cw, **opts)
        return jnp.sum(ref.reduce_terms(t, reduction))

    _grads_match(f, r, (h, w, b, cw), (0, 1, 2, 3), rtol=2e-5, atol=2e-6)


def test_class03_bce_weights_and_pos_weight_gradient():
    """BCE: d/d weights and d/d pos_weight are the true gradient."""
    x = _logits((4, 3))
    y = jnp.asarray(np.random.default_rng(5).random((4, 3)), jnp.float32)
    w = jnp.array([0.5, 1.0, 2.0])
    pw = jnp.array([2.0, 1.0, 0.5])

    def f(x, w, pw):
        return jnp.sum(BCE(x, y, weights=w, pos_weight=pw))

    def r(x, w, pw):
        return jnp.sum(ref.bce(x, y, weights=w, pos_weight=pw))

    _grads_match(f, r, (x, w, pw), (0, 1, 2))
    for reduction in ("sum", "mean"):
        _grads_match(
            lambda x, w, r=reduction: BCE(
                x, y, weights=w, label_smoothing=0.1, reduction=r
            ),
            lambda x, w, r=reduction: ref.reduce(
                ref.bce(x, y, weights=w, label_smoothing=0.1), r
            ),
            (x, w),
            (0, 1),
        )


@pytest.mark.parametrize("alpha", ["scalar", "per_class"])
def test_class03_focal_alpha_gradient(alpha):
    """softmax_focal_loss: d/d alpha is the true gradient."""
    x = _logits((4, 3))
    y = jnp.array([0, 2, 1, 1])
    a = jnp.array(0.3) if alpha == "scalar" else jnp.array([0.2, 0.5, 0.9])
    _grads_match(
        lambda x, a: jnp.sum(FOCAL(x, y, alpha=a)),
        lambda x, a: jnp.sum(ref.softmax_focal(x, y, alpha=a)),
        (x, a),
        (0, 1),
    )


def test_class03_normalizer_gradient():
    """A user-passed normalizer (scalar or pair) is differentiated."""
    x = _logits((4, 3))
    y = jnp.array([0, 2, 1, 1])

    def f(n):
        return ICE(x, y, z_loss=0.1, reduction="mean", normalizer=n)

    def r(n):
        return ref.reduce_terms(ref.integer_xent_terms(x, y, z_loss=0.1), "mean", n)

    n = jnp.float32(3.0)
    df, dr = jax.jit(jax.grad(f)), jax.jit(jax.grad(r))
    _close(df(n), dr(n), rtol=1e-5)
    assert df(n) != 0
    pair = (jnp.float32(3.0), jnp.float32(5.0))
    for a, b in zip(df(pair), dr(pair), strict=True):
        _close(a, b, rtol=1e-5)


@pytest.mark.parametrize("implementation", [None, "reference"])
def test_class03_label_gradient_at_zero_and_one_targets(implementation):
    """Found by the fuzzer: the gradient with respect to a soft target that is
    exactly 0 is (1 - a) w_c (lse - x_c), not 0, and BCE's label gradient at
    labels exactly 0 or 1 is pos_weight softplus(-x) - softplus(x) (a term with
    a zero coefficient contributes 0 to the value, not to the gradient)."""
    x = _logits((3, 4))
    p = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.1, 0.4]])
    w = jnp.array([0.5, 1.0, 2.0, 1.5])
    opts = dict(class_weights=w, label_smoothing=0.1, implementation=implementation)
    g = jax.jit(jax.grad(lambda p: SCE(x, p, **opts).sum()))(p)
    opts.pop("implementation")
    want = jax.jit(jax.grad(lambda p: ref.soft_xent(x, p, **opts).sum()))(p)
    _close(g, want, rtol=1e-5, atol=1e-6)
    y = jnp.array([[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 0.25], [1.0, 1.0, 0.0, 0.0]])
    pw = jnp.array([2.0, 1.0, 0.5, 3.0])
    f = functools.partial(BCE, pos_weight=pw, implementation=implementation)
    g = jax.jit(jax.grad(lambda y: f(x, y).sum()))(y)
    want = jax.jit(jax.grad(lambda y: ref.bce(x, y, pos_weight=pw).sum()))(y)
    _close(g, want, rtol=1e-5, atol=1e-6)


# --- class 4: z_loss = 0 adds nothing -------------------------------------------------


@pytest.mark.parametrize("implementation", [None, "reference"])
@pytest.mark.slow
def test_class04_zero_z_loss_adds_nothing(implementation):
    """``ICE([[1e30, 0.]], [0])`` is [0.] and ``ICE([[inf, 0.]], [1])`` is
    [inf]: z_loss=0 multiplies nothing by an infinite lse**2."""
    f = functools.partial(ICE, implementation=implementation)
    for g in (f, jax.jit(f)):
        _close(g(jnp.array([[1e30, 0.0]]), jnp.array([0])), [0.0])
        assert g(jnp.array([[jnp.inf, 0.0]]), jnp.array([1]))[0] == np.inf
    s = functools.partial(SCE, implementation=implementation)
    _close(s(jnp.array([[1e30, 0.0]]), jnp.array([[1.0, 0.0]])), [0.0])
    assert s(jnp.array([[jnp.inf, 0.0]]), jnp.array([[0.0, 1.0]]))[0] == np.inf
    lce = jax.jit(
        functools.partial(LCE, reduction="none", implementation=implementation)
    )
    _close(lce(jnp.ones((1, 1)), jnp.array([[1e30, 0.0]]), jnp.array([0])), [0.0])


# --- class 5: NaN in a kept class -----------------------------------------------------


@pytest.mark.parametrize("implementation", [None, "reference"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_class05_nan_away_from_the_label(implementation, jit):
    """``z = normal((3, 4)).at[1, 2].set(nan)``, labels [0, 1, 2]: row 1 is
    NaN (the NaN is not at its label), rows 0 and 2 finite and correct; the
    same for soft labels. A NaN in a class ``where`` masks does not matter."""
    z = _logits((3, 4)).at[1, 2].set(jnp.nan)
    y = jnp.array([0, 1, 2])
    f = functools.partial(ICE, implementation=implementation)
    s = functools.partial(SCE, implementation=implementation)
    if jit:
        f, s = jax.jit(f), jax.jit(s)
    out = np.asarray(f(z, y))
    assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))
    _close(out[[0, 2]], R.integer_xent(z[jnp.array([0, 2])], y[jnp.array([0, 2])]))
    out = np.asarray(s(z, jax.nn.one_hot(y, 4)))
    assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))
    keep = jnp.ones((3, 4), bool).at[1, 2].set(False)
    g = functools.partial(ICE, where=keep, implementation=implementation)
    out = (jax.jit(g) if jit else g)(z, y)
    _close(out, R.integer_xent(jnp.nan_to_num(z), y, where=keep))


@pytest.mark.parametrize("implementation", [None, slow("reference")])
def test_class05_nan_away_from_the_label_linear(implementation):
    """The fused loss: a NaN bias entry (a NaN in one class of every row)
    makes every scored row NaN, unless that class is padding."""
    x = _logits((3, 2))
    w = _logits((2, 4), seed=1)
    b = jnp.array([0.0, 0.0, jnp.nan, 0.0])
    y = jnp.array([0, 1, -100])
    f = functools.partial(
        LCE, reduction="none", ignore_index=-100, implementation=implementation
    )
    padded = functools.partial(f, num_classes=3)
    want = R.linear_xent(x, w, y, bias=jnp.zeros(4), ignore_index=-100, num_classes=3)
    for jit in (False, True):
        g, gp = (jax.jit(f), jax.jit(padded)) if jit else (f, padded)
        out = np.asarray(g(x, w, y, bias=b))
        assert np.all(np.isnan(out[:2])) and out[2] == 0
        # The NaN in a padding column (num_classes=3) does not matter.
        _close(gp(x, w, y, bias=b[jnp.array([0, 1, 3, 2])]), want, rtol=1e-5)


# --- class 6: no gradient from unscored rows ------------------------------------------


@pytest.mark.parametrize("implementation", [None, slow("reference")])
def test_class06_ignored_row_with_nan_logits_gets_zero_gradient(implementation):
    """``lg=[[0, 1], [nan, 0]]``, labels [0, -100], ignore_index=-100, mean:
    the gradient's row 1 is exactly [0, 0]."""
    lg = jnp.array([[0.0, 1.0], [jnp.nan, 0.0]])
    y = jnp.array([0, -100])

    def f(v):
        return ICE(
            v, y, ignore_index=-100, reduction="mean", implementation=implementation
        )

    for g in (jax.grad(f), jax.jit(jax.grad(f))):
        out = np.asarray(g(lg))
        assert np.all(out[1] == 0), out
        want = jax.jit(jax.grad(lambda v: ref.integer_xent(v, y[:1]).sum()))(lg[:1])
        _close(out[0], want[0])


@pytest.mark.slow
def test_class06_other_unscored_rows_get_zero_gradient():
    """Out-of-range labels (under jit), rows that ``where`` masks entirely and
    ignored rows with +-inf / NaN logits: exactly zero gradient, for integer
    and soft labels (logits and labels), with every option."""
    lg = jnp.array([[0.0, 1.0, 2.0], [jnp.nan, jnp.inf, -jnp.inf], [1.0, 2.0, 3.0]])
    keep = jnp.array([True, False, True])
    opts = dict(label_smoothing=0.1, z_loss=0.1, class_weights=jnp.ones(3))
    for labels in (jnp.array([0, 7, 1]), jnp.array([0, -100, 1])):

        def f(v, labels):
            return ICE(v, labels, ignore_index=-100, reduction="sum", **opts)

        g = np.asarray(jax.jit(jax.grad(f))(lg, labels))  # labels traced
        assert np.all(g[1] == 0) and np.all(np.isfinite(g)), g
    g = np.asarray(
        jax.jit(jax.grad(lambda v: ICE(v, jnp.array([0, 1, 2]), where=keep).sum()))(lg)
    )
    assert np.all(g[1] == 0) and np.all(np.isfinite(g)), g
    p = jnp.full((3, 3), 1 / 3)
    gx, gp = jax.jit(
        jax.grad(lambda v, p: SCE(v, p, where=keep, **opts).sum(), argnums=(0, 1))
    )(lg, p)
    assert np.all(np.asarray(gx[1]) == 0) and np.all(np.asarray(gp[1]) == 0)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gp))


LINEAR_IMPLEMENTATIONS = [None, "reference", "pallas_tpu", "pallas_triton"]


@pytest.mark.parametrize("implementation", LINEAR_IMPLEMENTATIONS)
@pytest.mark.parametrize("filter_threshold", [None, slow(1e-30)])
@pytest.mark.parametrize("logit_softcap", [None, slow(30.0)])
@pytest.mark.parametrize("label", [-100, -1], ids=["ignored", "out_of_range"])
def test_class06_linear_unscored_row_with_nan_hidden_state_gets_zero_dx(
    label, logit_softcap, filter_threshold, implementation
):
    """The fused loss: an ignored (or, under jit, out-of-range) token whose
    hidden state holds NaN and -inf gets dx exactly 0, also with a soft cap
    (found by the fuzzer: the cap's chain-rule factor 1 - (z / s)**2 is NaN
    there, in the loop and in the filter's separate label term) and in every
    implementation."""
    rng = np.random.default_rng(6)
    h = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    h = h.at[1, 0].set(jnp.nan).at[1, 1].set(-jnp.inf)
    w = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    y = jnp.array([0, label, 5, 7])
    f = functools.partial(
        LCE,
        ignore_index=-100,
        logit_softcap=logit_softcap,
        filter_threshold=filter_threshold,
        implementation=implementation,
        reduction="none",
    )
    g = jax.jit(jax.grad(lambda h, y: jnp.nansum(f(h, w, y))))(h, y)
    assert np.all(np.asarray(g[1]) == 0), g
    want = jax.jit(
        jax.grad(
            lambda h: jnp.sum(
                ref.linear_xent(
                    h, w, y, ignore_index=-100, logit_softcap=logit_softcap
                )[jnp.array([0, 2, 3])]
            )
        )
    )(h)
    _close(g, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", LINEAR_IMPLEMENTATIONS)
@pytest.mark.parametrize("filter_threshold", [None, slow(1e-30)])
@pytest.mark.parametrize("logit_softcap", [None, slow(30.0)])
def test_class06_linear_ignored_row_with_nan_hidden_state_leaves_dw_finite(
    logit_softcap, filter_threshold, implementation
):
    """The fused loss: an ignored token whose hidden state is NaN contributes
    nothing to dw and dbias either (they stay finite and equal the reference,
    which zeroes unscored rows of x): a padding token whose hidden state is
    NaN must not poison the classifier's gradient (found by the fuzzer: dw
    took x's NaN row times a zero coefficient, in every implementation)."""
    rng = np.random.default_rng(6)
    h = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32).at[1, 0].set(jnp.nan)
    w = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    y = jnp.array([0, -100, 5, 7])

    opts = dict(bias=None, ignore_index=-100, logit_softcap=logit_softcap)

    def f(h, w, b):
        return LCE(
            h,
            w,
            y,
            **(opts | dict(bias=b)),
            filter_threshold=filter_threshold,
            implementation=implementation,
        )

    def r(h, w, b):
        t = ref.linear_xent_terms(h, w, y, **(opts | dict(bias=b)))
        return ref.reduce_terms(t, "mean")

    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(h, w, b)
    g_ref = jax.jit(jax.grad(r, argnums=(0, 1, 2)))(h, w, b)
    assert np.all(np.asarray(g[0][1]) == 0)
    for a, e in zip(g, g_ref, strict=True):
        _close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "implementation", [None, slow("reference"), "pallas_tpu", slow("pallas_triton")]
)
@pytest.mark.slow
def test_class06_linear_padding_columns_reach_no_gradient(implementation):
    """Found by the fuzzer (the reference was wrong): with ``num_classes`` the
    columns past it are not part of the loss, so a NaN logit there (``inf *
    0`` in ``x @ w``) reaches neither the value nor, through the soft cap's
    derivative, any gradient; a row whose real logits all saturate the cap has
    gradient exactly 0."""
    h = jnp.array([[1.0, jnp.inf, -1.0]])
    w = jnp.array([[1.0, -1.0, 2.0, 1.0], [2.0, -3.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    y = jnp.array([1])
    f = functools.partial(
        LCE, num_classes=3, logit_softcap=30.0, implementation=implementation
    )
    # real logits: +inf, -inf, +inf -> capped 30, -30, 30; column 3: inf * 0
    _close(f(h, w, y), [60.0 + math.log(2)])
    gh, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(h, w, y)
    # (dw's row 1 is inf * 0: undefined, not checked)
    assert np.all(np.asarray(gh) == 0) and np.all(np.asarray(gw)[::2] == 0), (gh, gw)


# --- class 7: a large common offset ---------------------------------------------------


def test_class07_three_equal_large_logits():
    """Three logits equal to 1e8: the loss is log 3 = 1.0986."""
    for f in (ICE, jax.jit(ICE)):
        _close(f(jnp.full((1, 3), 1e8), jnp.array([0])), [math.log(3)])
    _close(SCE(jnp.full((1, 3), 1e8), jnp.array([[1.0, 0.0, 0.0]])), [math.log(3)])


@pytest.mark.parametrize("offset", [1e4, slow(-1e4)])
def test_class07_large_offset_matches_float64(offset):
    """float32 logits ``offset + normal`` match the float64 reference to ~1e-6
    relative: losses are computed in shifted coordinates (integer and soft
    labels, with smoothing and z-loss)."""
    x = jnp.asarray(offset + np.random.default_rng(7).normal(size=(6, 5)), "f4")
    y = jnp.array([0, 1, 2, 3, 4, 0])
    p = jax.nn.softmax(_logits((6, 5), seed=8))
    x64 = np.asarray(x, np.float64)
    with float64():
        want_i = np.asarray(R.integer_xent(x64, np.asarray(y)))
        want_s = np.asarray(R.soft_xent(x64, np.asarray(p, np.float64)))
        want_ls = np.asarray(R.integer_xent(x64, np.asarray(y), label_smoothing=0.1))
    for impl in (None, "reference"):
        ice = jax.jit(functools.partial(ICE, implementation=impl))
        sce = jax.jit(functools.partial(SCE, implementation=impl))
        ice_ls = jax.jit(
            functools.partial(ICE, label_smoothing=0.1, implementation=impl)
        )
        _close(ice(x, y), want_i, rtol=4e-6, atol=1e-6)
        _close(sce(x, p), want_s, rtol=4e-6, atol=1e-6)
        _close(ice_ls(x, y), want_ls, rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("impl", [None, "reference"])
@pytest.mark.slow
def test_class07_temperature_offset_cancels_before_the_division(impl):
    """Found by the differential fuzzer (issue 9, temperature): the logits were
    divided by T before the shift, so x / T rounded at the offset's magnitude:
    [1e8, 1e8 + 64, 1e8 - 64] at T = 0.7 gave 80.0 instead of 64 / 0.7 =
    91.43. The shift now comes first, in the logits' own units: (x - max) / T.
    The aux entropy and lse are exact too."""
    x = jnp.array([[1e8, 1e8 + 64, 1e8 - 64]], jnp.float32)
    t = 0.7
    loss, aux = jax.jit(
        functools.partial(ICE, temperature=t, return_aux=True, implementation=impl)
    )(x, jnp.array([0]))
    _close(loss, [64 / t + math.log1p(math.exp(-64 / t) + math.exp(-128 / t))])
    assert float(aux.entropy[0]) < 1e-30
    _close(aux.lse, [(1e8 + 64) / t], rtol=1e-7)
    xs = jnp.asarray(3e5 + np.random.default_rng(3).normal(size=(4, 7)), "f4")
    y = jnp.array([0, 3, 6, 2])
    x64 = np.asarray(xs, np.float64)
    with float64():
        want = np.asarray(
            ref.integer_xent_terms(x64, np.asarray(y), temperature=t).loss
        )
    got = jax.jit(functools.partial(ICE, temperature=t, implementation=impl))(xs, y)
    _close(got, want, rtol=4e-6, atol=1e-6)
    soft = jax.nn.one_hot(y, 7)
    got = jax.jit(functools.partial(SCE, temperature=t, implementation=impl))(xs, soft)
    _close(got, want, rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize(
    "impl, block_size",
    [
        slow("xla", None),
        ("xla", (2, 4)),
        slow("pallas_triton", None),
        slow("pallas_tpu", None),
    ],
)
@pytest.mark.slow
def test_class07_fused_temperature_at_huge_logits_is_rounded_alike(impl, block_size):
    """Fuzzer campaign, stop 19 (float32, logits ~1e30, temperature=3, jit):
    ``lse`` was inf. XLA turned ``/ T`` into ``* (1/T)`` and LLVM contracted
    that multiply with the shift's subtraction into an FMA in one fusion and
    not in another, so the block max and ``exp(z - max)`` saw logits one
    rounding (~1e23) apart. Loss, lse and gradients now match float64. The
    Pallas kernels (interpreted) gave inf eagerly too until they divided x
    and the bias before the matmul as well (stop 20)."""
    rng = np.random.default_rng(13572)
    scale = 2.0**50
    x = jnp.asarray(rng.integers(-8, 9, size=(4, 3)) * scale / 8, jnp.float32)
    w = jnp.asarray(rng.integers(-8, 9, size=(3, 8)) * scale / 4, jnp.float32)
    b = jnp.asarray(rng.integers(-8, 9, size=8) * scale**2 / 8, jnp.float32)
    y = jnp.array([5, 3, 0, 0])
    t = 3.0

    def objective(linear, x, w, b):
        loss, lse = linear(x, w, y, bias=b, temperature=t, return_lse=True)
        return jnp.sum(loss) + 0.5 * jnp.sum(lse), (loss, lse)

    def reference(x, w, b):
        terms = ref.linear_xent_terms(x, w, y, bias=b, temperature=t)
        z = ref.linear_logits(x, w, bias=b, temperature=t)
        return terms.ce, jax.scipy.special.logsumexp(z, axis=-1)

    fused = functools.partial(
        LCE, reduction="none", block_size=block_size, implementation=impl
    )
    (_, got), grads = jax.jit(
        jax.value_and_grad(functools.partial(objective, fused), (0, 1, 2), True)
    )(x, w, b)
    with float64():
        args = [np.asarray(a, np.float64) for a in (x, w, b)]
        want = reference(*args)
        want_grads = jax.grad(
            lambda *a: jnp.sum(reference(*a)[0]) + 0.5 * jnp.sum(reference(*a)[1]),
            (0, 1, 2),
        )(*args)
    for g, e in zip(got, want, strict=True):
        assert np.all(np.isfinite(g)), g
        _close(g, e, rtol=1e-5)
    for g, e in zip(grads, want_grads, strict=True):
        _close(g, e, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(e))))


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.slow
def test_class07_mean_per_segment_is_exact_in_float64(impl):
    """Fuzzer campaign, stop 20 (float64, C = 1, z_loss, reduction
    "mean_per_segment"): the segments' counts and their inverses were float32,
    so a mean over 3 examples was off by 3e-8 relative under x64. It now
    equals the float64 mean (and "mean") to the last bits."""
    x = np.array([[0.2514604421867866], [-0.2642097265826038], [1.2808453008865641]])
    y = np.array([[0.0], [1.0], [1.0]])
    seg = np.array([0, 0, 0])
    with float64():
        kw = dict(z_loss=1e-3, implementation=impl)
        got = SCE(x, y, segment_ids=seg, reduction="mean_per_segment", **kw)
        mean = SCE(x, y, reduction="mean", **kw)
        assert got.dtype == jnp.float64
    want = float(np.mean(1e-3 * x[:, 0] ** 2))  # C = 1: lse = x, ce = 0
    np.testing.assert_allclose(float(got), want, rtol=4e-16)
    np.testing.assert_allclose(float(got), float(mean), rtol=4e-16)


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_class07_large_offset_in_the_bias_linear(offset):
    """The fused loss with the offset in the bias (x and w dyadic, so that the
    logits are exact in float32) matches the float64 reference to ~1e-6."""
    rng = np.random.default_rng(9)
    h = jnp.asarray(rng.integers(-8, 9, size=(6, 3)) / 8, jnp.float32)
    w = jnp.asarray(rng.integers(-8, 9, size=(3, 8)) / 8, jnp.float32)
    b = jnp.asarray(offset + rng.integers(-8, 9, size=8) / 16, jnp.float32)
    y = jnp.array([0, 1, 2, 3, 7, 5])
    with float64():
        want = np.asarray(
            R.linear_xent(
                np.asarray(h, np.float64),
                np.asarray(w, np.float64),
                np.asarray(y),
                bias=np.asarray(b, np.float64),
            )
        )
    for impl in (None, "reference"):
        f = functools.partial(LCE, reduction="none", implementation=impl)
        _close(jax.jit(f)(h, w, y, bias=b), want, rtol=4e-6, atol=1e-6)


# --- class 8: options are never truncated or coerced ----------------------------------


def _ice(**kw):
    return ICE(jnp.zeros((2, 3)), jnp.array([0, 1]), **kw)


def _lce(**kw):
    return LCE(jnp.ones((2, 4)), jnp.ones((4, 8)), jnp.array([0, 1]), **kw)


_BAD_OPTIONS = {
    "ICE ignore_index=0.5": (lambda: _ice(ignore_index=0.5), TypeError),
    "ICE ignore_index=True": (lambda: _ice(ignore_index=True), TypeError),
    "LCE ignore_index=0.5": (lambda: _lce(ignore_index=0.5), TypeError),
    "focal ignore_index=1.5": (
        lambda: FOCAL(jnp.zeros((2, 3)), jnp.array([0, 1]), ignore_index=1.5),
        TypeError,
    ),
    "LCE num_classes=5.7": (lambda: _lce(num_classes=5.7), TypeError),
    "LCE num_classes=True": (lambda: _lce(num_classes=True), TypeError),
    "ICE label_smoothing='0.1'": (lambda: _ice(label_smoothing="0.1"), TypeError),
    "ICE label_smoothing=True": (lambda: _ice(label_smoothing=True), TypeError),
    "SCE label_smoothing='0.1'": (
        lambda: SCE(jnp.zeros((2, 3)), jnp.ones((2, 3)), label_smoothing="0.1"),
        TypeError,
    ),
    "BCE label_smoothing='0.1'": (
        lambda: BCE(jnp.zeros(3), jnp.ones(3), label_smoothing="0.1"),
        TypeError,
    ),
    "LCE label_smoothing='0.1'": (lambda: _lce(label_smoothing="0.1"), TypeError),
    "ICE z_loss=inf": (lambda: _ice(z_loss=float("inf")), ValueError),
    "ICE z_loss=nan": (lambda: _ice(z_loss=float("nan")), ValueError),
    "ICE z_loss=False": (lambda: _ice(z_loss=False), TypeError),
    "LCE z_loss=inf": (lambda: _lce(z_loss=float("inf")), ValueError),
    "LCE logit_softcap=inf": (lambda: _lce(logit_softcap=float("inf")), ValueError),
    "LCE logit_softcap=0": (lambda: _lce(logit_softcap=0.0), ValueError),
    "LCE logit_softcap=-1": (lambda: _lce(logit_softcap=-1.0), ValueError),
    "ICE normalizer jnp (2,)": (
        lambda: _ice(reduction="mean", normalizer=jnp.ones(2)),
        ValueError,
    ),
    "ICE normalizer np (2,)": (
        lambda: _ice(reduction="mean", normalizer=np.ones(2)),
        ValueError,
    ),
    "BCE normalizer (2,)": (
        lambda: BCE(
            jnp.zeros(3), jnp.ones(3), reduction="mean", normalizer=jnp.ones(2)
        ),
        ValueError,
    ),
    "LCE normalizer (2,)": (lambda: _lce(normalizer=jnp.ones(2)), ValueError),
    "LCE block_size=4.5": (lambda: _lce(block_size=4.5), TypeError),
    "LCE block_size=True": (lambda: _lce(block_size=True), TypeError),
    # concrete jax scalars follow the same rules as Python and numpy ones
    "ICE ignore_index=jnp.array(-100.0)": (
        lambda: _ice(ignore_index=jnp.array(-100.0)),
        TypeError,
    ),
    "ICE z_loss=jnp.array(True)": (lambda: _ice(z_loss=jnp.array(True)), TypeError),
    "ICE label_smoothing=jnp.array([0.1])": (
        lambda: _ice(label_smoothing=jnp.array([0.1])),
        TypeError,
    ),
}


@pytest.mark.parametrize("case", list(_BAD_OPTIONS))
def test_class08_options_are_never_truncated(case):
    """Wrong option values raise (TypeError for a wrong type, ValueError for a
    wrong value or shape) with a message naming the argument; nothing is
    truncated (0.5 -> 0, 5.7 -> 5) or coerced ("0.1" -> 0.1, True -> 1)."""
    call, exc = _BAD_OPTIONS[case]
    name = case.split()[1].split("=")[0]
    with pytest.raises(exc, match=name):
        call()


def test_class08_numpy_integer_scalars_are_accepted():
    """``block_size=np.int64(4)``, ``ignore_index=np.int32(-100)`` and
    ``num_classes=np.int64(5)`` are integers."""
    want = R.integer_xent(jnp.zeros((2, 3)), jnp.array([0, 1]))
    _close(_ice(ignore_index=np.int32(-100)), want)
    x, w = jnp.ones((2, 4)), jnp.ones((4, 8))
    y = jnp.array([0, 1])
    for kw, want in (
        (dict(block_size=np.int64(4)), math.log(8)),
        (dict(num_classes=np.int64(5)), math.log(5)),
        (dict(ignore_index=np.int64(-100)), math.log(8)),
    ):
        _close(jax.jit(functools.partial(LCE, **kw))(x, w, y), want)


@pytest.mark.slow
def test_class08_concrete_jax_scalars_are_accepted_exactly():
    """0-d jax arrays that are not traced (``jnp.float32(0.1)``,
    ``jnp.array(-100)``, a bfloat16 scalar) are their exact value, as numpy
    scalars are; a traced one still raises, naming the option."""
    x = _logits((3, 5))
    y = jnp.array([0, 4, -100])
    for kw, plain in (
        (dict(ignore_index=jnp.array(-100)), dict(ignore_index=-100)),
        (
            dict(label_smoothing=jnp.float32(0.1), z_loss=jnp.array(1e-3)),
            dict(
                label_smoothing=float(np.float32(0.1)), z_loss=float(np.float32(1e-3))
            ),
        ),
        (dict(temperature=jnp.bfloat16(0.7)), dict(temperature=0.69921875)),
    ):
        plain = dict(dict(ignore_index=-100), **plain)
        kw = dict(dict(ignore_index=-100), **kw)
        want = ICE(x, y, **plain)
        _close(ICE(x, y, **kw), want, rtol=0, atol=0)
        _close(jax.jit(lambda x, kw=kw: ICE(x, y, **kw))(x), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="label_smoothing.*traced"):
        jax.jit(lambda s: ICE(x, y, label_smoothing=s, ignore_index=-100))(0.1)


# --- class 9: clear errors ------------------------------------------------------------


@pytest.mark.slow
def test_class09_huge_ignore_index_matches_nothing():
    """``ignore_index=2**40`` with int32 labels is not an error and no
    OverflowError anywhere: it matches nothing, the loss is the normal one."""
    x = _logits((2, 3))
    y = jnp.array([0, 2])
    want = R.integer_xent(x, y)
    f = functools.partial(ICE, ignore_index=2**40)
    _close(f(x, y), want)
    _close(jax.jit(f)(x, y), want)
    _close(
        jax.jit(jax.grad(lambda v: f(v, y).sum()))(x),
        jax.jit(jax.grad(lambda v: ref.integer_xent(v, y).sum()))(x),
        atol=1e-6,
    )
    focal = jax.jit(functools.partial(FOCAL, ignore_index=2**40))
    _close(focal(x, y), R.softmax_focal(x, y))
    h, w = _logits((2, 4), seed=1), _logits((4, 3), seed=2)
    lce = jax.jit(functools.partial(LCE, ignore_index=2**40, reduction="none"))
    _close(lce(h, w, y), R.linear_xent(h, w, y), rtol=1e-5)
    with float64():
        y64 = jnp.array([0, 2], jnp.int64)
        x64 = np.asarray(x, np.float64)
        ice = functools.partial(ICE, ignore_index=2**70)
        _close(ice(x64, y64), R.integer_xent(x64, y64))


@pytest.mark.slow
def test_class09_poly_loss_per_example_where():
    """``poly_loss_cross_entropy(where=<shape (6,)>)`` with logits (6, C) is a
    per-example mask (as optax); a wrong shape names the shape passed."""
    x = _logits((6, 4))
    p = jax.nn.softmax(_logits((6, 4), seed=1))
    where = jnp.array([True, False, True, True, False, True])
    out = xj.poly_loss_cross_entropy(x, p, where=where)
    _close(out, R.poly_loss(x, p, where=where), rtol=1e-5)
    # optax's own poly loss needs the mask spelled per class: where[:, None].
    want = optax.losses.poly_loss_cross_entropy(x, p, where=where[:, None])
    _close(out, want, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        xj.poly_loss_cross_entropy(x, p, where=where[:5])


@pytest.mark.slow
def test_class09_axis_none():
    """``axis=None``: every axis is a class axis (one loss per call, as optax);
    integer labels are then a scalar flat index."""
    x = _logits((2, 3))
    p = jax.nn.softmax(_logits((2, 3), seed=1).reshape(-1)).reshape(2, 3)
    out = SCE(x, p, axis=None)
    assert out.shape == ()
    _close(out, R.soft_xent(x.reshape(-1), p.reshape(-1)), rtol=1e-6)
    _close(out, optax.losses.softmax_cross_entropy(x, p, axis=None), rtol=1e-6)
    out = ICE(x, jnp.array(4), axis=None)
    assert out.shape == ()
    _close(out, R.integer_xent(x.reshape(-1), jnp.array(4)), rtol=1e-6)


def test_class09_list_labels_and_traced_num_classes():
    """Python-list labels work; a traced ``num_classes`` raises a TypeError
    naming ``num_classes`` (not a ConcretizationTypeError)."""
    x = _logits((2, 3))
    _close(ICE(x, [0, 2]), R.integer_xent(x, jnp.array([0, 2])))
    h, w = jnp.ones((2, 4)), jnp.ones((4, 8))
    _close(jax.jit(lambda h: LCE(h, w, [0, 1]))(h), math.log(8))
    with pytest.raises(TypeError, match="num_classes"):
        jax.jit(lambda nc: LCE(h, w, jnp.array([0, 1]), num_classes=nc))(5)


# --- class 10: jax.export with symbolic dimensions ------------------------------------


def _export_and_check(f, specs, concrete_sets):
    """Exports jit(f) and jit(grad(sum f)) w.r.t. the first argument for
    symbolic ``specs`` and checks both on concrete inputs of several sizes."""

    def total(*a):
        return jnp.sum(f(*a))

    for fn in (f, jax.grad(total)):
        exported = jax.export.export(jax.jit(fn))(*specs)
        for args in concrete_sets:
            _close(exported.call(*args), jax.jit(fn)(*args), rtol=1e-5, atol=1e-6)


def _batch_data(n, seed=0):
    x = _logits((n, 7), seed)
    return x, jnp.arange(n) % 7, jax.nn.softmax(_logits((n, 7), seed + 1))


def _symbolic_batch():
    (b,) = jax.export.symbolic_shape("b")
    return b, jax.ShapeDtypeStruct((b, 7), jnp.float32)


@pytest.mark.slow
def test_class10_export_integer_labels():
    """The integer-label loss exports with a symbolic batch ("b, 7"), value and
    grad, per example and mean, and equals the direct call at batch 3 and 5."""
    b, sx = _symbolic_batch()
    sy = jax.ShapeDtypeStruct((b,), jnp.int32)
    sets = [_batch_data(3)[:2], _batch_data(5, 1)[:2]]
    _export_and_check(
        lambda x, y: ICE(x, y, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3),
        (sx, sy),
        sets,
    )


@pytest.mark.slow
def test_class10_export_soft_labels():
    """The soft-label loss exports with a symbolic batch ("b, 7")."""
    _, sx = _symbolic_batch()
    sets = [(x, p) for x, _, p in (_batch_data(3), _batch_data(5, 1))]
    _export_and_check(lambda x, p: SCE(x, p, z_loss=1e-3), (sx, sx), sets)


def test_class10_export_sigmoid_bce():
    """The sigmoid BCE exports with a symbolic batch ("b, 7")."""
    _, sx = _symbolic_batch()
    sets = [(x, p) for x, _, p in (_batch_data(3), _batch_data(5, 1))]
    _export_and_check(lambda x, p: BCE(x, p, reduction="mean"), (sx, sx), sets)


@pytest.mark.slow
def test_class10_export_linear_cross_entropy():
    """The fused loss exports with symbolic batch and sequence ("b, s, D")."""
    bb, s = jax.export.symbolic_shape("b, s")
    w = _logits((4, 8), seed=3)
    specs = (
        jax.ShapeDtypeStruct((bb, s, 4), jnp.float32),
        jax.ShapeDtypeStruct((bb, s), jnp.int32),
    )
    concrete = [
        (_logits((2, 3, 4), seed=4), jnp.arange(6).reshape(2, 3) % 8),
        (_logits((3, 5, 4), seed=5), jnp.arange(15).reshape(3, 5) % 8),
    ]
    _export_and_check(
        lambda x, y: LCE(x, w, y, reduction="none", label_smoothing=0.1),
        specs,
        concrete,
    )


# --- class 11: the mean's denominators ------------------------------------------------


@pytest.mark.slow
def test_class11_z_loss_mean_under_class_weights():
    """mean = sum(ce) / sum(w[label]) + sum(zl) / count: the z-term's strength
    does not change when every class weight is multiplied by a constant."""
    x = _logits((6, 4))
    y = jnp.array([0, 1, 2, 3, -100, 1])
    w = jnp.array([0.5, 1.0, 2.0, 4.0])
    opts = dict(ignore_index=-100, z_loss=0.1, label_smoothing=0.1)
    want = R.reduce_terms(R.integer_xent_terms(x, y, class_weights=w, **opts), "mean")
    for impl in (None, "reference"):
        f = jax.jit(
            functools.partial(ICE, reduction="mean", implementation=impl, **opts)
        )
        _close(f(x, y, class_weights=w), want, rtol=1e-5)
        _close(f(x, y, class_weights=3 * w), want, rtol=1e-5)
    h, wm = _logits((6, 3), seed=1), _logits((3, 4), seed=2)
    want = R.reduce_terms(
        R.linear_xent_terms(h, wm, y, class_weights=w, **opts), "mean"
    )
    for impl in (None, "reference"):
        f = jax.jit(functools.partial(LCE, implementation=impl, **opts))
        _close(f(h, wm, y, class_weights=3 * w), want, rtol=1e-5)


@pytest.mark.slow
def test_class11_normalizer_pair_and_scalar():
    """A pair normalizer divides the two terms separately; a scalar one
    replaces both denominators, and with class weights and z_loss > 0 a scalar
    is ambiguous: ValueError."""
    x = _logits((6, 4))
    y = jnp.array([0, 1, 2, 3, -100, 1])
    w = jnp.array([0.5, 1.0, 2.0, 4.0])
    opts = dict(ignore_index=-100, z_loss=0.1)
    terms = R.integer_xent_terms(x, y, class_weights=w, **opts)
    want = R.mean_of_terms(terms, (7.0, 9.0))
    f = jax.jit(functools.partial(ICE, reduction="mean", **opts))
    _close(f(x, y, class_weights=w, normalizer=(7.0, 9.0)), want, rtol=1e-5)
    with pytest.raises(ValueError, match="normalizer"):
        ICE(x, y, class_weights=w, reduction="mean", normalizer=7.0, **opts)
    with pytest.raises(ValueError, match="normalizer"):
        LCE(
            _logits((6, 3)), _logits((3, 4)), y, class_weights=w, normalizer=7.0, **opts
        )
    terms = R.integer_xent_terms(x, y, **opts)  # no class weights: fine
    _close(f(x, y, normalizer=7.0), R.mean_of_terms(terms, 7.0), rtol=1e-5)


@pytest.mark.slow
def test_class11_zero_denominators_and_other_losses():
    """A zero denominator makes its term 0 with zero gradient; soft labels
    count rows with a kept class; BCE divides by the number of elements."""
    x = _logits((3, 4))
    y = jnp.full((3,), -100)
    f = functools.partial(ICE, ignore_index=-100, z_loss=0.1, reduction="mean")
    assert jax.jit(f)(x, y) == 0
    assert np.all(np.asarray(jax.jit(jax.grad(lambda v: f(v, y)))(x)) == 0)
    p = jax.nn.softmax(_logits((3, 4), seed=1))
    keep = jnp.array([True, False, True])
    terms = R.soft_xent_terms(x, p, where=keep, z_loss=0.1)
    sce = jax.jit(functools.partial(SCE, z_loss=0.1, reduction="mean"))
    _close(sce(x, p, where=keep), R.mean_of_terms(terms), rtol=1e-5)
    bce = jax.jit(functools.partial(BCE, reduction="mean"))
    _close(bce(x, p), jnp.mean(R.bce(x, p)), rtol=1e-6)


# --- forward mode: Hessian works, jvp raises ------------------------------------------


@pytest.mark.slow
def test_hessian_of_default_implementation_equals_reference():
    """jax.hessian (forward-over-reverse) runs on the custom VJP and equals the
    reference's Hessian, for integer and soft labels."""
    x = _logits((2, 3))
    y = jnp.array([0, 2])
    p = jax.nn.softmax(_logits((2, 3), seed=1))
    opts = dict(label_smoothing=0.1, z_loss=0.05)
    h = jax.jit(jax.hessian(lambda v: ICE(v, y, **opts).sum()))(x)
    _close(
        h,
        jax.jit(jax.hessian(lambda v: ref.integer_xent(v, y, **opts).sum()))(x),
        rtol=1e-4,
        atol=1e-6,
    )
    h = jax.jit(jax.hessian(lambda v: SCE(v, p, **opts).sum()))(x)
    _close(
        h,
        jax.jit(jax.hessian(lambda v: ref.soft_xent(v, p, **opts).sum()))(x),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.slow
def test_forward_mode_on_default_implementation_raises():
    """jax.jvp and jax.jacfwd directly on the default (custom_vjp)
    implementation raise JAX's forward-mode error."""
    x = _logits((2, 3))
    y = jnp.array([0, 2])

    def f(v):
        return ICE(v, y).sum()

    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (x,), (jnp.ones_like(x),))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jacfwd(f)(x)
