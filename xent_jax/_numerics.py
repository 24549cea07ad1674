"""Numeric primitives every loss uses, each defined once."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
    """16-bit inputs are computed and accumulated in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def weighted(t: jax.Array, v: jax.Array) -> jax.Array:
    """``t * v`` where a zero weight contributes 0, even at ``v = ±inf`` or
    NaN (``0 log 0 = 0``: a class or label without target mass). Written so
    that its derivatives are finite there too (no ``0 * inf`` in autodiff),
    while ``d/dt = v`` at ``t = 0`` wherever ``v`` is finite (a target that is
    exactly 0 still has a gradient)."""
    return t * jnp.where((t == 0) & ~jnp.isfinite(v), 0, v)


def sum_to_shape(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``a`` summed over the axes along which an array of ``shape`` was
    broadcast to ``a``'s shape (the transpose of that broadcast)."""
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and a.shape[lead + i] != 1
    )
    return jnp.sum(a, axis=axes).reshape(shape)


def tempered(v: jax.Array, temperature: float | None) -> jax.Array:
    """Logits (or a statistic linear in them, such as their max) divided by
    the temperature."""
    return v if temperature is None else v / temperature


def is_zero(g) -> bool:
    """A cotangent that ``custom_vjp(symbolic_zeros=True)`` passes as zero."""
    return g is None or isinstance(g, jax.custom_derivatives.SymbolicZero)


def materialised(g, like: jax.Array) -> jax.Array:
    """A cotangent in ``like``'s dtype, a symbolic zero made an actual zero."""
    if is_zero(g):
        return jnp.zeros(like.shape, like.dtype)
    return g.astype(like.dtype)
