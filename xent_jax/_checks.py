"""Argument contracts shared by every loss.

Everything here runs at trace time (shapes and dtypes are static), except
:func:`check_labels_in_range`, which inspects label values only when they are
concrete and defers to ``checkify`` under tracing. Dtype problems raise
``TypeError``, shape and value problems raise ``ValueError``; messages name the
argument and show what was expected and what was passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

REDUCTIONS = ("none", "sum", "mean")


def check_floating(x: Any, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {jnp.result_type(x)}.")


def check_integer(x: Any, name: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{name} must have an integer dtype (class ids); got {dtype}. Float "
            "labels are never cast: pass integers, or use softmax_cross_entropy "
            "for probability targets."
        )


def check_shape(x: Any, expected: Sequence[int], name: str, hint: str = "") -> None:
    """Raises unless ``x`` has exactly ``expected`` shape (no broadcasting)."""
    expected = tuple(expected)
    try:
        chex.assert_shape(x, expected)
    except AssertionError:
        raise ValueError(
            f"{name} must have shape {expected}{hint}; got {tuple(np.shape(x))}."
        ) from None


def check_broadcastable(x: Any, target: Sequence[int], name: str) -> None:
    try:
        np.broadcast_shapes(np.shape(x), tuple(target))
        ok = len(np.shape(x)) <= len(target)
    except ValueError:
        ok = False
    if not ok or np.broadcast_shapes(np.shape(x), tuple(target)) != tuple(target):
        raise ValueError(
            f"{name} must broadcast to {tuple(target)}; got {tuple(np.shape(x))}."
        )


def check_choice(value: Any, allowed: Sequence[Any], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}.")


def check_static_float(value: Any, name: str, low: float, high: float) -> float:
    """Static hyper-parameters (smoothing, z-loss) are Python numbers."""
    try:
        value = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(f"{name} must be a Python float; got {value!r}.") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}]; got {value}.")
    return value


def check_common_options(
    reduction: str,
    implementation: str | None,
    implementations: Sequence[str],
    label_smoothing: Any,
    z_loss: Any,
) -> tuple[str, float, float]:
    """Validates the options every softmax loss shares.

    Returns the implementation (the first of ``implementations`` for ``None``),
    ``label_smoothing`` and ``z_loss`` as Python floats.
    """
    check_choice(reduction, REDUCTIONS, "reduction")
    implementation = implementations[0] if implementation is None else implementation
    check_choice(implementation, implementations, "implementation")
    label_smoothing = check_static_float(label_smoothing, "label_smoothing", 0.0, 1.0)
    z_loss = check_static_float(z_loss, "z_loss", 0.0, float("inf"))
    return implementation, label_smoothing, z_loss


def canonical_axes(axis: int | tuple[int, ...], ndim: int, name: str = "axis"):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes or not all(isinstance(a, int) for a in axes):
        raise ValueError(f"{name} must be an int or a tuple of ints; got {axis!r}.")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={a} is out of bounds for logits of rank {ndim}.")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has repeated entries: {axis!r}.")
    return tuple(out)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def label_out_of_range(
    labels: jax.Array, num_classes: int, ignore_index: int | None
) -> jax.Array:
    """Boolean mask of labels that are neither a class id nor ``ignore_index``."""
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    return bad


def check_labels_in_range(
    labels: Any, num_classes: int, ignore_index: int | None, name: str = "labels"
) -> None:
    """Raises for out-of-range class ids; under tracing, a ``checkify`` check.

    Concrete labels are read on the host and the first bad position is named.
    Traced labels cannot be read: the kernels turn such examples into NaN losses
    with no gradient, and this registers a check that ``checkify.checkify``
    surfaces (it is a no-op otherwise).
    """
    if _is_concrete(labels):
        values = np.asarray(labels)
        bad = (values < 0) | (values >= num_classes)
        if ignore_index is not None:
            bad &= values != ignore_index
        if bad.any():
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            allowed = f"[0, {num_classes})"
            if ignore_index is not None:
                allowed += f" or ignore_index={ignore_index}"
            raise ValueError(
                f"{name}{list(position)} = {values[position]} is out of range: class "
                f"ids must lie in {allowed} ({int(bad.sum())} bad label(s) in all)."
            )
        return
    checkify.debug_check(
        ~jnp.any(label_out_of_range(labels, num_classes, ignore_index)),
        f"{name} contains class ids outside [0, {num_classes})"
        + (
            f" other than ignore_index={ignore_index}"
            if ignore_index is not None
            else ""
        )
        + "; their losses are NaN.",
    )
