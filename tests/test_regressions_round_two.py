"""Regression tests for issue 28, the second adversarial pass ("round two of
never a silent wrong number"): one test per item, named after it, each with
the issue's reproducer.

1. with ``shift=k`` the out-of-range error named the sliced position;
2. ``jax.export`` with a symbolic sequence length failed for ``shift >= 2``
   with ``segment_ids``;
3. with ``filter_threshold``, a skipped block dropped ``aux.entropy``'s
   gradient (error 0.030 for a threshold of 0.01);
4. ``sigmoid_focal_loss``'s gradient w.r.t. hard 0/1 labels was NaN;
5. temperatures the compute dtype cannot hold gave NaN on every row;
6. int64 ``segment_ids`` beyond int32 wrapped silently with x64 off;
7. ``return_lse`` was not validated (``"False"`` returned the pair), and
   ``np.bool_`` was refused by ``return_aux``;
8. 16-bit gradients were rounded twice (the softmax saved in 16 bits, then
   scaled by the cotangent): up to 1.41 ulp with ``reduction="mean"`` or class
   weights, hundreds with label smoothing or soft labels;
9. ``linear_cross_entropy`` had no ``where`` (Levanter's ``loss_mask``);
10. t5x and MaxText mark padding with segment id 0 (``segment_padding_id``),
    and t5x's label smoothing is a KL with ``a / (V - 1)`` off-label mass.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from core_helpers import float64, ulps

import xent_jax as xj

ICE = xj.softmax_cross_entropy_with_integer_labels
SCE = xj.softmax_cross_entropy
LCE = xj.linear_cross_entropy

# 4 classes; the 9 sits at the user's position [1, 3].
LABELS = np.array([[0, 1, 2, 3, 1], [2, 2, 1, 9, 0]])


def _core(labels, **opts):
    x = jnp.asarray(np.random.default_rng(0).normal(size=labels.shape + (4,)), "f4")
    return ICE(x, labels, **opts)


def _fused(labels, **opts):
    r = np.random.default_rng(1)
    h = jnp.asarray(r.normal(size=labels.shape + (3,)), "f4")
    w = jnp.asarray(r.normal(size=(3, 4)), "f4")
    return LCE(h, w, labels, **opts)


LOSSES = {"core": _core, "fused": _fused}


@pytest.mark.parametrize("shift", [0, 1, 2])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_item1_shift_out_of_range_error_names_the_users_position(loss, shift):
    """Before: shift=1 named labels[1, 2] and shift=2 labels[1, 1] (the
    labels were sliced before the check)."""
    with pytest.raises(ValueError, match=re.escape("labels[1, 3] = 9 is out of range")):
        LOSSES[loss](LABELS, shift=shift)


@pytest.mark.parametrize("shift", [1, 2, 3])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_item2_export_symbolic_length_with_shift_and_segments(loss, shift):
    """Before: shift >= 2 with segment_ids raised InconclusiveDimensionOperation
    ("'t - 2' < '0'") at export: a max() of the symbolic length."""
    (t,) = jax.export.symbolic_shape("t")
    depth = 4 if loss == "core" else 3
    specs = (
        jax.ShapeDtypeStruct((2, t, depth), jnp.float32),
        jax.ShapeDtypeStruct((2, t), jnp.int32),
        jax.ShapeDtypeStruct((2, t), jnp.int32),
    )
    w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)), "f4")

    def f(x, y, segments):
        opts = dict(shift=shift, segment_ids=segments, reduction="mean_per_segment")
        return ICE(x, y, **opts) if loss == "core" else LCE(x, w, y, **opts)

    exported = jax.export.export(jax.jit(f))(*specs)
    r = np.random.default_rng(3)
    for length in (shift + 1, 7):
        x = jnp.asarray(r.normal(size=(2, length, depth)), "f4")
        y = jnp.asarray(r.integers(0, 4, (2, length)), jnp.int32)
        segments = jnp.asarray(np.sort(r.integers(0, 3, (2, length)), axis=1))
        np.testing.assert_allclose(
            exported.call(x, y, segments), jax.jit(f)(x, y, segments), rtol=1e-6
        )


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_item6_int64_segment_ids_beyond_int32_raise_without_x64(loss):
    """Before: with x64 off, ids 0 and 2**32 merged into one segment (JAX
    holds them as int32) and mean_per_segment changed, silently."""
    assert not jax.config.jax_enable_x64
    labels = np.array([[0, 1, 2, 3]])
    segments = np.array([[0, 0, 2**32, 2**32]], np.int64)
    opts = dict(reduction="mean_per_segment")
    with pytest.raises(ValueError, match=re.escape("segment_ids[0, 2] = 4294967296")):
        LOSSES[loss](labels, segment_ids=segments, **opts)
    # The same ids renumbered within int32 (and int64 ids that fit) still work.
    want = LOSSES[loss](labels, segment_ids=np.array([[0, 0, 1, 1]]), **opts)
    fits = np.array([[0, 0, 2**31 - 1, 2**31 - 1]], np.int64)
    np.testing.assert_allclose(LOSSES[loss](labels, segment_ids=fits, **opts), want)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_triton"])
def test_item3_filter_keeps_a_differentiated_entropy_exact(impl, monkeypatch):
    """The issue's reproducer: V=17, eight classes of probability
    (1 - 9 x 0.009) / 8 and nine of 0.009, block_size=(4, 8), threshold
    0.01. The loss's gradient stays within the documented bound; with
    sum(aux.entropy) added, the filter is off and the gradient exact."""
    from xent_jax._linear import tiles

    monkeypatch.setitem(tiles.TILES, "tpu", tiles.Tiles(8, 128))
    monkeypatch.setitem(tiles.TILES, "triton", tiles.Tiles(16, 16, 16, programs=4))
    p = np.array([(1 - 9 * 0.009) / 8] * 8 + [0.009] * 9)
    x = jnp.eye(8, dtype=jnp.float32)
    w = jnp.asarray(np.tile(np.log(p), (8, 1)), jnp.float32)
    y = jnp.arange(8) % 17

    def grads(threshold, with_entropy):
        def total(x, w):
            loss, aux = LCE(
                x,
                w,
                y,
                block_size=(4, 8),
                return_aux=True,
                filter_threshold=threshold,
                implementation=impl,
                reduction="sum",
            )
            return loss + jnp.sum(aux.entropy) if with_entropy else loss

        return jax.jit(jax.grad(total, (0, 1)))(x, w)

    for with_entropy in (False, True):
        exact, filtered = grads(None, with_entropy), grads(0.01, with_entropy)
        if with_entropy:
            for g, e in zip(filtered, exact, strict=True):
                np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
        else:  # x = I: dw is the logits' gradient, within the threshold
            error = np.max(np.abs(filtered[1] - exact[1]))
            assert error <= 0.01, error
            if impl != "pallas_tpu":  # (its 128-class tile holds all 17)
                assert error > 1e-3, error  # blocks were skipped


def _plain_focal(x, y, gamma):
    """The focal loss as written, in float64 (the BCE in its stable form):
    finite at hard labels."""
    q = y * jax.nn.sigmoid(-x) + (1 - y) * jax.nn.sigmoid(x)
    bce = y * jax.nn.softplus(-x) + (1 - y) * jax.nn.softplus(x)
    return bce * q**gamma


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_item4_focal_gradient_at_hard_labels_is_finite(gamma):
    """Before: NaN for every gamma (log(y) and log1p(-y) differentiated at 0
    and 1). Now the float64 derivative of the formula, w.r.t. labels and
    logits, at extreme logits too; at gamma=0 the BCE's -x, as optax gives."""
    with float64():
        x = jnp.array([-200.0, -30.0, -2.0, 0.0, 1.5, 30.0, 200.0])
        for hard in (0.0, 1.0):
            y = jnp.full_like(x, hard)
            for arg in (0, 1):

                def total(x, y, f):
                    return jnp.sum(f(x, y))

                ours = jax.grad(total, arg)(
                    x, y, lambda x, y: xj.sigmoid_focal_loss(x, y, gamma=gamma)
                )
                want = jax.grad(total, arg)(
                    x, y, lambda x, y: _plain_focal(x, y, gamma)
                )
                assert np.isfinite(ours).all(), (hard, arg, ours)
                np.testing.assert_allclose(ours, want, rtol=1e-8, atol=1e-12)
            if gamma == 0.0:
                got = jax.grad(lambda y: xj.sigmoid_focal_loss(x, y, gamma=0.0).sum())(
                    y
                )
                np.testing.assert_array_equal(got, -x)


F32_TINY = float(np.finfo(np.float32).tiny)


def _tempered_losses(loss, temperature, labels):
    """Row 0 plain, row 1 with a masked (-inf) class."""
    x = np.array([[1.0, 3.0, 2.0], [0.5, -1.0, -np.inf]], np.float32)
    if loss == "core":
        return ICE(jnp.asarray(x), labels, temperature=temperature)
    bias = jnp.asarray(np.where(np.isinf(x), -np.inf, 0.0), jnp.float32)
    w = np.where(np.isinf(x), 0.0, x)  # D = 1: the logits are w's row
    outs = [
        LCE(
            jnp.ones((1, 1)),
            jnp.asarray(w[i : i + 1]),
            labels[i : i + 1],
            bias=bias[i],
            temperature=temperature,
            reduction="none",
        )
        for i in range(2)
    ]
    return jnp.concatenate(outs)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_item5_temperature_outside_the_compute_dtype_raises(loss):
    """Before: T=1e-300 and 1e-40 gave NaN on every row with float32 logits,
    and T=1e39 (also 1e38) NaN on a row with a masked class: XLA divides by T
    as a product with 1/T, flushed to zero. Such T raise naming temperature;
    at both ends of the range that works the losses are exact."""
    labels = jnp.array([1, 0])
    for bad in (1e-300, 1e-40, 1e38, 1e39):
        with pytest.raises(ValueError, match=r"temperature=.* is outside"):
            _tempered_losses(loss, bad, labels)
    # T = tiny: the label's distance to the row's max over T (0 at the max).
    got = _tempered_losses(loss, F32_TINY, jnp.array([1, 1]))
    np.testing.assert_allclose(got, [0.0, 1.5 / F32_TINY], rtol=1e-6)
    # T = 1/tiny: every kept class equally likely: log 3 and log 2.
    got = _tempered_losses(loss, 1 / F32_TINY, labels)
    np.testing.assert_allclose(got, [np.log(3), np.log(2)], rtol=1e-6)
    with float64():  # float64 holds 1e-300
        x = jnp.array([[1.0, 3.0, 2.0]])
        np.testing.assert_array_equal(ICE(x, jnp.array([1]), temperature=1e-300), [0])


@pytest.mark.parametrize("impl", [None, "reference"])
def test_item5_tiny_temperature_products_of_overflowing_distances(impl):
    """Found by issue 28's campaign: at T = 2^-126 a shifted logit (x_c - s)
    / T overflows float32 where t_c times it does not; the soft loss, the
    class-weighted loss and the gradients w.r.t. labels and class weights
    were inf where finite (the sums and products now precede the division)."""
    t_inv = 2.0**126
    x = jnp.array([[0.0, -5.0, -1.0]])  # distances 0, 5 / T, 1 / T
    soft = jnp.array([[0.5, 0.25, 0.25]])
    kw = dict(temperature=1 / t_inv, implementation=impl)
    one = dict(rtol=1e-6)
    np.testing.assert_allclose(SCE(x, soft, **kw), [1.5 * t_inv], **one)
    d_labels = jax.grad(lambda t: 0.75 * SCE(x, t, **kw).sum())(soft)
    np.testing.assert_allclose(d_labels, [[0, 3.75 * t_inv, 0.75 * t_inv]], **one)
    weights = jnp.array([1.0, 0.25, 1.0])

    def weighted(w, g, smoothing=0.0):
        loss = ICE(x, jnp.array([1]), class_weights=w, label_smoothing=smoothing, **kw)
        return g * loss.sum()

    np.testing.assert_allclose(weighted(weights, 1.0), 1.25 * t_inv, **one)
    d_weights = jax.grad(weighted)(weights, 0.5)
    np.testing.assert_allclose(d_weights, [0, 2.5 * t_inv, 0], **one)
    # Smoothing 0.3: 0.7 on the label plus 0.1 on each class.
    d_weights = jax.grad(weighted)(weights, 0.25, 0.3)
    want = 0.25 * np.array([0.0, 0.8 * 5, 0.1]) * t_inv
    np.testing.assert_allclose(d_weights, want, **one)


@pytest.mark.parametrize("soft", [False, True])
def test_item5_tiny_temperature_z_loss_gradient_has_no_nan(soft):
    """Found by issue 28's campaign: at T = 2^-126 with a z-loss, lse / T
    overflows the saved gradient's scale, ``jnp.square``'s derivative ``2
    lse`` overflowed in the z-term's unused branch, and a cotangent of -2
    times lse overflowed before z scaled it: NaN on every logit of the row.
    The gradient is ``g ((1 + 2 z lse) p - t) / T``: infinite at the row's
    maximum, ``-g / T`` at a label that is not, 0 elsewhere."""
    t_inv = 2.0**126
    x = jnp.array([[1.28, 0.21, -1.07, 0.72, 2.61], [1.89, -1.41, -2.53, -1.25, 0.08]])
    labels = jnp.array([4, 3])
    if soft:
        labels = jax.nn.one_hot(labels, 5)
    g = jnp.array([-2.0, 0.75])
    loss = SCE if soft else ICE

    def total(v):
        return jnp.sum(g * loss(v, labels, z_loss=1e-3, temperature=1 / t_inv))

    want = [[0, 0, 0, 0, -np.inf], [np.inf, 0, 0, -0.75 * t_inv, 0]]
    np.testing.assert_allclose(jax.grad(total)(x), want, rtol=1e-6)


@pytest.mark.parametrize("impl", [None, "reference"])
def test_item5_logits_spanning_more_than_the_range_with_smoothing(impl):
    """Found by issue 28's campaign: where a row's logits span more than the
    dtype's range, ``x_c - s`` overflows while the smoothed target's share of
    it does not: inf for an exact ``a / 2 * 6e38`` (the sums are now taken in
    halved shifted logits, ``_stats.half_shifted``). Soft labels too."""
    x = jnp.array([[-3e38, 3e38]])

    def loss(v, a):
        return ICE(v, jnp.array([1]), label_smoothing=a, implementation=impl)

    for a in (0.1, 0.5):
        np.testing.assert_allclose(loss(x, a), [a / 2 * 6e38], rtol=1e-6)
        grad = jax.grad(lambda v, a=a: loss(v, a).sum())(x)
        np.testing.assert_allclose(grad, [[-a / 2, a / 2]], rtol=1e-6)
    soft = jnp.array([[0.1, 0.9]])
    np.testing.assert_allclose(SCE(x, soft, implementation=impl), [6e37], rtol=1e-6)
    # The label's own term: (1 - a) of a distance past the range.
    np.testing.assert_array_equal(ICE(x, jnp.array([0]), implementation=impl), [np.inf])


@pytest.mark.parametrize("impl", [None, "reference"])
def test_item5_huge_temperature_logits_spanning_more_than_the_range(impl):
    """Found by issue 28's campaign (float32, ``T = 2^126``, logits up to
    ``+-2.8e38``): ``x_c - s`` overflowed to ``-inf`` where ``(x_c - s) / T``
    is -5.6, so that class dropped out of the log-sum-exp (loss 3.2577 for
    3.2600). With ``T > 1`` the shifted logits are halved before the
    division (``_stats.tempered_shifted``)."""
    x = np.array([[-2.77e38, 2.04e38, 1e37]], np.float32)
    t = 2.0**126
    z = x.astype(np.float64) / t
    lse = np.log(np.exp(z).sum())
    p = np.exp(z - lse)
    kw = dict(temperature=t, implementation=impl)
    for label in (0, 1):
        got = ICE(x, jnp.array([label]), **kw)
        np.testing.assert_allclose(got, [lse - z[0, label]], rtol=1e-6)
    soft = np.array([[0.5, 0.25, 0.25]])
    np.testing.assert_allclose(
        SCE(x, soft, **kw), [(soft * (lse - z)).sum()], rtol=1e-6
    )
    _, aux = ICE(x, jnp.array([0]), return_aux=True, **kw)
    np.testing.assert_allclose(aux.entropy, [-(p * np.log(p)).sum()], rtol=1e-6)
    weights = jnp.array([0.5, 1.0, 2.0])

    def weighted(w):
        return ICE(x, jnp.array([0]), class_weights=w, **kw).sum()

    np.testing.assert_allclose(
        jax.grad(weighted)(weights), [lse - z[0, 0], 0, 0], rtol=1e-6
    )


# The campaign's reproducer: V = 8, the tempered logits finite but spanning
# up to 5.2e38 per row; exact losses 0.7e38 to 3.2e38 (float64).
SPAN_X = [
    [-1.375, 1.25, 1.75],
    [-0.125, 0.625, 1.125],
    [1.25, 0.375, -2.0],
    [0.375, -1.75, 0.625],
]
SPAN_W = [
    [0.375, -1.5, 0.75, 1.875, 1.5, -1.125, 1.25, 0.375],
    [0.375, 0.5, -1.5, 0.75, 1.125, -0.25, -1.125, -0.75],
    [-0.375, -0.625, 0.375, -0.125, -0.5, 0.625, 2.0, -0.625],
]


@pytest.mark.parametrize("impl", [None, "reference", "pallas_tpu", "pallas_triton"])
def test_item5_fused_tiny_temperature_smoothing_stays_finite(impl):
    """Found by issue 28's campaign (float32, ``label_smoothing=0.1``, ``T =
    2^-126``): the fused loss gave inf on every row, the materialised one on
    three. Two causes: the smoothing sum over shifted logits overflowed (now
    halved, with ``a / V`` inside), and ``x / T`` before the matmul made
    products of ``2^128`` for a logit of ``-2.4e38`` (now ``x`` is divided by
    the part of ``T`` in ``[1, 2)`` and the product scaled by a power of two:
    ``blocks.divided_input``)."""
    x, w = np.array(SPAN_X, np.float32), np.array(SPAN_W, np.float32)
    labels = np.array([4, 1, 2, 2])
    t = 2.0**-126
    z = (x.astype(np.float64) @ w) / t
    lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
    exact = 0.9 * (lse - z[np.arange(4), labels]) + 0.1 * (lse - z.mean(1))
    got = LCE(
        x,
        w,
        labels,
        label_smoothing=0.1,
        temperature=t,
        reduction="none",
        implementation=impl,
    )
    np.testing.assert_allclose(got, exact, rtol=1e-6)
    # A product past the range, the logit inside it: z_0 = -2^126, exactly.
    x, w = (
        np.array([[-2.0, 1.0]], np.float32),
        np.array([[2.0, 0.0], [3.0, 0.0]], np.float32),
    )
    got = LCE(x, w, np.array([0]), temperature=t, implementation=impl)
    np.testing.assert_array_equal(got, [2.0**126])


BOOLEAN_OPTIONS = {
    "return_aux": (_core, _fused),
    "return_lse": (_fused,),
}


@pytest.mark.parametrize("option", sorted(BOOLEAN_OPTIONS))
def test_item7_boolean_options_validated_alike(option):
    """Before: return_lse="False" returned (loss, lse); return_aux refused
    np.bool_. Every boolean option takes a bool or np.bool_, nothing else."""
    labels = LABELS[:1] % 4
    for loss in BOOLEAN_OPTIONS[option]:
        for bad in ("False", "True", 0, 1, 1.0, None):
            with pytest.raises(TypeError, match=f"{option} must be a Python bool"):
                loss(labels, **{option: bad})
        for given, pair in ((np.bool_(True), True), (np.bool_(False), False)):
            out = loss(labels, **{option: given})
            assert isinstance(out, tuple) == pair


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_item9_linear_cross_entropy_takes_a_per_example_where(reduction, shift):
    """The fused loss's ``where`` is the core loss's per-example one: the same
    values and gradients (x and w) on the materialised logits, with shift."""
    r = np.random.default_rng(4)
    h = jnp.asarray(r.normal(size=(2, 6, 5)), "f4")
    w = jnp.asarray(r.normal(size=(5, 7)), "f4")
    y = jnp.asarray(r.integers(0, 7, (2, 6)), jnp.int32)
    mask = jnp.asarray(r.random((2, 6)) < 0.6)
    opts = dict(where=mask, reduction=reduction, shift=shift)

    def fused(h, w):
        return jnp.sum(LCE(h, w, y, **opts))

    def core(h, w):
        return jnp.sum(ICE(h @ w, y, **opts))

    np.testing.assert_allclose(fused(h, w), core(h, w), rtol=1e-5)
    grads = jax.grad(fused, (0, 1))(h, w), jax.grad(core, (0, 1))(h, w)
    for g, e in zip(*grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert not np.any(jax.grad(fused)(h, w)[~np.asarray(mask)])  # masked rows: 0
    with pytest.raises(ValueError, match=r"where must have shape \(2, 6\)"):
        LCE(h, w, y, where=jnp.ones((2, 6, 7), bool))
    with pytest.raises(TypeError, match="where must be a boolean mask"):
        LCE(h, w, y, where=mask.astype(jnp.int32))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_item10_segment_padding_id_zero_as_t5x_and_maxtext(loss):
    """t5x and MaxText pack sequences with ids 1, 2, ... and pad with 0:
    ``segment_padding_id=0`` gives what the same batch renumbered with a
    negative padding id gives (before, the padding scored as a segment)."""
    labels = np.array([[1, 2, 3, 0, 1, 2], [3, 3, 1, 2, 0, 1]])
    t5x = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 0, 0]])
    ours = np.where(t5x == 0, -1, t5x)
    for shift in (0, 1):
        opts = dict(reduction="mean_per_segment", shift=shift)
        want = LOSSES[loss](labels, segment_ids=ours, **opts)
        got = LOSSES[loss](labels, segment_ids=t5x, segment_padding_id=0, **opts)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        unpadded = LOSSES[loss](labels, segment_ids=t5x, **opts)
        assert not np.allclose(unpadded, want)  # the trap the option removes
    with pytest.raises(ValueError, match="segment_padding_id needs segment_ids"):
        LOSSES[loss](labels, segment_padding_id=0)
    with pytest.raises(ValueError, match="segment_padding_id=-1 cannot occur"):
        LOSSES[loss](labels, segment_ids=t5x.astype(np.uint8), segment_padding_id=-1)
    with pytest.raises(TypeError, match="segment_padding_id must be a Python int"):
        LOSSES[loss](labels, segment_ids=t5x, segment_padding_id=0.0)


def test_item10_t5x_label_smoothing_mapping():
    """docs/semantics.md's mapping: t5x's loss with label smoothing a (targets
    1 - a on the label, a / (V - 1) elsewhere, minus the targets' entropy) is
    ours with label_smoothing = a V / (V - 1), minus that constant."""
    r = np.random.default_rng(5)
    v, a = 7, 0.1
    x = jnp.asarray(r.normal(size=(4, v)), "f4")
    y = jnp.asarray(r.integers(0, v, 4), jnp.int32)
    on, off = 1 - a, a / (v - 1)
    targets = jax.nn.one_hot(y, v) * (on - off) + off
    constant = -(on * np.log(on) + (v - 1) * off * np.log(off))
    t5x = -jnp.sum(targets * jax.nn.log_softmax(x), axis=-1) - constant
    ours = ICE(x, y, label_smoothing=a * v / (v - 1)) - constant
    np.testing.assert_allclose(ours, t5x, rtol=1e-5, atol=1e-6)


# --- item 8 ------------------------------------------------------------------------


ROUNDED_ONCE = {
    "mean": dict(reduction="mean"),
    "sum with class weights": dict(reduction="sum", class_weights=True),
    "mean, weights, smoothing, z-loss": dict(
        reduction="mean", class_weights=True, label_smoothing=0.1, z_loss=1e-2
    ),
    "mean, temperature": dict(reduction="mean", temperature=0.7),
    "none, summed": dict(reduction="none"),
    "soft labels, mean": dict(reduction="mean", soft=True),
    "mean_per_segment": dict(reduction="mean_per_segment", segments=True),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", ROUNDED_ONCE)
def test_item8_16bit_gradient_is_rounded_once(case, dtype):
    """The loss differentiated as it is gives the correctly rounded gradient
    (before: 1.0 ulp for a plain mean, 1.41 with class weights, 392 with label
    smoothing in bfloat16)."""
    opts = dict(ROUNDED_ONCE[case])
    soft, segments = opts.pop("soft", False), opts.pop("segments", False)
    rng = np.random.default_rng(8)
    n, c = 24, 40
    x = jnp.asarray(rng.normal(size=(n, c)) * 3, dtype)
    if opts.pop("class_weights", False):
        opts["class_weights"] = jnp.asarray(rng.uniform(0.5, 2, c), "f4")
    if soft:
        labels = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, c)), "f4"))
    else:
        labels = jnp.asarray(rng.integers(0, c, n), "i4")
    if segments:
        opts["segment_ids"] = jnp.asarray(np.repeat([0, 1, 2], [5, 8, 11]))
    loss = xj.softmax_cross_entropy if soft else ICE
    got = jax.grad(lambda v: jnp.sum(loss(v, labels, **opts)))(x)
    reduction = opts.pop("reduction")
    segment_ids = opts.pop("segment_ids", None)
    terms = ref.soft_xent_terms if soft else ref.integer_xent_terms
    index = None if segment_ids is None else ref.segment_index(segment_ids, (n,))

    def want_loss(v):
        t = terms(v, labels, segment_ids=segment_ids, **opts)
        return jnp.sum(ref.reduce_terms(t, reduction, segments=index))

    with float64():
        want = jax.grad(want_loss)(x.astype("f8"))
        errors = ulps(got, want, dtype)
    # Correctly rounded from float32 arithmetic: half an ulp, and float32's
    # own error (2^-13 ulp of float16) where the exact value is near a tie.
    assert errors.max() <= 0.5 + 2.0**-10, (case, errors.max())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_item8_fused_16bit_gradient_rounds_the_logits_gradient_once(reduction, dtype):
    """The fused loss's 16-bit gradients are within the bound of one rounding
    of the logits' gradient and one of the product: ``u (sum_k |a_k| |dl_k| +
    |g|)``, with ``u`` the dtype's unit roundoff."""
    rng = np.random.default_rng(8)
    n, d, v = 24, 16, 40
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.5, dtype)
    y = jnp.asarray(rng.integers(0, v, n), "i4")
    cw = jnp.asarray(rng.uniform(0.5, 2, v), "f4")
    opts = dict(reduction=reduction, class_weights=cw, label_smoothing=0.1)
    got = jax.grad(lambda a, b: LCE(a, b, y, **opts), (0, 1))(h, w)
    with float64():
        h64, w64 = h.astype("f8"), w.astype("f8")
        want = jax.grad(
            lambda a, b: LCE(a, b, y, implementation="reference", **opts), (0, 1)
        )(h64, w64)
        dl = np.asarray(
            jax.grad(lambda z: ICE(z, y, implementation="reference", **opts))(h64 @ w64)
        )
    u = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
    h64, w64 = np.abs(np.asarray(h64)), np.abs(np.asarray(w64))
    scales = (np.abs(dl) @ w64.T, h64.T @ np.abs(dl))
    for g, g64, scale in zip(got, want, scales, strict=True):
        g64 = np.asarray(g64)
        bound = u * (scale + np.abs(g64))
        assert (np.abs(np.asarray(g, "f8") - g64) <= bound).all()
