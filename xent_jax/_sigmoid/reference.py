"""Sigmoid BCE's formula under plain autodiff (``implementation="reference"``)."""

from __future__ import annotations

import jax

from xent_jax import _numerics, _registry


@_registry.register("sigmoid", "reference")
def sigmoid_reference(x, labels, pos_weight, weights, label_smoothing: float):
    """``-w [p y log σ(x) + (1 - y) log σ(-x)]`` elementwise, ``y`` smoothed."""
    dtype = _numerics.compute_dtype(x.dtype)
    x = x.astype(dtype)
    y = labels.astype(dtype) * (1 - label_smoothing) + label_smoothing / 2
    p = 1 if pos_weight is None else pos_weight.astype(dtype)
    loss = _numerics.weighted(p * y, -jax.nn.log_sigmoid(x))
    loss = loss + _numerics.weighted(1 - y, -jax.nn.log_sigmoid(-x))
    return loss if weights is None else loss * weights.astype(dtype)
