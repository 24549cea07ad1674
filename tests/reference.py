"""Independent plain-jnp reference for the xent_jax losses.

Written from the formulas in the specification, not from the package: it must
never import ``xent_jax``. Gradients come from ordinary autodiff, so every
transformation (jvp, hessian, grad-of-grad) works on it.

Conventions (integer labels, per example, not ignored; ``keep`` = ``where``;
``C_row`` = number of kept classes in the row; ``w`` = class weights or 1):

    t    = w * ((1 - a) * onehot(y) + a / C_row) * keep
    loss = sum_c t_c * (lse - x_c) + z * lse**2

Soft labels use ``labels`` in place of ``onehot(y)``. Fully masked and ignored
rows have loss 0 and gradient 0. Classes whose target mass is zero contribute
nothing even when their logit is ``-inf`` (``0 * log 0 = 0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "bce",
    "integer_xent",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "poly_loss",
    "reduce",
    "safe_soft_xent",
    "sigmoid_focal",
    "smooth_labels",
    "soft_xent",
    "softmax_focal",
    "torch_cross_entropy_np",
]


def _axes(axis, ndim):
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(sorted(a % ndim for a in axis))


def _classes_last(x, axes):
    """Moves the class axes to the end (keeping their order) and flattens them."""
    batch = tuple(i for i in range(x.ndim) if i not in axes)
    x = jnp.transpose(x, batch + axes)
    return x.reshape(x.shape[: len(batch)] + (-1,))


def _keep_mask(where, shape, axes):
    """``where`` per class (logits' shape) or per example (batch shape)."""
    if where is None:
        return jnp.ones(shape, bool)
    where = jnp.asarray(where, bool)
    if where.ndim != len(shape):
        where = jnp.expand_dims(where, axes)
    return jnp.broadcast_to(where, shape)


def _lse(x, keep):
    """log-sum-exp over the last axis of the kept entries (plain autodiff)."""
    xk = jnp.where(keep, x, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(xk, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.where(keep, jnp.exp(xk - m), 0.0), axis=-1)
    return jnp.log(s) + m[..., 0]


def _xent_from_targets(x, t, keep, row_ok, z_loss):
    """sum_c t_c (lse - x_c) + z lse^2 over the last axis; 0 where not row_ok."""
    # Double-where: rows that do not count get harmless inputs so that no NaN
    # can reach the gradient through the unselected branch.
    x = jnp.where(row_ok[..., None], x, 0.0)
    keep = jnp.where(row_ok[..., None], keep, True)
    lse = _lse(x, keep)
    nl = lse[..., None] - x
    bad = (t == 0) & ~jnp.isfinite(nl)
    nl = jnp.where(bad, 0.0, nl)
    contrib = jnp.where(bad, 0.0, t * nl)
    loss = jnp.sum(contrib, axis=-1) + z_loss * lse**2
    return jnp.where(row_ok, loss, 0.0)


def _compute_dtype(x):
    x = jnp.asarray(x)
    if x.dtype in (jnp.float16, jnp.bfloat16):
        return x.astype(jnp.float32)
    return x


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
    logits = _compute_dtype(logits)
    labels = jnp.asarray(labels, logits.dtype)
    axes = _axes(axis, logits.ndim)
    keep = _keep_mask(where, logits.shape, axes)
    x = _classes_last(logits, axes)
    y = _classes_last(labels, axes)
    keep = _classes_last(keep, axes)
    c_row = jnp.sum(keep, axis=-1, keepdims=True).astype(x.dtype)
    row_ok = jnp.any(keep, axis=-1)
    w = 1.0 if class_weights is None else jnp.asarray(class_weights, x.dtype)
    a = label_smoothing
    t = w * ((1.0 - a) * y + a / jnp.maximum(c_row, 1.0)) * keep
    return _xent_from_targets(x, t, keep, row_ok, z_loss)


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
    logits = _compute_dtype(logits)
    labels = jnp.asarray(labels)
    axes = _axes(axis, logits.ndim)
    keep = _keep_mask(where, logits.shape, axes)
    x = _classes_last(logits, axes)
    keep = _classes_last(keep, axes)
    n_classes = x.shape[-1]
    onehot = (labels[..., None] == jnp.arange(n_classes)).astype(x.dtype)
    valid = jnp.ones(labels.shape, bool)
    if ignore_index is not None:
        valid = labels != ignore_index
    c_row = jnp.sum(keep, axis=-1, keepdims=True).astype(x.dtype)
    row_ok = jnp.any(keep, axis=-1) & valid
    w = 1.0 if class_weights is None else jnp.asarray(class_weights, x.dtype)
    a = label_smoothing
    t = w * ((1.0 - a) * onehot + a / jnp.maximum(c_row, 1.0)) * keep
    t = t * valid[..., None]
    return _xent_from_targets(x, t, keep, row_ok, z_loss)


def integer_mean_denominator(
    labels,
    logits_shape=None,
    axis=-1,
    where=None,
    ignore_index=None,
    class_weights=None,
):
    """PyTorch's 'mean' denominator: sum of w[label] over counted examples."""
    labels = jnp.asarray(labels)
    valid = jnp.ones(labels.shape, bool)
    if ignore_index is not None:
        valid = labels != ignore_index
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
        per = cw[jnp.where(valid, labels, 0)]
    return jnp.sum(jnp.where(valid, per, 0.0))


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
    den = jnp.asarray(den, total.dtype)
    safe = jnp.where(den == 0, 1.0, den)
    return jnp.where(den == 0, 0.0, total / safe)


def bce(logits, labels, *, pos_weight=None, label_smoothing=0.0, weights=None):
    """Elementwise BCE via log_sigmoid: w [pw y (-logsig x) + (1-y)(-logsig -x)]."""
    logits = _compute_dtype(logits)
    y = jnp.asarray(labels, logits.dtype)
    a = label_smoothing
    y = y * (1.0 - a) + a / 2.0
    pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, logits.dtype)
    loss = -pw * y * jax.nn.log_sigmoid(logits) - (1.0 - y) * jax.nn.log_sigmoid(
        -logits
    )
    if weights is not None:
        loss = loss * jnp.asarray(weights, logits.dtype)
    return loss


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
    """-alpha_y (1 - p_y)^gamma log p_y per example, written naively."""
    logits = _compute_dtype(logits)
    labels = jnp.asarray(labels)
    axes = _axes(axis, logits.ndim)
    keep = _classes_last(_keep_mask(where, logits.shape, axes), axes)
    x = _classes_last(logits, axes)
    valid = jnp.ones(labels.shape, bool)
    if ignore_index is not None:
        valid = labels != ignore_index
    row_ok = jnp.any(keep, axis=-1) & valid
    x = jnp.where(row_ok[..., None], x, 0.0)
    keep = jnp.where(row_ok[..., None], keep, True)
    onehot = labels[..., None] == jnp.arange(x.shape[-1])
    logp_y = jnp.sum(jnp.where(onehot, x, 0.0), axis=-1) - _lse(x, keep)
    p_y = jnp.exp(logp_y)
    loss = -((1.0 - p_y) ** gamma) * logp_y
    if alpha is not None:
        alpha = jnp.asarray(alpha, x.dtype)
        if alpha.ndim == 1:
            alpha = alpha[jnp.where(row_ok, labels, 0)]
        loss = alpha * loss
    return jnp.where(row_ok, loss, 0.0)


# --- optax-semantics helpers, written from their docstrings ----------------


def safe_soft_xent(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(labels != 0, labels * logp, 0.0), axis=-1)


def poly_loss(logits, labels, epsilon=2.0):
    p = jax.nn.softmax(logits, axis=-1)
    ce = -jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return ce + epsilon * jnp.sum(labels * (1.0 - p), axis=-1)


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
