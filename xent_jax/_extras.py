"""optax's other classification losses, and a softmax focal loss.

These are written with plain ``jax.numpy`` on top of the kernels of
``_softmax`` and ``_sigmoid``, so that their gradients come from those
kernels' closed forms where they contain them, and from autodiff elsewhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xent_jax import _checks
from xent_jax._reduction import Reduction
from xent_jax._sigmoid import sigmoid_binary_cross_entropy
from xent_jax._softmax import (
    _softmax_loss,
    compute_dtype,
    label_values,
    softmax_cross_entropy,
)

ArrayLike = jax.typing.ArrayLike


def _expand_where(where, ndim, axis):
    """optax accepts a per-example ``where`` and expands it over ``axis``."""
    if where is None or jnp.ndim(where) == ndim:
        return where
    return jnp.expand_dims(where, axis)


def safe_softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""optax's ``safe_softmax_cross_entropy``: ``0 * log 0 = 0`` at ``-inf`` logits.

    :func:`softmax_cross_entropy` already treats a ``-inf`` logit with zero
    target as contributing 0, so this is that loss over the last axis, kept for
    optax compatibility. Returns per-example losses ``[...]``.

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
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Poly-1 loss (Leng et al., 2022): :math:`CE + \epsilon \sum_c y_c (1 - p_c)`.

    Same signature and values as ``optax.losses.poly_loss_cross_entropy``; the
    cross-entropy part uses the closed-form kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> print(xent_jax.poly_loss_cross_entropy(
      ...     jnp.array([[1.0, 2.0, 0.5]]), jnp.array([[0.0, 1.0, 0.0]])))
      [1.2073]
    """
    _checks.check_floating(labels, "labels")
    logits = jnp.asarray(logits)
    where = _expand_where(where, logits.ndim, axis)
    p = jax.nn.softmax(
        logits.astype(compute_dtype(logits.dtype)), axis=axis, where=where
    )
    one_minus_pt = jnp.sum(labels * (1 - p), axis=axis, where=where)
    ce = softmax_cross_entropy(logits, labels, axis=axis, where=where)
    return ce + epsilon * one_minus_pt


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
) -> jax.Array:
    r"""Sigmoid focal loss (Lin et al., 2017), as ``optax.losses.sigmoid_focal_loss``.

    :math:`\ell = \alpha_t (1 - p_t)^\gamma \mathrm{BCE}(x, y)` with
    :math:`\log(1 - p_t)` computed from log-sigmoids, so extreme logits keep
    finite gradients. ``alpha=None`` applies no class balancing.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> print(xent_jax.sigmoid_focal_loss(
      ...     jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])))
      [0.1733 1.6501]
    """
    _checks.check_floating(logits, "logits")
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels).astype(logits.dtype)
    ce = sigmoid_binary_cross_entropy(logits, labels)
    xf = logits.astype(ce.dtype)
    y = labels.astype(ce.dtype)
    log_one_minus_pt = jnp.logaddexp(
        jnp.log1p(-y) + jax.nn.log_sigmoid(xf), jnp.log(y) + jax.nn.log_sigmoid(-xf)
    )
    loss = ce * jnp.exp(gamma * log_one_minus_pt)
    if alpha is None:
        return loss
    return (alpha * y + (1 - alpha) * (1 - y)) * loss


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""KL divergence :math:`\sum_c t_c (\log t_c - \log q_c)`, ``0 log 0 = 0``.

    Same signature and values as ``optax.losses.kl_divergence``.

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
    targets = jnp.asarray(targets)
    safe = jnp.where(targets == 0, 1, targets)
    loss = jnp.where(targets == 0, 0, targets * (jnp.log(safe) - log_predictions))
    return jnp.sum(loss, axis=axis, where=where)


def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""KL divergence with targets given as log-probabilities, as in optax.

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
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""``(1 - alpha) * labels + alpha / K`` over the ``K`` classes ``where`` keeps.

    Same as ``optax.losses.smooth_labels``. The losses' ``label_smoothing=``
    keyword applies the same formula without materialising the one-hot targets.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> print(xent_jax.smooth_labels(jnp.array([0.0, 1.0]), 0.2))
      [0.1 0.9]
    """
    _checks.check_floating(labels, "labels")
    labels = jnp.asarray(labels)
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
    axis: int | tuple[int, ...] = -1,
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
      alpha: ``None``, a scalar, or ``[C]`` per-class balancing weights.
      axis: Class axis (or tuple), as in the cross-entropy.
      where: Mask, as in :func:`softmax_cross_entropy_with_integer_labels`.
      ignore_index: Label value whose examples get loss 0 and no gradient.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over scored examples).
      normalizer: Replaces the denominator of ``"mean"``.
      axis_name: Inside ``jax.shard_map``, the axes over which the classes are
        split, as in :func:`softmax_cross_entropy_with_integer_labels`; a
        per-class ``alpha`` is then this device's slice.
      reduction_axis_name: Inside ``jax.shard_map``, the data-parallel axes:
        ``"sum"`` and ``"mean"`` are global.

    Returns:
      Per-example losses (a scalar for ``"sum"``/``"mean"``).

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> print(xent_jax.softmax_focal_loss(
      ...     jnp.array([[1.0, 2.0, 0.5]]), jnp.array([1])))
      [0.0641]
    """
    gamma = _checks.check_static_float(gamma, "gamma", 0.0, float("inf"))

    def focal(ce, labels, num_local, axis_name):
        # ce = -log p_y >= 0; 1 - p_y = -expm1(-ce) without forming p_y.
        tiny = jnp.finfo(ce.dtype).tiny
        one_minus_p = jnp.maximum(-jnp.expm1(-ce), tiny)
        loss = jnp.exp(gamma * jnp.log(one_minus_p)) * ce
        if alpha is not None:
            a = jnp.asarray(alpha, ce.dtype)
            if a.ndim == 1:
                _checks.check_shape(a, (num_local,), "alpha", " (one weight per class)")
                a = label_values(a, labels, axis_name)
            elif a.ndim != 0:
                raise ValueError(f"alpha must be a scalar or [C]; got shape {a.shape}.")
            loss = loss * a
        return loss

    if alpha is not None:
        _checks.check_floating(alpha, "alpha")
    return _softmax_loss(
        logits,
        labels,
        axis,
        where,
        integer=True,
        ignore_index=ignore_index,
        label_smoothing=0.0,
        class_weights=None,
        z_loss=0.0,
        reduction=reduction,
        normalizer=normalizer,
        implementation=None,
        axis_name=axis_name,
        reduction_axis_name=reduction_axis_name,
        per_example=focal,
    )
