"""The ``reduction``, ``normalizer`` and ``reduction_axis_name`` keywords.

A loss is a sum of *parts*, each a per-example array with its own mean
denominator: the cross-entropy (divided by the sum of the scored examples'
class weights, PyTorch's weighted mean) and the z-loss (divided by the number
of scored examples, so that its strength does not depend on class weights).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _compat, _options, _segments, _sharding

Reduction = Literal["none", "sum", "mean"]


class Part(NamedTuple):
    """Per-example values and the denominator of their ``"mean"``."""

    values: jax.Array
    denominator: Any


def global_sum(x: jax.Array, axis_name: Any) -> jax.Array:
    """``psum(x, axis_name)`` whose cotangent reaches each device unsummed.

    The value is the same on every device. In the backward pass each device's
    ``x`` gets the output's cotangent as is: its own contribution to the
    gradient. Summing those over devices is the job of whoever reduces the
    parameter gradients (under ``shard_map``'s default ``check_vma=True`` JAX
    does it when it transposes the implicit broadcast of replicated
    parameters; with ``check_vma=False`` the caller's ``psum``). JAX's own
    ``psum`` transposes to a ``psum`` when ``check_vma=False``, which would
    scale every gradient by the number of devices.
    """
    if axis_name is None:
        return x
    return _global_sum(x, axis_name, _sharding.varying_axes(x, axis_name))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _global_sum(x, axis_name, varying):
    return jax.lax.psum(x, axis_name)


def _global_sum_fwd(x, axis_name, varying):
    return jax.lax.psum(x, axis_name), None


def _global_sum_bwd(axis_name, varying, _, g):
    # The cotangent must have the primal's type: varying where x varied.
    return (_compat.to_varying(g, varying),)


_global_sum.defvjp(_global_sum_fwd, _global_sum_bwd)


def _safe_divide(total, den):
    """``total / den``, and 0 with zero gradient where ``den`` is 0, except
    that a NaN total stays NaN: a batch whose only examples are out-of-range
    labels (NaN, never scored) must not average to a silent 0."""
    den = jnp.asarray(den).astype(total.dtype)
    zero = den == 0
    empty = jnp.where(jnp.isnan(total), jax.lax.stop_gradient(total), 0)
    return jnp.where(zero, empty, total / jnp.where(zero, 1, den))


def reduce_loss(
    parts: Sequence[Part],
    reduction: str,
    normalizer: tuple[jax.Array, ...] | None = None,
    reduction_axis_name: Any = None,
) -> jax.Array:
    """Applies ``reduction`` to a loss made of ``parts``.

    ``"none"`` returns the per-example sum of the parts, ``"sum"`` the total.
    ``"mean"`` divides each part's total by its denominator (or by the
    matching entry of ``normalizer``) and adds them; a zero denominator gives
    0 with zero gradient rather than NaN, so a batch whose examples are all
    ignored contributes nothing. Denominators are differentiated like any
    value (class weights reach the mean through them).

    Args:
      parts: The loss's parts (see :class:`Part`).
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      normalizer: One denominator per part, replacing theirs (already
        validated, see ``_options.normalizer``); only for ``"mean"``.
      reduction_axis_name: Inside ``shard_map``, the mesh axes over which the
        examples are split (data parallelism). ``"sum"`` and ``"mean"`` then
        return the global sum / mean, the same value on every device: totals
        and denominators are summed over these axes, and the gradient that
        reaches each device is its share of the global one (see
        :func:`global_sum`). Ignored for ``"none"``.

    Returns:
      Per-example losses for ``"none"``, else a scalar.
    """
    if normalizer is not None and reduction != "mean":
        raise ValueError(
            f'normalizer only applies to reduction="mean"; got reduction={reduction!r}.'
        )
    if reduction == "none":
        return functools.reduce(jnp.add, (p.values for p in parts))
    totals = [global_sum(jnp.sum(p.values), reduction_axis_name) for p in parts]
    if reduction == "sum":
        return functools.reduce(jnp.add, totals)
    if normalizer is None:
        dens = [
            global_sum(jnp.asarray(p.denominator).astype(t.dtype), reduction_axis_name)
            for p, t in zip(parts, totals, strict=True)
        ]
    else:
        dens = normalizer
    means = [_safe_divide(t, d) for t, d in zip(totals, dens, strict=True)]
    return functools.reduce(jnp.add, means)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def z_term(lse: jax.Array, z_loss: float) -> jax.Array:
    """``z_loss * lse**2``, finite wherever it is: ``lse**2`` overflows float32
    beyond 1.8e19 (a tiny temperature) while ``z lse**2`` may not; there it is
    ``(z lse) lse``. Elsewhere the product keeps its usual form. Its
    derivative is ``_z_term_jvp``'s."""
    square = lse * lse
    overflow = jnp.isinf(square) & jnp.isfinite(lse)
    return jnp.where(overflow, (z_loss * lse) * lse, z_loss * square)


@z_term.defjvp
def _z_term_jvp(z_loss, primals, tangents):
    """``z (lse (2 t))``: transposed, a cotangent ``g`` becomes ``2 ((z g)
    lse)``, scaled by ``z`` first, so that neither ``g lse`` nor ``2 lse``
    overflows where the result does not (issue 28's campaign: NaN on every
    logit at ``T = 2^-126``); bit for bit the ``(2 z g) lse`` of the kernel's
    ``cotangent_hint``."""
    (lse,), (t,) = primals, tangents
    return z_term(lse, z_loss), z_loss * (lse * (2 * t))


def reduce_softmax(
    ce: jax.Array,
    lse: jax.Array,
    scored: jax.Array,
    label_weight: jax.Array | None,
    opts: Any,
    normalizer: Any = None,
    segments: Any = None,
) -> jax.Array:
    """A softmax loss from its per-example cross-entropy and log-sum-exp.

    The z-loss ``z_loss * lse**2`` is added on scored examples. ``"mean"``
    divides the cross-entropy by the sum of the scored examples'
    ``label_weight`` (their class weight; their count when ``None``) and the
    z-loss by their count. ``"mean_per_segment"`` does that within each
    segment (``_segments``) and averages over the segments with a scored
    example. ``normalizer`` (validated here) replaces the denominators: a
    scalar, or for ``"mean"`` with a z-loss a pair (cross-entropy, z-loss);
    for ``"mean_per_segment"`` a scalar, the number of segments.
    """
    z = None
    if opts.z_loss:
        z = jnp.where(scored, z_term(lse, opts.z_loss), 0).astype(ce.dtype)
    if opts.reduction == "mean_per_segment":
        w_ce, w_z, num_segments = _segments.mean_weights(
            scored, label_weight, segments, ce.dtype
        )
        values = ce * w_ce if z is None else ce * w_ce + z * w_z
        parts = [Part(values, num_segments)]
        return reduce_loss(
            parts,
            "mean",
            _options.normalizer(normalizer, 1),
            opts.reduction_axis_name,
        )
    count = jnp.sum(scored)
    ce_denominator = count
    if label_weight is not None:
        ce_denominator = jnp.sum(jnp.where(scored, label_weight, 0))
    parts = [Part(ce, ce_denominator)]
    if z is not None:
        parts.append(Part(z, count))
    if (
        normalizer is not None
        and not isinstance(normalizer, (tuple, list))
        and len(parts) == 2
        and label_weight is not None
    ):
        raise ValueError(
            "normalizer is ambiguous with class_weights and z_loss: the "
            "cross-entropy's mean divides by the sum of the scored examples' class "
            "weights, the z-loss's by their number. Pass normalizer=(weight_sum, "
            "count), the global values of both."
        )
    normalizers = _options.normalizer(normalizer, len(parts))
    return reduce_loss(parts, opts.reduction, normalizers, opts.reduction_axis_name)


def cotangent_hint(
    scored: jax.Array,
    label_weight: jax.Array | None,
    opts: Any,
    dtype: Any,
    normalizer: Any = None,
    segments: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """The cotangents ``reduce_softmax`` sends to each example's cross-entropy
    and, per unit of ``lse``, to its log-sum-exp when the loss's cotangent is
    1 (ones per example for ``"none"``).

    Taken from ``reduce_softmax``'s own transpose, so that a kernel folding
    them into its residual multiplies by exactly what the backward pass later
    brings. The z-loss's cotangent ``2 z lse w`` is linear in ``lse``: it is
    read at ``lse = 1``. Constants of the forward pass (no gradient).
    """
    zeros = jnp.zeros(scored.shape, dtype)

    def reduced(ce, lse):
        return reduce_softmax(ce, lse, scored, label_weight, opts, normalizer, segments)

    loss, transpose = jax.vjp(reduced, zeros, jnp.ones_like(zeros))
    return jax.lax.stop_gradient(transpose(jnp.ones_like(loss)))
