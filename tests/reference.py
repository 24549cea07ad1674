"""Independent plain-jnp reference for the xent_jax losses.

Written from the formulas in the specification, not from the package: it must
never import ``xent_jax``. Gradients come from ordinary autodiff, so every
transformation (jvp, hessian, grad-of-grad) works on it, and the gradient with
respect to every floating input (logits, soft labels, class weights, ``x``,
``w``, ``bias``, BCE ``weights`` and ``pos_weight``, focal ``alpha``, a
``normalizer``) is the true one.

Conventions (integer labels, per example; ``keep`` = ``where``; ``C_row`` =
number of kept classes in the row; ``w`` = class weights or 1):

    t    = w * ((1 - a) * onehot(y) + a / C_row) * keep
    ce   = sum_c t_c * (lse - x_c)
    zl   = z * lse**2                     (nothing at all when z == 0)
    loss = ce + zl

Soft labels use ``labels`` in place of ``onehot(y)``. In detail:

* Labels are compared exactly, whatever their integer dtype: a label is a
  class iff ``0 <= v < C``, ignored iff ``v == ignore_index`` (an
  ``ignore_index`` the labels' dtype cannot represent matches nothing), and
  out of range otherwise: its loss is NaN and it gets no gradient.
* Ignored, out-of-range and fully masked rows are *unscored*: loss 0 (NaN when
  out of range) and exactly zero gradient, whatever their logits (NaN, +-inf).
* A NaN in a kept class of a scored row makes that row's loss NaN.
* A class whose target mass is zero contributes nothing even when its logit is
  +-inf (``0 * log 0 = 0``). A ``-inf`` logit with target mass gives ``+inf``
  (also when every kept logit is ``-inf``); a ``+inf`` logit makes ``lse``
  ``+inf`` (the loss is ``+inf``, NaN if the target has mass on a ``+inf``
  class).
* Everything is computed in shifted coordinates (``x - max``), so a large
  common offset costs no accuracy; 16-bit inputs are computed in float32.

Reductions (:func:`reduce_terms`): ``"mean"`` is
``sum(ce) / D_ce + sum(zl) / D_z`` with ``D_z`` the number of scored examples
and ``D_ce`` the sum of ``class_weights[label]`` over them (integer labels
with class weights; the count otherwise). A zero denominator makes its term 0.
A scalar ``normalizer`` replaces both denominators, a pair ``(n_ce, n_z)`` each.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Terms",
    "bce",
    "clip_pairs",
    "distillation",
    "integer_mean_denominator",
    "integer_xent",
    "integer_xent_terms",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "label_status",
    "linear_logits",
    "linear_xent",
    "linear_xent_terms",
    "mean_of_terms",
    "poly_loss",
    "reduce",
    "reduce_terms",
    "safe_soft_xent",
    "sigmoid_focal",
    "siglip_pairs",
    "smooth_labels",
    "soft_xent",
    "soft_xent_terms",
    "softmax_focal",
    "torch_cross_entropy_np",
]


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int | np.integer):
        axis = (int(axis),)
    return tuple(sorted(int(a) % ndim for a in axis))


def _classes_last(x, axes):
    """Moves the class axes to the end (keeping their order) and flattens them."""
    batch = tuple(i for i in range(x.ndim) if i not in axes)
    n_classes = int(np.prod([x.shape[a] for a in axes]))
    x = jnp.transpose(x, batch + axes)
    return x.reshape(x.shape[: len(batch)] + (n_classes,))


def _keep_mask(where, shape, axes):
    """``where`` per class (logits' shape) or per example (batch shape)."""
    if where is None:
        return jnp.ones(shape, bool)
    where = jnp.asarray(where, bool)
    if where.ndim != len(shape):
        where = jnp.expand_dims(where, axes)
    return jnp.broadcast_to(where, shape)


def _compute_dtype(x):
    x = jnp.asarray(x)
    if x.dtype in (jnp.float16, jnp.bfloat16):
        return x.astype(jnp.float32)
    return x


# --- exact label arithmetic ---------------------------------------------------


def _as_labels(labels):
    """Integer labels as a jax array of their own dtype (lists become arrays)."""
    if isinstance(labels, jax.Array):
        return labels
    return jnp.asarray(np.asarray(labels))


def _equals(labels, value):
    """``labels == value`` exactly; False where the dtype cannot hold ``value``."""
    if value is None:
        return jnp.zeros(labels.shape, bool)
    value = int(value)
    info = jnp.iinfo(labels.dtype)
    if not info.min <= value <= info.max:
        return jnp.zeros(labels.shape, bool)
    return labels == jnp.asarray(value, labels.dtype)


def _is_class(labels, num_classes):
    """``0 <= labels < num_classes`` exactly, for any integer dtype."""
    info = jnp.iinfo(labels.dtype)
    ok = jnp.ones(labels.shape, bool)
    if info.min < 0:
        ok = ok & (labels >= jnp.asarray(0, labels.dtype))
    if num_classes <= info.max:
        ok = ok & (labels < jnp.asarray(num_classes, labels.dtype))
    return ok


def label_status(labels, num_classes, ignore_index=None):
    """``(is_class, ignored, bad)`` masks of integer labels, compared exactly."""
    labels = _as_labels(labels)
    ignored = _equals(labels, ignore_index)
    is_class = _is_class(labels, num_classes) & ~ignored
    bad = ~is_class & ~ignored
    return is_class, ignored, bad


def _class_index(labels, is_class):
    """The label as an int32 index (0 where it is not a class)."""
    zero = jnp.zeros((), labels.dtype)
    return jnp.where(is_class, labels, zero).astype(jnp.int32)


# --- language-model options: temperature, shift, segments -------------------------


def tempered(x, temperature):
    """The logits divided by the temperature (``None``: as they are)."""
    return x if temperature is None else x / temperature


def shifted_labels(labels, shift):
    """``(labels at t + shift, has_target)`` along the last axis; the last
    ``shift`` positions have no target (their label is a placeholder 0)."""
    labels = _as_labels(labels)
    if not shift:
        return labels, jnp.ones(labels.shape, bool)
    length = labels.shape[-1]
    k = min(shift, length)
    fill = jnp.zeros(labels.shape[:-1] + (k,), labels.dtype)
    moved = jnp.concatenate([labels[..., k:], fill], axis=-1)
    has = jnp.broadcast_to(jnp.arange(length) < length - k, labels.shape)
    return moved, has


def segment_allowed(segment_ids, shift, ignore_index):
    """Positions that segments let score: not padding (a negative id, or one
    equal to ``ignore_index``) and, with ``shift``, every position up to
    ``t + shift`` in the segment of ``t`` (inside the sequence)."""
    seg = _as_labels(segment_ids)
    ok = ~_equals(seg, ignore_index)
    if jnp.iinfo(seg.dtype).min < 0:
        ok = ok & (seg >= jnp.asarray(0, seg.dtype))
    length = seg.shape[-1]
    for k in range(1, shift + 1):
        ahead = jnp.roll(seg, -k, axis=-1)
        ok = ok & (ahead == seg) & (jnp.arange(length) < length - k)
    return ok


def lm_targets(labels, shift=0, segment_ids=None, ignore_index=None):
    """``(targets, allowed)``: the labels moved by ``shift`` and the examples
    that shift and segments let score."""
    labels, allowed = shifted_labels(labels, shift)
    if segment_ids is not None:
        allowed = allowed & segment_allowed(segment_ids, shift, ignore_index)
    return labels, allowed


def segment_index(segment_ids, shape):
    """Each position's segment as a dense index (row-major rows, then runs of
    equal ids along the last axis); without ids every row is one segment."""
    if not shape:
        return jnp.zeros((), jnp.int32)
    length = shape[-1]
    row = jnp.arange(int(np.prod(shape)), dtype=jnp.int32).reshape(shape) // max(
        length, 1
    )
    if segment_ids is None:
        return row
    seg = _as_labels(segment_ids)
    first = jnp.ones(shape[:-1] + (min(length, 1),), bool)
    new = jnp.concatenate([first, seg[..., 1:] != seg[..., :-1]], axis=-1)
    run = jnp.cumsum(new, axis=-1, dtype=jnp.int32) - 1
    return row * length + run


# --- per-example statistics (return_aux) -------------------------------------------


class AuxStats(NamedTuple):
    lse: jax.Array
    argmax: jax.Array
    entropy: jax.Array


def softmax_stats(x, keep, temperature=None):
    """``lse``, ``argmax`` and the entropy over the kept classes of
    classes-last logits ``x / T`` (shifted before the division); ``lse`` is
    ``-inf`` (entropy 0) where no kept logit is above ``-inf``, ``+inf``
    (entropy NaN) at a kept ``+inf``, NaN at a kept NaN (argmax: the first
    NaN)."""
    keep = jnp.broadcast_to(keep, x.shape)
    xk = jnp.where(keep, x, -jnp.inf)
    nan_row = jnp.any(keep & jnp.isnan(x), axis=-1)
    inf_row = jnp.any(keep & jnp.isposinf(x), axis=-1)
    m = jax.lax.stop_gradient(jnp.max(jnp.where(jnp.isnan(xk), -jnp.inf, xk), -1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    fin = keep & jnp.isfinite(x)
    xs = jnp.where(fin, tempered(xk - m[..., None], temperature), 0.0)
    e = jnp.where(fin, jnp.exp(xs), 0.0)
    s = jnp.sum(e, axis=-1)
    mass = s > 0
    safe_s = jnp.where(mass, s, 1.0)
    lse = jnp.where(mass, jnp.log(safe_s) + tempered(m, temperature), -jnp.inf)
    entropy = jnp.where(mass, jnp.log(safe_s) - jnp.sum(e * xs, -1) / safe_s, 0.0)
    lse = jnp.where(inf_row, jnp.inf, lse)
    entropy = jnp.where(inf_row, jnp.nan, entropy)
    lse = jnp.where(nan_row, jnp.nan, lse)
    entropy = jnp.where(nan_row, jnp.nan, entropy)
    first_nan = jnp.argmax(keep & jnp.isnan(x), axis=-1)
    argmax = jnp.where(
        nan_row,
        first_nan,
        jnp.argmax(jnp.where(fin | jnp.isposinf(xk), xk, -jnp.inf), -1),
    )
    return AuxStats(lse, argmax.astype(jnp.int32), entropy)


# --- the shared formula ---------------------------------------------------------


class Terms(NamedTuple):
    """Per-example parts of a softmax loss (all with the batch shape).

    ``ce`` is NaN on out-of-range labels and on scored rows with a NaN kept
    logit; ``zl`` is the z-loss term (0 when ``z_loss == 0``); ``weight`` is
    each example's share of the mean's cross-entropy denominator
    (``class_weights[label]`` for weighted integer labels, else 1; 0 when not
    scored); ``scored`` marks the examples in the z-loss denominator.
    """

    ce: jax.Array
    zl: jax.Array
    weight: jax.Array
    scored: jax.Array

    @property
    def loss(self):
        return self.ce + self.zl


def _xent_terms(x, t, keep, row_ok, z_loss, temperature=None):
    """``(ce, zl)`` of ``x / T`` over the last axis in shifted coordinates
    (shifted before the division, so that an offset cancels exactly); 0 where
    not row_ok.

    ``t`` must already be zero on classes that ``keep`` drops.
    """
    # Double-where: rows that do not count get harmless inputs so that no NaN
    # can reach the gradient through the unselected branch.
    ok = row_ok[..., None]
    x = jnp.where(ok, x, 0.0)
    keep = jnp.where(ok, keep, True)
    t = jnp.where(ok, t, 0.0)
    has_nan = jnp.any(keep & jnp.isnan(x), axis=-1)
    xk = jnp.where(keep, x, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(xk, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    xs = tempered(xk - m, temperature)  # shifted logits; -inf on dropped classes
    s = jnp.sum(jnp.where(keep, jnp.exp(xs), 0.0), axis=-1, keepdims=True)
    # No finite kept logit: lse = -inf, with no 0 * inf in the gradient.
    has_mass = s > 0
    lse_s = jnp.where(has_mass, jnp.log(jnp.where(has_mass, s, 1.0)), -jnp.inf)
    # T (lse - x_c), in the logits' own units: (x_c - m) / T may overflow
    # where t_c times it does not (T near the smallest normal), so the sum
    # is divided by T last. +inf at a -inf logit, also when every kept logit
    # is -inf.
    xr = xk - m
    lse_r = lse_s if temperature is None else lse_s * temperature
    nl = jnp.where(jnp.isneginf(xr), jnp.inf, lse_r - xr)
    skip = (t == 0) & ~jnp.isfinite(nl)
    nl = jnp.where(skip, 0.0, nl)
    ce = tempered(jnp.sum(jnp.where(skip, 0.0, t * nl), axis=-1), temperature)
    ce = jnp.where(has_nan, jnp.nan, ce)
    lse = (lse_s + tempered(m, temperature))[..., 0]
    if isinstance(z_loss, int | float) and z_loss == 0:
        zl = jnp.zeros_like(ce)
    else:
        zl = z_loss * lse**2
    zero = jnp.zeros_like(ce)
    return jnp.where(row_ok, ce, zero), jnp.where(row_ok, zl, zero)


def integer_xent_terms(
    logits,
    labels,
    axis=-1,
    where=None,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    temperature=None,
    shift=0,
    segment_ids=None,
):
    """:class:`Terms` of the integer-label cross-entropy (explicit one-hot)."""
    logits = _compute_dtype(logits)
    axes = _axes(axis, logits.ndim)
    keep = _classes_last(_keep_mask(where, logits.shape, axes), axes)
    x = _classes_last(logits, axes)
    labels, allowed = lm_targets(labels, shift, segment_ids, ignore_index)
    return _integer_terms(
        x,
        labels,
        keep,
        num_classes=x.shape[-1],
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        allowed=allowed,
        temperature=temperature,
    )


def _integer_terms(
    x,
    labels,
    keep,
    *,
    num_classes,
    ignore_index,
    label_smoothing,
    class_weights,
    z_loss,
    allowed=None,
    temperature=None,
):
    """:class:`Terms` for classes-last ``x``; labels must lie below num_classes;
    ``allowed``: examples that may score (shift and segments)."""
    labels = _as_labels(labels)
    n_columns = x.shape[-1]
    is_class, _, bad = label_status(labels, num_classes, ignore_index)
    idx = _class_index(labels, is_class)
    onehot = (idx[..., None] == jnp.arange(n_columns)) & is_class[..., None]
    onehot = onehot.astype(x.dtype)
    c_row = jnp.sum(keep, axis=-1, keepdims=True).astype(x.dtype)
    row_ok = jnp.any(keep, axis=-1) & is_class
    if allowed is not None:
        row_ok = row_ok & allowed
    w = 1.0 if class_weights is None else jnp.asarray(class_weights, x.dtype)
    a = label_smoothing
    t = w * ((1.0 - a) * onehot + a / jnp.maximum(c_row, 1.0)) * keep
    ce, zl = _xent_terms(x, t, keep, row_ok, z_loss, temperature)
    ce = jnp.where(bad, jnp.nan, ce)
    if class_weights is None:
        weight = row_ok.astype(x.dtype)
    else:
        w_y = jnp.asarray(class_weights, x.dtype)[idx]
        weight = jnp.where(row_ok, w_y, 0.0)
    return Terms(ce, zl, weight, row_ok)


def soft_xent_terms(
    logits,
    labels,
    axis=-1,
    where=None,
    *,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    temperature=None,
    segment_ids=None,
):
    """:class:`Terms` of the soft-label cross-entropy."""
    logits = _compute_dtype(logits)
    labels = jnp.asarray(labels, logits.dtype)
    axes = _axes(axis, logits.ndim)
    keep = _classes_last(_keep_mask(where, logits.shape, axes), axes)
    x = _classes_last(logits, axes)
    y = _classes_last(labels, axes)
    c_row = jnp.sum(keep, axis=-1, keepdims=True).astype(x.dtype)
    row_ok = jnp.any(keep, axis=-1)
    if segment_ids is not None:
        row_ok = row_ok & segment_allowed(segment_ids, 0, None)
    w = 1.0 if class_weights is None else jnp.asarray(class_weights, x.dtype)
    a = label_smoothing
    t = w * ((1.0 - a) * y + a / jnp.maximum(c_row, 1.0)) * keep
    ce, zl = _xent_terms(x, t, keep, row_ok, z_loss, temperature)
    return Terms(ce, zl, row_ok.astype(x.dtype), row_ok)


def soft_xent(
    logits,
    labels,
    axis=-1,
    where=None,
    *,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
):
    """Per-example soft-label cross-entropy (batch shape), unreduced."""
    return soft_xent_terms(
        logits,
        labels,
        axis,
        where,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
    ).loss


def integer_xent(
    logits,
    labels,
    axis=-1,
    where=None,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
):
    """Per-example integer-label cross-entropy, explicit one-hot, unreduced."""
    return integer_xent_terms(
        logits,
        labels,
        axis,
        where,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
    ).loss


def integer_mean_denominator(
    labels,
    logits_shape=None,
    axis=-1,
    where=None,
    ignore_index=None,
    class_weights=None,
):
    """PyTorch's 'mean' denominator: sum of w[label] over counted examples.

    Counted: labels other than ``ignore_index`` (compared exactly), and, when
    the number of classes is known (``logits_shape`` or ``class_weights``),
    only class ids.
    """
    labels = _as_labels(labels)
    valid = ~_equals(labels, ignore_index)
    n = None
    if logits_shape is not None:
        n = int(np.prod([logits_shape[a] for a in _axes(axis, len(logits_shape))]))
    elif class_weights is not None:
        n = int(np.shape(class_weights)[0])
    if n is not None:
        valid = valid & _is_class(labels, n)
    if where is not None:
        where = jnp.asarray(where, bool)
        if where.ndim != labels.ndim:
            axes = _axes(axis, len(logits_shape))
            where = jnp.any(_classes_last(where, axes), axis=-1)
        valid = valid & where
    if class_weights is None:
        per = jnp.ones(labels.shape, jnp.float32)
    else:
        cw = jnp.asarray(class_weights)
        per = cw[_class_index(labels, valid)]
    return jnp.sum(jnp.where(valid, per, 0.0))


# --- reductions -------------------------------------------------------------------


def reduce(loss, reduction, denominator=None, normalizer=None):
    """none / sum / mean with the given denominator; denominator 0 -> mean 0."""
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    assert reduction == "mean"
    den = loss.size if denominator is None else denominator
    if normalizer is not None:
        den = normalizer
    return _safe_div(total, den)


def _safe_div(total, den):
    """``total / den``; where ``den == 0``, 0 with zero gradient, except that a
    NaN total (an out-of-range label, a NaN logit) stays NaN."""
    den = jnp.asarray(den, total.dtype)
    zero = den == 0
    empty = jnp.where(jnp.isnan(total), jax.lax.stop_gradient(total), 0.0)
    return jnp.where(zero, empty, total / jnp.where(zero, 1.0, den))


def mean_of_terms(terms: Terms, normalizer=None):
    """``sum(ce) / D_ce + sum(zl) / D_z`` (see the module docstring).

    ``normalizer``: ``None``, a scalar (both denominators) or a pair
    ``(ce_denominator, z_denominator)``. Every denominator is differentiated.
    """
    if normalizer is None:
        den_ce, den_z = jnp.sum(terms.weight), jnp.sum(terms.scored)
    elif isinstance(normalizer, tuple | list) and len(normalizer) == 2:
        den_ce, den_z = normalizer
    else:
        den_ce = den_z = normalizer
    return _safe_div(jnp.sum(terms.ce), den_ce) + _safe_div(jnp.sum(terms.zl), den_z)


def mean_per_segment(terms: Terms, index, normalizer=None):
    """The mean of :class:`Terms` within each segment (``index``: each
    example's segment, :func:`segment_index`), averaged over the segments with
    a scored example (or divided by ``normalizer``)."""
    index = jnp.reshape(index, -1)
    member = index[:, None] == jnp.arange(index.size)[None, :]  # [example, segment]

    def per_segment(v):
        v = jnp.reshape(jnp.asarray(v, terms.ce.dtype), -1)[:, None]
        return jnp.sum(jnp.where(member, v, 0.0), axis=0)

    counts = per_segment(terms.scored)
    means = _safe_div(per_segment(terms.ce), per_segment(terms.weight))
    means = means + _safe_div(per_segment(terms.zl), counts)
    den = jnp.sum(counts > 0) if normalizer is None else normalizer
    return _safe_div(jnp.sum(means), den)


def reduce_terms(terms: Terms, reduction, normalizer=None, segments=None):
    """``"none"`` / ``"sum"`` / ``"mean"`` (new denominators) /
    ``"mean_per_segment"`` (``segments``: :func:`segment_index`) of
    :class:`Terms`."""
    if reduction == "none":
        return terms.loss
    if reduction == "sum":
        return jnp.sum(terms.loss)
    if reduction == "mean_per_segment":
        return mean_per_segment(terms, segments, normalizer)
    assert reduction == "mean"
    return mean_of_terms(terms, normalizer)


# --- fused linear + cross-entropy -----------------------------------------------


def linear_logits(x, w, bias=None, logit_softcap=None, temperature=None):
    """``cap((x @ w + bias) / T)`` in the compute dtype (16-bit promoted to
    float32)."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    dtype = _compute_dtype(jnp.zeros((), jnp.promote_types(x.dtype, w.dtype))).dtype
    z = jnp.matmul(
        x.astype(dtype), w.astype(dtype), precision=jax.lax.Precision.HIGHEST
    )
    if bias is not None:
        z = z + jnp.asarray(bias, dtype)
    z = tempered(z, temperature)
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    return z


def linear_xent_terms(
    x,
    w,
    labels,
    *,
    bias=None,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    logit_softcap=None,
    num_classes=None,
    temperature=None,
    shift=0,
    segment_ids=None,
):
    """:class:`Terms` of the integer cross-entropy on ``cap((x @ w + bias) / T)``.

    Columns ``>= num_classes`` are padding: not part of the function (their
    logits are never computed), and labels there are out of range. The rows of ``x`` of
    unscored examples are replaced by zeros before the matmul (double-where),
    so that nothing non-finite there reaches any gradient.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    labels, allowed = lm_targets(labels, shift, segment_ids, ignore_index)
    v = w.shape[-1]
    num_classes = v if num_classes is None else int(num_classes)
    is_class, _, _ = label_status(labels, num_classes, ignore_index)
    x = jnp.where((is_class & allowed)[..., None], x, jnp.zeros((), x.dtype))
    # Padding columns are not part of the function: computed from the real
    # columns only (so that nothing in them reaches a gradient), then -inf.
    real = None if bias is None else jnp.asarray(bias)[:num_classes]
    z = linear_logits(x, w[..., :num_classes], real, logit_softcap, temperature)
    pad = jnp.full(z.shape[:-1] + (v - num_classes,), -jnp.inf, z.dtype)
    z = jnp.concatenate([z, pad], axis=-1)
    keep = jnp.broadcast_to(jnp.arange(v) < num_classes, z.shape)
    return _integer_terms(
        z,
        labels,
        keep,
        num_classes=num_classes,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        allowed=allowed,
    )


def linear_xent(
    x,
    w,
    labels,
    *,
    bias=None,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    logit_softcap=None,
    num_classes=None,
):
    """Per-example loss of the fused linear + cross-entropy (labels' shape)."""
    return linear_xent_terms(
        x,
        w,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        num_classes=num_classes,
    ).loss


# --- sigmoid BCE --------------------------------------------------------------------


def _times(coef, value):
    """``coef * value`` with ``0 * inf = 0`` (and a zero gradient there)."""
    skip = (coef == 0) & jnp.isinf(value)
    return jnp.where(skip, 0.0, coef * jnp.where(skip, 0.0, value))


def bce(logits, labels, *, pos_weight=None, label_smoothing=0.0, weights=None):
    """Elementwise BCE: ``w [pw y softplus(-x) + (1-y) softplus(x)]``.

    A term whose coefficient is 0 is dropped (exact limits at +-inf logits).
    """
    logits = _compute_dtype(logits)
    y = jnp.asarray(labels).astype(logits.dtype)
    a = label_smoothing
    y = y * (1.0 - a) + a / 2.0
    pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, logits.dtype)
    loss = _times(pw * y, jax.nn.softplus(-logits)) + _times(
        1.0 - y, jax.nn.softplus(logits)
    )
    if weights is not None:
        loss = loss * jnp.asarray(weights, logits.dtype)
    return loss


# --- focal and optax-semantics helpers ------------------------------------------


def softmax_focal(
    logits,
    labels,
    *,
    gamma=2.0,
    alpha=None,
    axis=-1,
    where=None,
    ignore_index=None,
):
    """``-alpha_y (1 - p_y)^gamma log p_y`` per example (0 when unscored)."""
    terms = integer_xent_terms(logits, labels, axis, where, ignore_index=ignore_index)
    ce = terms.ce  # -log p_y; NaN for out-of-range labels
    ok = terms.scored & jnp.isfinite(ce)
    ce_safe = jnp.where(ok, ce, 1.0)
    if gamma == 0:  # (1 - p)^0 = 1, also at p = 1 (no 0 * inf gradient)
        loss = ce_safe
    else:
        loss = (1.0 - jnp.exp(-ce_safe)) ** gamma * ce_safe
    loss = jnp.where(ok, loss, ce)
    if alpha is not None:
        alpha = jnp.asarray(alpha, ce.dtype)
        if alpha.ndim == 1:
            labels = _as_labels(labels)
            is_class, _, _ = label_status(labels, alpha.shape[0], ignore_index)
            alpha = alpha[_class_index(labels, is_class)]
        loss = jnp.where(terms.scored, alpha * loss, loss)
    return loss


def safe_soft_xent(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(labels != 0, labels * logp, 0.0), axis=-1)


def poly_loss(logits, labels, epsilon=2.0, *, axis=-1, where=None):
    """Poly-1: ``CE + epsilon * sum_c y_c (1 - p_c)`` over the kept classes.

    A per-example ``where`` (the batch shape) masks whole examples, as in optax.
    """
    if axis == -1 and where is None:
        p = jax.nn.softmax(logits, axis=-1)
        ce = -jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1)
        return ce + epsilon * jnp.sum(labels * (1.0 - p), axis=-1)
    logits = _compute_dtype(logits)
    labels = jnp.asarray(labels, logits.dtype)
    axes = _axes(axis, logits.ndim)
    keep = _classes_last(_keep_mask(where, logits.shape, axes), axes)
    x = _classes_last(logits, axes)
    y = _classes_last(labels, axes)
    ce = soft_xent(x, y, where=keep)
    xk = jnp.where(keep, x, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(xk, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(keep, jnp.exp(xk - m), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    return ce + epsilon * jnp.sum(jnp.where(keep, y * (1.0 - p), 0.0), axis=-1)


def sigmoid_focal(logits, labels, alpha=None, gamma=2.0):
    p = jax.nn.sigmoid(logits)
    ce = -labels * jax.nn.log_sigmoid(logits) - (1 - labels) * jax.nn.log_sigmoid(
        -logits
    )
    p_t = p * labels + (1 - p) * (1 - labels)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * labels + (1 - alpha) * (1 - labels)) * loss
    return loss


def kl_divergence(log_predictions, targets):
    logt = jnp.where(targets == 0, 0.0, jnp.log(jnp.where(targets == 0, 1.0, targets)))
    return jnp.sum(targets * (logt - log_predictions), axis=-1)


def kl_divergence_with_log_targets(log_predictions, log_targets):
    return jnp.sum(jnp.exp(log_targets) * (log_targets - log_predictions), axis=-1)


def smooth_labels(labels, alpha):
    return (1.0 - alpha) * labels + alpha / labels.shape[-1]


# --- PyTorch's F.cross_entropy in NumPy float64 ------------------------------


def torch_cross_entropy_np(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
):
    """PyTorch's class-index F.cross_entropy (N, C) formula in float64 NumPy.

    From aten/src/ATen/native/LossNLL.cpp (cross_entropy_loss_label_smoothing):
    nll_n = -w_{y_n} lp_{n,y_n}; smooth_n = -sum_c w_c lp_{n,c}; both zeroed
    at ignored positions; mean = [(1-e) sum nll + (e/C) sum smooth] / sum w_{y_n}.
    """
    x = np.asarray(logits, np.float64)
    y = np.asarray(target)
    n, c = x.shape
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    m = x.max(axis=1, keepdims=True)
    lp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    ignored = y == ignore_index
    ys = np.where(ignored, 0, y)
    w_y = np.where(ignored, 0.0, w[ys])
    nll = -w_y * lp[np.arange(n), ys]
    smooth = np.where(ignored, 0.0, -(lp * w).sum(axis=1))
    e = label_smoothing
    if reduction == "none":
        return (1 - e) * nll + e / c * smooth
    if reduction == "sum":
        return (1 - e) * nll.sum() + e / c * smooth.sum()
    den = w_y.sum()
    return ((1 - e) * nll.sum() + e / c * smooth.sum()) / den


def _pair_logits(a, b, scale):
    """``scale * a_i . b_j`` for every pair, in float32 for 16-bit inputs."""
    a, b = _compute_dtype(a), _compute_dtype(b)
    return jnp.asarray(scale, a.dtype) * jnp.einsum("id,jd->ij", a, b)


def clip_pairs(a, b, scale):
    """CLIP's per-pair loss (Radford et al. 2021): the mean of the
    cross-entropies of row ``i`` and column ``i`` of ``s = scale a bᵀ``, each
    with the pair's own entry as the label, by explicit shifted
    log-softmaxes."""
    s = _pair_logits(a, b, scale)
    idx = jnp.arange(s.shape[0])

    def log_softmax_rows(z):
        m = jax.lax.stop_gradient(jnp.max(z, axis=1, keepdims=True))
        return (z - m) - jnp.log(jnp.sum(jnp.exp(z - m), axis=1, keepdims=True))

    by_row = -log_softmax_rows(s)[idx, idx]
    by_col = -log_softmax_rows(s.T)[idx, idx]
    return (by_row + by_col) / 2


def siglip_pairs(a, b, scale, bias):
    """SigLIP's per-pair loss (Zhai et al. 2023): ``-sum_j log sigmoid(z_ij
    s_ij)`` with ``s = scale a bᵀ + bias``, ``z`` +1 on the diagonal and -1
    elsewhere; ``-log sigmoid(v) = log(1 + exp(-v))`` written stably."""
    s = _pair_logits(a, b, scale) + jnp.asarray(bias, _compute_dtype(a).dtype)
    z = 2 * jnp.eye(s.shape[0], dtype=s.dtype) - 1
    v = z * s
    return jnp.sum(jnp.maximum(-v, 0) + jnp.log1p(jnp.exp(-jnp.abs(v))), axis=1)


def distillation(
    x,
    w,
    xt,
    wt,
    labels=None,
    divergence="forward_kl",
    beta=0.5,
    temperature=1.0,
    alpha=0.0,
    scored=None,
):
    """Per-position distillation loss on materialised logits: ``alpha CE(x w,
    y) + (1 - alpha) T^2 D(P, Q)`` with ``Q = softmax(x w / T)`` (student),
    ``P = softmax(x_t w_t / T)`` (teacher) and ``D`` = KL(P||Q), KL(Q||P), or
    ``beta KL(P||M) + (1 - beta) KL(Q||M)``, ``M = beta P + (1 - beta) Q``
    (Agarwal et al. 2024). ``0 log 0 = 0``; positions where ``scored`` is
    False give 0."""
    x, w, xt, wt = (_compute_dtype(v) for v in (x, w, xt, wt))
    z = jnp.einsum("nd,dv->nv", x, w)
    zt = jnp.einsum("nd,dv->nv", xt, wt)

    def log_softmax(v):
        m = jax.lax.stop_gradient(jnp.max(v, axis=-1, keepdims=True))
        return (v - m) - jnp.log(jnp.sum(jnp.exp(v - m), axis=-1, keepdims=True))

    def kl(la, lb):
        a = jnp.exp(la)
        return jnp.sum(jnp.where(a == 0, 0, a * (la - jnp.where(a == 0, 0, lb))), -1)

    lq, lp = log_softmax(z / temperature), log_softmax(zt / temperature)
    if divergence == "forward_kl":
        div = kl(lp, lq)
    elif divergence == "reverse_kl":
        div = kl(lq, lp)
    else:
        lm = jnp.logaddexp(jnp.log(beta) + lp, jnp.log1p(-beta) + lq)
        div = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    loss = (1 - alpha) * temperature**2 * div
    if alpha:
        y = jnp.asarray(labels)
        safe = jnp.where((y >= 0) & (y < z.shape[-1]), y, 0)
        ce = -jnp.take_along_axis(log_softmax(z), safe[:, None], axis=-1)[:, 0]
        loss = loss + alpha * ce
    if scored is not None:
        loss = jnp.where(scored, loss, 0)
    return loss
