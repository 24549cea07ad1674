r"""optax's other classification losses, and a softmax focal loss.

These are small compositions of the core losses (whose closed-form gradients
they inherit) and plain ``jax.numpy`` (differentiated by autodiff), with
optax's signatures and values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xent_jax import _checks, _numerics, _options
from xent_jax._classes import ClassAxis
from xent_jax._reduction import Reduction
from xent_jax._sigmoid.api import sigmoid_binary_cross_entropy
from xent_jax._softmax.api import softmax_cross_entropy, softmax_loss

ArrayLike = jax.typing.ArrayLike


def _class_mask(where, logits, axis):
    """``where`` as a mask of the logits' shape (optax also takes one per
    example, expanded over ``axis``); the error names the shape passed."""
    if where is None:
        return None
    where = _checks.as_array(where, "where")
    _checks.check_bool(where, "where")
    axes = _checks.canonical_axes(axis, logits.ndim)
    batch = tuple(s for a, s in enumerate(logits.shape) if a not in axes)
    if where.shape == logits.shape:
        return where
    if where.shape == batch:
        return jnp.broadcast_to(jnp.expand_dims(where, axes), logits.shape)
    raise ValueError(
        f"where must have the logits' shape {logits.shape} (per class) or {batch} "
        f"(per example); got {where.shape}."
    )


def safe_softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""optax's ``safe_softmax_cross_entropy``: ``0 log 0 = 0`` at ``-inf`` logits.

    .. math::
        \ell = -\sum_c y_c \log\mathrm{softmax}(x)_c,
        \qquad y_c \log\mathrm{softmax}(x)_c := 0 \text{ where } y_c = 0.

    :func:`softmax_cross_entropy` already treats a ``-inf`` logit with zero
    target as contributing 0, so this is that loss over the last axis, kept
    for optax compatibility.

    Args:
      logits: Unnormalized log-probabilities ``[..., C]``, any floating dtype;
        ``-inf`` entries mask classes.
      labels: Target probabilities ``[..., C]``.

    Returns:
      Per-example losses ``[...]`` (float32 for 16-bit logits).

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> logits = jnp.array([[0.0, -jnp.inf], [0.0, 0.0]])
      >>> print(xent_jax.safe_softmax_cross_entropy(
      ...     logits, jnp.array([[1.0, 0.0], [0.5, 0.5]])))
      [0.     0.6931]
    """
    return softmax_cross_entropy(logits, labels)


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: ArrayLike = 2.0,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Poly-1 loss: cross-entropy plus a first-order polynomial term.

    .. math::
        \ell = -\sum_c y_c \log p_c + \epsilon \sum_c y_c (1 - p_c),
        \qquad p = \mathrm{softmax}(x),

    optax's ``poly_loss_cross_entropy``; the cross-entropy part uses the
    closed-form kernel.

    Args:
      logits: Unnormalized log-probabilities ``[..., C]``.
      labels: Target probabilities with the logits' shape.
      epsilon: Coefficient of the polynomial term (2 for ImageNet, -1 for
        detection in the paper).
      axis: Class axis or axes (``None``: all).
      where: Optional boolean mask of the logits' shape (classes to include)
        or of the batch shape (examples to include).

    Returns:
      Per-example losses ``[...]``.

    References:
      Leng et al., `PolyLoss: A Polynomial Expansion Perspective of
      Classification Loss Functions <https://arxiv.org/abs/2204.12511>`_, 2022.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> print(xent_jax.poly_loss_cross_entropy(
      ...     jnp.array([[1.0, 2.0, 0.5]]), jnp.array([[0.0, 1.0, 0.0]])))
      [1.2073]
    """
    logits = _checks.as_array(logits, "logits")
    labels = _checks.as_array(labels, "labels")
    _checks.check_floating(labels, "labels")
    mask = _class_mask(where, logits, axis)
    ce = softmax_cross_entropy(logits, labels, axis=axis, where=mask)
    x = logits.astype(_numerics.compute_dtype(logits.dtype))
    p = jax.nn.softmax(x, axis=axis, where=mask)
    one_minus_pt = jnp.sum(labels * (1 - p), axis=axis, where=mask)
    return ce + epsilon * one_minus_pt


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
) -> jax.Array:
    r"""Sigmoid focal loss, elementwise, as ``optax.losses.sigmoid_focal_loss``.

    .. math::
        \ell = \alpha_t (1 - p_t)^\gamma\, \mathrm{BCE}(x, y),
        \qquad p_t = y\,\sigma(x) + (1 - y)(1 - \sigma(x)),

    with :math:`\alpha_t = \alpha y + (1 - \alpha)(1 - y)`. :math:`\log(1 -
    p_t)` is computed from log-sigmoids, so extreme logits keep finite
    gradients.

    Args:
      logits: Logits ``[...]``, any floating dtype.
      labels: Targets in ``[0, 1]`` with the logits' shape.
      alpha: ``None`` (no class balancing) or the weight of the positives in
        ``[0, 1]`` (a scalar or an array broadcastable to the logits).
      gamma: Focusing parameter ``>= 0`` (0 gives the BCE).

    Returns:
      Losses with the logits' shape.

    References:
      Lin et al., `Focal Loss for Dense Object Detection
      <https://arxiv.org/abs/1708.02002>`_, 2017.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> print(xent_jax.sigmoid_focal_loss(
      ...     jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])))
      [0.1733 1.6501]
    """
    logits = _checks.as_array(logits, "logits")
    _checks.check_floating(logits, "logits")
    labels = _checks.as_array(labels, "labels").astype(logits.dtype)
    ce = sigmoid_binary_cross_entropy(logits, labels)
    xf = logits.astype(ce.dtype)
    y = labels.astype(ce.dtype)
    loss = ce * jnp.exp(gamma * _log_one_minus_pt(xf, y))
    if alpha is None:
        return loss
    alpha = _checks.as_array(alpha, "alpha")
    return (alpha * y + (1 - alpha) * (1 - y)) * loss


@jax.custom_jvp
def _log_one_minus_pt(x, y):
    """``log(1 - p_t) = log(y σ(-x) + (1 - y) σ(x))`` from log-sigmoids, so
    that extreme logits keep finite values and gradients. The derivatives
    are written out: autodiff of ``log1p(-y)`` and ``log(y)`` gave NaN at the
    hard labels 0 and 1 (0 x inf; issue 28, item 4), where they are finite."""
    return jnp.logaddexp(
        jnp.log1p(-y) + jax.nn.log_sigmoid(x), jnp.log(y) + jax.nn.log_sigmoid(-x)
    )


@_log_one_minus_pt.defjvp
def _log_one_minus_pt_jvp(primals, tangents):
    x, y = primals
    dx, dy = tangents
    out = _log_one_minus_pt(x, y)
    pos, neg = jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
    # d/dx = σ(x) σ(-x) (1 - 2y) / q and d/dy = (σ(-x) - σ(x)) / q, q = 1 - p_t
    d_x = jnp.exp(pos + neg - out) * (1 - 2 * y)
    d_y = jnp.exp(neg - out) - jnp.exp(pos - out)
    return out, d_x * dx + d_y * dy


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence of predictions from targets.

    .. math::
        \mathrm{KL}(t \,\|\, q) = \sum_c t_c (\log t_c - \log q_c),
        \qquad 0 \log 0 = 0,

    optax's ``kl_divergence``.

    Args:
      log_predictions: Log-probabilities ``log q`` ``[..., C]``.
      targets: Probabilities ``t`` with the same shape.
      axis: Class axis or axes (``None``: all).
      where: Optional boolean mask of the elements to include.

    Returns:
      Per-example divergences ``[...]``.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> loss = xent_jax.kl_divergence(
      ...     jnp.log(jnp.array([0.5, 0.5])), jnp.array([1.0, 0.0]))
      >>> print(f"{loss:.4f}")
      0.6931
    """
    _checks.check_floating(log_predictions, "log_predictions")
    _checks.check_floating(targets, "targets")
    targets = _checks.as_array(targets, "targets")
    log_t = jnp.log(jnp.where(targets == 0, 1, targets))
    loss = _numerics.weighted(targets, log_t - log_predictions)
    return jnp.sum(loss, axis=axis, where=where)


def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence with targets given as log-probabilities.

    .. math::
        \mathrm{KL}(t \,\|\, q) = \sum_c e^{\log t_c} (\log t_c - \log q_c),

    optax's ``kl_divergence_with_log_targets``.

    Args:
      log_predictions: Log-probabilities ``log q`` ``[..., C]``.
      log_targets: Log-probabilities ``log t`` with the same shape.
      axis: Class axis or axes (``None``: all).
      where: Optional boolean mask of the elements to include.

    Returns:
      Per-example divergences ``[...]``.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> loss = xent_jax.kl_divergence_with_log_targets(
      ...     jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.9, 0.1])))
      >>> print(f"{loss:.4f}")
      0.3681
    """
    _checks.check_floating(log_predictions, "log_predictions")
    _checks.check_floating(log_targets, "log_targets")
    loss = jnp.exp(log_targets) * (log_targets - log_predictions)
    return jnp.sum(loss, axis=axis, where=where)


def smooth_labels(
    labels: ArrayLike,
    alpha: ArrayLike,
    *,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Label smoothing towards the uniform distribution over ``K`` classes.

    .. math::
        y' = (1 - \alpha)\, y + \alpha / K,

    with ``K`` the number of classes ``where`` keeps; optax's
    ``smooth_labels``. The losses' ``label_smoothing=`` keyword applies the
    same formula without materialising the targets.

    Args:
      labels: Target probabilities (one-hot or soft) ``[..., K]``.
      alpha: Smoothing in ``[0, 1]``.
      axis: Class axis or axes.
      where: Optional boolean mask of the classes to count in ``K``.

    Returns:
      The smoothed targets, with ``labels``' shape.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> print(xent_jax.smooth_labels(jnp.array([0.0, 1.0]), 0.2))
      [0.1 0.9]
    """
    _checks.check_floating(labels, "labels")
    labels = _checks.as_array(labels, "labels")
    if where is None:
        num_categories = jnp.size(labels, axis)
    else:
        num_categories = jnp.sum(where, axis, keepdims=True)
    return (1.0 - alpha) * labels + alpha / num_categories


def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: ArrayLike | None = None,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Reduction = "none",
    normalizer: ArrayLike | None = None,
    axis_name: Any = None,
    reduction_axis_name: Any = None,
) -> jax.Array:
    r"""Multi-class (softmax) focal loss for integer labels, in log space.

    .. math::
        \ell = -\alpha_y\,(1 - p_y)^\gamma \log p_y,
        \qquad \log p_y = x_y - \mathrm{logsumexp}(x).

    ``log p_y`` comes from the closed-form cross-entropy kernel and
    :math:`(1-p_y)^\gamma = \exp(\gamma \log(-\mathrm{expm1}(\log p_y)))`, so no
    probability is formed or clipped: confident examples keep finite, correctly
    down-weighted gradients, and ``gamma=0`` is exactly the cross-entropy.

    Args:
      logits: ``[..., C]`` logits.
      labels: Integer class ids, the logits' shape minus the class axis.
      gamma: Focusing parameter ``>= 0``.
      alpha: ``None``, a scalar, or ``[C]`` per-class balancing weights (they
        get their true gradient).
      axis: Class axis (or tuple), as in the cross-entropy.
      where: Mask, as in :func:`softmax_cross_entropy_with_integer_labels`.
      ignore_index: Label value whose examples get loss 0 and no gradient.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over scored examples).
      normalizer: A scalar replacing the denominator of ``"mean"``.
      axis_name: Inside ``jax.shard_map``, the axes over which the classes are
        split, as in :func:`softmax_cross_entropy_with_integer_labels`; a
        per-class ``alpha`` is then this device's slice.
      reduction_axis_name: Inside ``jax.shard_map``, the data-parallel axes:
        ``"sum"`` and ``"mean"`` are global.

    Returns:
      Per-example losses with the labels' shape (a scalar for
      ``"sum"``/``"mean"``).

    References:
      Lin et al., `Focal Loss for Dense Object Detection
      <https://arxiv.org/abs/1708.02002>`_, 2017.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> print(xent_jax.softmax_focal_loss(
      ...     jnp.array([[1.0, 2.0, 0.5]]), jnp.array([1])))
      [0.0641]
    """
    gamma = _options.static_float(gamma, "gamma", 0.0)
    alpha = _checks.optional_array(alpha, "alpha")
    if alpha is not None:
        _checks.check_floating(alpha, "alpha")
        message = f"alpha must be a scalar or [C]; got shape {alpha.shape}."
        _checks.check_rank(alpha, {0, 1}, message)

    def focal(ce, inputs):
        # ce = -log p_y >= 0; 1 - p_y = -expm1(-ce) without forming p_y.
        tiny = jnp.finfo(ce.dtype).tiny
        one_minus_p = jnp.maximum(-jnp.expm1(-ce), tiny)
        loss = jnp.exp(gamma * jnp.log(one_minus_p)) * ce
        if alpha is None:
            return loss
        a = alpha.astype(ce.dtype)
        if a.ndim == 1:
            num_local = inputs.x.shape[-1]
            _checks.check_shape(a, (num_local,), "alpha", " (one weight per class)")
            a = ClassAxis(_options.axis_names(axis_name)).take(a, inputs.labels.ids)
        return loss * a

    return softmax_loss(
        logits,
        labels,
        axis,
        where,
        integer=True,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
        axis_name=axis_name,
        reduction_axis_name=reduction_axis_name,
        per_example=focal,
    )
