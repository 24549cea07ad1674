r"""The default sigmoid BCE kernel: a ``custom_vjp`` with the closed form

.. math::
    \frac{\partial\ell}{\partial x} = w\,[(p\,y + 1 - y)\,\sigma(x) - p\,y],

whose residuals are the inputs themselves: the backward pass recomputes one
sigmoid, cheaper than writing and reading a saved gradient. Labels (when
float), ``pos_weight`` and ``weights`` get their true cotangents, summed over
the axes they were broadcast along.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _registry, _sharding


def _coefficients(labels, pos_weight, dtype, label_smoothing):
    """The smoothed labels ``y`` and the weights of softplus(-x) (the positive
    term) and softplus(x) (the negative one)."""
    y = labels.astype(dtype)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / 2
    positive = y if pos_weight is None else y * pos_weight.astype(dtype)
    return y, positive, 1 - y


def _unweighted(xf, positive, negative):
    # Each term is dropped where its coefficient is 0, so ±inf logits give the
    # exact limits (0 or inf) instead of 0 * inf = NaN.
    return _numerics.weighted(positive, jax.nn.softplus(-xf)) + _numerics.weighted(
        negative, jax.nn.softplus(xf)
    )


def _bce(x, labels, pos_weight, weights, label_smoothing: float):
    xf = x.astype(_numerics.compute_dtype(x.dtype))
    _, positive, negative = _coefficients(labels, pos_weight, xf.dtype, label_smoothing)
    loss = _unweighted(xf, positive, negative)
    return loss if weights is None else loss * weights.astype(xf.dtype)


@_registry.register("sigmoid", "xla")
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def sigmoid_xla(x, labels, pos_weight, weights, label_smoothing: float):
    """Elementwise BCE by the closed-form kernel."""
    return _bce(x, labels, pos_weight, weights, label_smoothing)


def _fwd(x, labels, pos_weight, weights, label_smoothing):
    return _bce(x, labels, pos_weight, weights, label_smoothing), (
        x,
        labels,
        pos_weight,
        weights,
    )


def _bwd(label_smoothing, residual, g):
    x, labels, pos_weight, weights = residual
    xf = x.astype(_numerics.compute_dtype(x.dtype))
    g = g.astype(xf.dtype)
    y, positive, negative = _coefficients(labels, pos_weight, xf.dtype, label_smoothing)
    g_w = g if weights is None else g * weights.astype(xf.dtype)
    d_x = ((positive + negative) * jax.nn.sigmoid(xf) - positive) * g_w
    d_labels = d_pos_weight = d_weights = None
    if jnp.issubdtype(labels.dtype, jnp.floating):
        # d/dy = (1 - a) (pw softplus(-x) - softplus(x)).
        pw = 1 if pos_weight is None else pos_weight.astype(xf.dtype)
        d_y = (1 - label_smoothing) * (pw * jax.nn.softplus(-xf) - jax.nn.softplus(xf))
        d_labels = _cotangent(d_y * g_w, labels)
    if pos_weight is not None:
        d_pos_weight = _cotangent(
            _numerics.weighted(y * g_w, jax.nn.softplus(-xf)), pos_weight
        )
    if weights is not None:
        d_weights = _cotangent(g * _unweighted(xf, positive, negative), weights)
    return _cotangent(d_x, x), d_labels, d_pos_weight, d_weights


def _cotangent(ct, primal):
    """``ct`` summed to ``primal``'s shape, in its dtype and sharding."""
    ct = _numerics.sum_to_shape(ct, primal.shape).astype(primal.dtype)
    return _sharding.like(ct, primal)


sigmoid_xla.defvjp(_fwd, _bwd)
