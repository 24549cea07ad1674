"""The ``reduction`` and ``normalizer`` keywords, shared by every loss."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from xent_jax import _checks

Reduction = Literal["none", "sum", "mean"]


def reduce_loss(
    losses: jax.Array,
    reduction: str,
    denominator: Any,
    normalizer: Any = None,
) -> jax.Array:
    """Applies ``reduction`` to per-example ``losses``.

    ``"mean"`` divides the sum by ``normalizer`` when given, else by
    ``denominator`` (the loss's own count or weight sum, see each loss). A zero
    denominator gives 0 with zero gradient rather than NaN, so a batch whose
    examples are all ignored contributes nothing.
    """
    _checks.check_choice(reduction, _checks.REDUCTIONS, "reduction")
    if normalizer is not None and reduction != "mean":
        raise ValueError(
            f'normalizer only applies to reduction="mean"; got reduction={reduction!r}.'
        )
    if reduction == "none":
        return losses
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    den = normalizer if normalizer is not None else denominator
    den = jax.lax.stop_gradient(jnp.asarray(den, total.dtype))
    safe = jnp.where(den == 0, jnp.ones_like(den), den)
    return jnp.where(den == 0, jnp.zeros_like(total), total / safe)
