"""Array contracts shared by every loss, checked at trace time.

Shapes and dtypes are static, so everything here runs while tracing and costs
nothing in the compiled program. Dtype problems raise ``TypeError``, shape
problems ``ValueError``; messages name the argument and show what was expected
and what was passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_array(x: Any, name: str) -> jax.Array:
    """``x`` (a jax or numpy array, a Python scalar or sequence) as a jax array.

    numpy arrays become jax arrays here, once, so that nothing downstream
    indexes a numpy array with a tracer.
    """
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be an array of numbers; got {x!r} ({e})."
        ) from None


def optional_array(x: Any, name: str) -> jax.Array | None:
    return None if x is None else as_array(x, name)


def check_floating(x: Any, name: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {dtype}.")


def check_integer(x: Any, name: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{name} must have an integer dtype (class ids); got {dtype}. Float "
            "and bool labels are never cast: pass integers, or use "
            "softmax_cross_entropy for probability targets."
        )


def check_real(x: Any, name: str) -> None:
    """A number that can weigh a loss: floating or integer, not bool."""
    dtype = jnp.result_type(x)
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.number):
        raise TypeError(f"{name} must have a numeric dtype; got {dtype}.")
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real; got {dtype}.")


def check_bool(x: Any, name: str) -> None:
    dtype = jnp.result_type(x)
    if dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask; got dtype {dtype}.")


def check_shape(x: Any, expected: Sequence[int], name: str, hint: str = "") -> None:
    """Raises unless ``x`` has exactly ``expected`` shape (no broadcasting)."""
    expected = tuple(expected)
    got = tuple(np.shape(x))
    same = len(got) == len(expected) and all(
        g is e or g == e for g, e in zip(got, expected, strict=True)
    )
    if not same:
        raise ValueError(f"{name} must have shape {expected}{hint}; got {got}.")


def check_broadcastable(x: Any, target: Sequence[int], name: str) -> None:
    """Raises unless ``x`` broadcasts to ``target`` without growing it."""
    shape, target = tuple(np.shape(x)), tuple(target)
    ok = len(shape) <= len(target) and all(
        s == 1 or s == t for s, t in zip(shape[::-1], target[::-1], strict=False)
    )
    if not ok:
        raise ValueError(f"{name} must broadcast to {target}; got {shape}.")


def canonical_axes(axis: Any, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """``axis`` (an int, a tuple of ints, or ``None`` for every axis) as a
    sorted-by-position tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
    if not isinstance(axes, (tuple, list)) or not axes:
        raise TypeError(
            f"{name} must be an int, a tuple of ints or None; got {axis!r}."
        )
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(
                f"{name} must be an int, a tuple of ints or None; got {axis!r}."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{name}={int(a)} is out of bounds for logits of rank {ndim}."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {axis!r}.")
    return tuple(out)
