"""The effective targets of the core softmax losses (see ``_stats``).

``t = w * ((1 - a) * y + u)`` restricted to the classes ``where`` keeps, with
``y`` the one-hot label or the soft target, ``a`` the label smoothing, ``w``
the class weights and ``u = a / C_row`` the smoothing mass per kept class
(``C_row`` the number of classes kept in the row, over every class shard).
For integer labels the label's own term is not masked by ``where`` (optax).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _stats
from xent_jax._classes import ClassAxis
from xent_jax._labels import Labels
from xent_jax._options import SoftmaxOptions


class CotangentHint(NamedTuple):
    """The per-example cotangents a loss's reduction sends to the kernel's
    outputs when the loss's own cotangent is 1: to the cross-entropy, and to
    the log-sum-exp per unit of it (the z-loss's ``2 z lse`` is linear in it).
    A kernel may fold them into what it saves, so that the common gradient is
    rounded once (see ``_softmax.xla``)."""

    ce: jax.Array  # [...]
    lse_per_unit: jax.Array  # [...]


class Inputs(NamedTuple):
    """A softmax kernel's canonical inputs: classes last, labels classified."""

    x: jax.Array  # logits [..., C_local], any floating dtype
    labels: Labels | jax.Array  # Labels, or soft targets [..., C_local]
    keep: jax.Array | None  # per-class bool mask [..., C_local] or None
    class_weights: jax.Array | None  # [C_local]
    scored: jax.Array  # bool [...]
    # The cotangents the reduction will send (see ``_reduction.cotangent_hint``).
    hint: CotangentHint | None = None


def masked_logits(inputs: Inputs, dtype) -> jax.Array:
    """The logits in ``dtype`` with ``-inf`` on the classes ``where`` masks
    (not yet divided by the temperature)."""
    x = inputs.x.astype(dtype)
    return x if inputs.keep is None else jnp.where(inputs.keep, x, -jnp.inf)


def smoothing(inputs: Inputs, opts: SoftmaxOptions, dtype) -> jax.Array:
    """``a / C_row`` on kept classes: broadcastable to the logits (a scalar
    without ``where``); the class weights are not in it."""
    a = opts.label_smoothing
    if inputs.keep is None:
        return jnp.asarray(a / opts.num_classes, dtype)
    kept = ClassAxis(opts.axis_name).row_sum(inputs.keep.astype(dtype))
    return jnp.where(inputs.keep, a / jnp.maximum(kept, 1)[..., None], 0)


def weighted_by_class(v, inputs: Inputs, dtype):
    if inputs.class_weights is None:
        return v
    return v * inputs.class_weights.astype(dtype)


def targets(inputs: Inputs, opts: SoftmaxOptions, dtype, shape) -> jax.Array:
    """``t`` with the logits' ``shape``, zero on examples that are not scored."""
    a = opts.label_smoothing
    if opts.integer:
        ids = ClassAxis(opts.axis_name).ids(shape[-1])
        y = (ids == inputs.labels.ids[..., None]).astype(dtype)
    else:
        y = inputs.labels.astype(dtype)
        if inputs.keep is not None:
            y = jnp.where(inputs.keep, y, 0)
    t = (1 - a) * y if a else y
    if a:
        t = t + smoothing(inputs, opts, dtype)
    t = weighted_by_class(jnp.broadcast_to(t, shape), inputs, dtype)
    return jnp.where(inputs.scored[..., None], t, 0)


def target_sums(inputs: Inputs, xm, shift, opts: SoftmaxOptions):
    """``(sum_t, sum_t_xs, label_x)``: ``sum_c t_c`` and ``sum_c t_c (x_c -
    s) / T`` given the masked logits ``xm`` and their ``shift`` (in the
    logits' own units), without materialising ``t`` for integer labels (the
    one-hot part is a gather; only label smoothing reads rows), and for
    integer labels the label's own logit ``x_y`` (None for soft labels).

    The sums are taken halved (``_stats.half_shifted``) and before the
    temperature divides them: ``x_c - s``, and with ``T < 1`` ``(x_c - s) /
    T``, may overflow where ``t_c`` times it does not (issue 28's campaign:
    ``T = 2^-126``, ``t_c = 1/4``).
    """
    classes = ClassAxis(opts.axis_name)
    dtype = xm.dtype
    xh = _stats.half_shifted(xm, shift[..., None])
    if not opts.integer:
        t = targets(inputs, opts, dtype, xm.shape)
        sum_t_xh = classes.row_sum(_numerics.weighted(t, xh))
        return classes.row_sum(t), _stats.doubled(sum_t_xh, opts.temperature), None
    # The label's own logit is read unmasked (optax): from x, then shifted.
    label_x = classes.take(inputs.x.astype(dtype), inputs.labels.ids)
    w_y = label_weights(inputs, opts, dtype)
    smooth_mass = smooth_xh = None
    if opts.label_smoothing:
        u = weighted_by_class(smoothing(inputs, opts, dtype), inputs, dtype)
        smooth_mass = classes.row_sum(jnp.broadcast_to(u, xm.shape))
        smooth_xh = classes.row_sum(_numerics.weighted(u, xh))
    sum_t, sum_t_xh = _stats.integer_target_sums(
        opts.label_smoothing,
        w_y,
        _stats.half_shifted(label_x, shift),
        smooth_mass,
        smooth_xh,
    )
    sum_t_xs = _stats.doubled(sum_t_xh, opts.temperature)
    scored = inputs.scored
    sums = jnp.where(scored, sum_t, 0), jnp.where(scored, sum_t_xs, 0)
    return *sums, label_x


def label_weights(inputs: Inputs, opts: SoftmaxOptions, dtype) -> jax.Array:
    """``class_weights[label]`` per example (1 without class weights)."""
    if inputs.class_weights is None:
        return jnp.ones(inputs.labels.ids.shape, dtype)
    classes = ClassAxis(opts.axis_name)
    return classes.take(inputs.class_weights.astype(dtype), inputs.labels.ids)
