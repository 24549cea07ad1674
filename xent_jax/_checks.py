"""Array contracts shared by every loss, checked at trace time with chex.

Shapes and dtypes are static, so everything here runs while tracing and costs
nothing in the compiled program, on any backend (and when lowering for one
this host does not have). Dtype problems raise ``TypeError``, shape problems
``ValueError``; messages name the argument and show what was expected and what
was passed, after chex's own account of the failed assertion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

_PROBE = jax.ShapeDtypeStruct((), jnp.float32)


def _chex_disabled() -> bool:
    """Whether the user turned chex's assertions off (``chex.disable_asserts``)."""
    try:
        chex.assert_rank(_PROBE, 1)
    except AssertionError:
        return False
    return True


def _chex(assertion: Callable, x: Any, expected: Any, error: type, message: str):
    """Runs a chex static assertion on ``x``'s shape and dtype only (a stand-in
    struct: chex would read a Python sequence as several inputs), raising
    ``error`` with ``message``. ``chex.disable_asserts()`` is for the user's
    own assertions: a loss's contracts hold regardless."""
    struct = jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
    disabled = _chex_disabled()
    if disabled:
        chex.enable_asserts()
    try:
        assertion(struct, expected, exception_type=error, custom_message=message)
    finally:
        if disabled:
            chex.disable_asserts()


def as_array(x: Any, name: str) -> jax.Array:
    """``x`` (a jax or numpy array, a Python scalar or sequence) as a jax array.

    numpy arrays become jax arrays here, once, so that nothing downstream
    indexes a numpy array with a tracer.
    """
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except OverflowError as e:
        # Python integers beyond the default integer dtype (int32 with x64 off).
        raise ValueError(f"{name} holds a value JAX cannot hold: {e}.") from None
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be an array of numbers; got {x!r} ({e})."
        ) from None


def optional_array(x: Any, name: str) -> jax.Array | None:
    return None if x is None else as_array(x, name)


def check_floating(x: Any, name: str) -> None:
    dtype = jnp.result_type(x)
    message = f"{name} must have a floating dtype; got {dtype}."
    _chex(chex.assert_type, x, jnp.floating, TypeError, message)


def check_integer(x: Any, name: str) -> None:
    message = (
        f"{name} must have an integer dtype (class ids); got "
        f"{jnp.result_type(x)}. Float and bool labels are never cast: pass "
        "integers, or use softmax_cross_entropy for probability targets."
    )
    _chex(chex.assert_type, x, jnp.integer, TypeError, message)


def check_real(x: Any, name: str) -> None:
    """A number that can weigh a loss: floating or integer, not bool (no chex
    assertion takes a set of dtype kinds)."""
    dtype = jnp.result_type(x)
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.number):
        raise TypeError(f"{name} must have a numeric dtype; got {dtype}.")
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real; got {dtype}.")


def check_bool(x: Any, name: str) -> None:
    message = f"{name} must be a boolean mask; got dtype {jnp.result_type(x)}."
    _chex(chex.assert_type, x, jnp.bool_, TypeError, message)


def optional_mask(where: Any, shape: Sequence[int], hint: str = "") -> Any:
    """``where`` checked: ``None``, or a boolean mask of exactly ``shape``
    (``hint`` explains the shape in the error)."""
    if where is None:
        return None
    where = as_array(where, "where")
    check_bool(where, "where")
    check_shape(where, shape, "where", hint)
    return where


def check_shape(
    x: Any, expected: Sequence[Any], name: str, hint: str = "", message: str = ""
) -> None:
    """Raises unless ``x`` has exactly ``expected`` shape (no broadcasting;
    chex's ``None`` and ``...`` match any dimension and any leading ones)."""
    expected = tuple(expected)
    got = tuple(np.shape(x))
    message = message or f"{name} must have shape {expected}{hint}; got {got}."
    _chex(chex.assert_shape, x, expected, ValueError, message)


def check_rank(x: Any, ranks: int | set[int], message: str) -> None:
    _chex(chex.assert_rank, x, ranks, ValueError, message)


def check_broadcastable(x: Any, target: Sequence[int], name: str) -> None:
    """Raises unless ``x`` broadcasts to ``target`` without growing it."""
    shape, target = tuple(np.shape(x)), tuple(target)
    message = f"{name} must broadcast to {target}; got {shape}."
    _chex(_broadcastable_to, x, target, ValueError, message)


def _broadcastable_to(x: Any, target: Sequence[int], **kwargs: Any) -> None:
    chex.assert_is_broadcastable(x.shape, target, **kwargs)


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
