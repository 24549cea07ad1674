r"""Sigmoid binary cross-entropy on logits."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from xent_jax import _checks, _sharding
from xent_jax._reduction import Reduction, reduce_loss
from xent_jax._softmax import IMPLEMENTATIONS, Implementation, compute_dtype


def _smoothed(labels, dtype, label_smoothing: float):
    y = labels.astype(dtype)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / 2
    return y


def _coefficients(labels, pos_weight, dtype, label_smoothing):
    """Weights of softplus(-x) (the positive term) and softplus(x) (negative)."""
    y = _smoothed(labels, dtype, label_smoothing)
    positive = y if pos_weight is None else y * pos_weight.astype(dtype)
    return positive, 1 - y


def _bce(x, labels, pos_weight, weights, label_smoothing: float):
    xf = x.astype(compute_dtype(x.dtype))
    positive, negative = _coefficients(labels, pos_weight, xf.dtype, label_smoothing)
    # Each term is dropped where its coefficient is 0, so +-inf logits give the
    # exact limits (0 or inf) instead of 0 * inf = NaN.
    loss = jnp.where(positive == 0, 0, positive * jax.nn.softplus(-xf))
    loss += jnp.where(negative == 0, 0, negative * jax.nn.softplus(xf))
    if weights is not None:
        loss = loss * weights.astype(xf.dtype)
    return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel(x, labels, pos_weight, weights, label_smoothing):
    return _bce(x, labels, pos_weight, weights, label_smoothing)


def _kernel_fwd(x, labels, pos_weight, weights, label_smoothing):
    # Residuals are the inputs themselves: the backward pass recomputes one
    # sigmoid, which is cheaper than writing and reading a saved gradient.
    return _bce(x, labels, pos_weight, weights, label_smoothing), (
        x,
        labels,
        pos_weight,
        weights,
    )


def _kernel_bwd(label_smoothing, residual, g):
    x, labels, pos_weight, weights = residual
    xf = x.astype(compute_dtype(x.dtype))
    g = g.astype(xf.dtype)
    if weights is not None:
        g = g * weights.astype(xf.dtype)
    positive, negative = _coefficients(labels, pos_weight, xf.dtype, label_smoothing)
    # d/dx = (pw y + 1 - y) sigmoid(x) - pw y.
    d_x = ((positive + negative) * jax.nn.sigmoid(xf) - positive) * g
    d_x = _sharding.like(jnp.broadcast_to(d_x, x.shape).astype(x.dtype), x)
    d_labels = None
    if jnp.issubdtype(labels.dtype, jnp.floating):
        # d/dy = (1 - a) (pw softplus(-x) - softplus(x)).
        pw = 1 if pos_weight is None else pos_weight.astype(xf.dtype)
        d_y = (1 - label_smoothing) * (pw * jax.nn.softplus(-xf) - jax.nn.softplus(xf))
        d_labels = jnp.broadcast_to(d_y * g, labels.shape).astype(labels.dtype)
        d_labels = _sharding.like(d_labels, labels)
    return d_x, d_labels, None, None


_kernel.defvjp(_kernel_fwd, _kernel_bwd)

_IMPLEMENTATIONS = {"custom_vjp": _kernel, "reference": _bce}


def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_weight: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    weights: jax.typing.ArrayLike | None = None,
    reduction: Reduction = "none",
    normalizer: jax.typing.ArrayLike | None = None,
    implementation: Implementation | None = None,
    reduction_axis_name: Any = None,
) -> jax.Array:
    r"""Elementwise sigmoid binary cross-entropy on logits.

    With ``p`` the ``pos_weight``, ``w`` the ``weights`` and ``y`` the label
    (smoothed towards 1/2 as ``(1 - a) y + a/2``):

    .. math::
        \ell = -w\,[p\,y \log\sigma(x) + (1-y)\log(1-\sigma(x))]
             = w\,[p\,y\,\mathrm{softplus}(-x) + (1-y)\,\mathrm{softplus}(x)],

    PyTorch's ``BCEWithLogitsLoss``. The closed-form gradient is
    :math:`w\,[(p\,y + 1 - y)\,\sigma(x) - p\,y]` (:math:`\sigma(x) - y` without
    options), supplied by a ``jax.custom_vjp`` whose residuals are the inputs.
    Infinite logits give the exact limits (0 or ``inf``), never NaN.

    Args:
      logits: ``[...]`` logits, any floating dtype (16-bit computed in float32).
      labels: Targets in ``[0, 1]`` with exactly the logits' shape; float
        labels get a gradient, integer or bool labels are cast.
      pos_weight: Weight of the positive term, broadcast against the logits
        along the last axis (e.g. ``[C]`` for ``C`` labels), as in PyTorch.
      label_smoothing: ``a`` in ``[0, 1]``: labels move towards 1/2 (Keras).
      weights: Elementwise weights broadcastable to the logits' shape.
      reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``: the mean over
        all elements, weights not in the denominator (PyTorch).
      normalizer: Replaces the denominator of ``"mean"``.
      implementation: ``"custom_vjp"`` (default) or ``"reference"``.
      reduction_axis_name: Inside ``jax.shard_map``, the mesh axes over which
        the elements are split (the batch, and the label axis if it is split
        too). ``"sum"`` and ``"mean"`` then return the global value, the same
        on every device, with the mean's denominator (the element count)
        summed over these axes; each device's gradient is its share of the
        global one (see :func:`softmax_cross_entropy_with_integer_labels`).

    Returns:
      Losses with the logits' shape (a scalar for ``"sum"``/``"mean"``),
      float32 for 16-bit logits.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> loss = xent_jax.sigmoid_binary_cross_entropy(
      ...     jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0]))
      >>> print(loss)
      [0.6931 2.1269]
    """
    _checks.check_floating(logits, "logits")
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _checks.check_shape(labels, logits.shape, "labels", " (the logits' shape)")
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    implementation = "custom_vjp" if implementation is None else implementation
    _checks.check_choice(implementation, IMPLEMENTATIONS, "implementation")
    label_smoothing = _checks.check_static_float(
        label_smoothing, "label_smoothing", 0.0, 1.0
    )
    if pos_weight is not None:
        pos_weight = jnp.asarray(pos_weight)
        _checks.check_floating(pos_weight, "pos_weight")
        _checks.check_broadcastable(pos_weight, logits.shape, "pos_weight")
    if weights is not None:
        weights = jnp.asarray(weights)
        _checks.check_floating(weights, "weights")
        _checks.check_broadcastable(weights, logits.shape, "weights")
    losses = _IMPLEMENTATIONS[implementation](
        logits, labels, pos_weight, weights, label_smoothing
    )
    return reduce_loss(losses, reduction, losses.size, normalizer, reduction_axis_name)
