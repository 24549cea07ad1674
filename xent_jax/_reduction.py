"""The ``reduction``, ``normalizer`` and ``reduction_axis_name`` keywords."""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from xent_jax import _checks, _sharding

Reduction = Literal["none", "sum", "mean"]


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
    return _global_sum(x, axis_name, _sharding.varying_axes(x, axis_name))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _global_sum(x, axis_name, varying):
    return jax.lax.psum(x, axis_name)


def _global_sum_fwd(x, axis_name, varying):
    return jax.lax.psum(x, axis_name), None


def _global_sum_bwd(axis_name, varying, _, g):
    # The cotangent must have the primal's type: varying where x varied.
    return (_sharding.to_varying(g, varying),)


_global_sum.defvjp(_global_sum_fwd, _global_sum_bwd)


def reduce_loss(
    losses: jax.Array,
    reduction: str,
    denominator: Any,
    normalizer: Any = None,
    reduction_axis_name: Any = None,
) -> jax.Array:
    """Applies ``reduction`` to per-example ``losses``.

    ``"mean"`` divides the sum by ``normalizer`` when given, else by
    ``denominator`` (the loss's own count or weight sum, see each loss). A zero
    denominator gives 0 with zero gradient rather than NaN, so a batch whose
    examples are all ignored contributes nothing.

    Args:
      losses: Per-example (or per-element) losses.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      denominator: The local denominator of ``"mean"`` (ignored otherwise).
      normalizer: Replaces the (global) denominator of ``"mean"``.
      reduction_axis_name: Inside ``shard_map``, the mesh axes over which the
        examples are split (data parallelism). ``"sum"`` and ``"mean"`` then
        return the global sum / mean, the same value on every device: the sum
        and the denominator are ``psum``-ed over these axes. The gradient that
        reaches each device's losses is its share of the global one (see
        :func:`global_sum`). Ignored for ``"none"``.

    Returns:
      ``losses`` for ``"none"``, else a scalar.
    """
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    if normalizer is not None and reduction != "mean":
        raise ValueError(
            f'normalizer only applies to reduction="mean"; got reduction={reduction!r}.'
        )
    if reduction == "none":
        return losses
    total = jnp.sum(losses)
    if reduction_axis_name is not None:
        total = global_sum(total, reduction_axis_name)
    if reduction == "sum":
        return total
    if normalizer is not None:
        den = normalizer
    else:
        den = denominator
        if reduction_axis_name is not None:
            den = jax.lax.psum(jax.lax.stop_gradient(den), reduction_axis_name)
    den = jax.lax.stop_gradient(jnp.asarray(den, total.dtype))
    safe = jnp.where(den == 0, jnp.ones_like(den), den)
    return jnp.where(den == 0, jnp.zeros_like(total), total / safe)
