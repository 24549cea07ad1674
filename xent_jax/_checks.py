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
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.interpreters import ad, batching, mlir

try:  # checkify's rule table is private: fall back to debug_check without it
    from jax._src import checkify as _checkify

    _CHECKIFY_RULES = all(
        hasattr(_checkify, name)
        for name in ("error_checks", "assert_func", "FailedCheckError", "get_traceback")
    )
except ImportError:  # pragma: no cover - depends on the jax version
    _CHECKIFY_RULES = False

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
) -> Any:
    """Raises for out-of-range class ids; under tracing, a ``checkify`` check.

    Concrete labels are read on the host and the first bad position is named.
    Traced labels cannot be read: the kernels turn such examples into NaN losses
    with no gradient, and this registers a check that ``checkify.checkify``
    surfaces (it is a no-op otherwise). Returns the labels, which the caller
    must use in place of its own: the check lives on that data path, so that
    rematerialisation or dead-code elimination cannot drop it.
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
        return labels
    if not _CHECKIFY_RULES:
        # Same behaviour, at the cost of an effect (and jit's slow dispatch).
        bad = label_out_of_range(labels, num_classes, ignore_index)
        checkify.debug_check(
            ~jnp.any(bad), _range_message(num_classes, ignore_index, name)
        )
        return labels
    return _labels_check_p.bind(
        labels, num_classes=int(num_classes), ignore_index=ignore_index, name=name
    )


def _range_message(num_classes: int, ignore_index: int | None, name: str) -> str:
    return (
        f"{name} contains class ids outside [0, {num_classes})"
        + (
            f" other than ignore_index={ignore_index}"
            if ignore_index is not None
            else ""
        )
        + "; their losses are NaN."
    )


# The traced check is a primitive of its own rather than checkify.debug_check:
# debug_check puts an ErrorEffect in the jaxpr, and jit's C++ fast dispatch
# path refuses effectful executables, so every jitted call paid about 0.1 ms of
# Python dispatch even when nothing checkifies it. This primitive is the
# identity on the labels, has no effect and lowers to nothing; only the
# checkify interpreter gives it a meaning (the rule below, registered in
# checkify's private table of rules).
_labels_check_p = jax.extend.core.Primitive("xent_labels_in_range_check")
_labels_check_p.def_impl(lambda labels, **_: labels)
_labels_check_p.def_abstract_eval(lambda labels, **_: labels)
mlir.register_lowering(_labels_check_p, lambda ctx, labels, **_: [labels])


def _labels_check_batching(args, dims, **params):
    # The assertion covers every label, the batch of them included.
    return _labels_check_p.bind(*args, **params), dims[0]


def _labels_check_jvp(primals, tangents, **params):
    return _labels_check_p.bind(*primals, **params), tangents[0]


def _labels_check_checkify(error, enabled_errors, labels, **params):
    if _checkify.FailedCheckError in enabled_errors:  # user checks, as debug_check
        bad = jnp.any(
            label_out_of_range(labels, params["num_classes"], params["ignore_index"])
        )
        failure = _checkify.FailedCheckError(
            _checkify.get_traceback(), _range_message(**params)
        )
        error = _checkify.assert_func(error, bad, failure)
    return error, labels


batching.primitive_batchers[_labels_check_p] = _labels_check_batching
ad.primitive_jvps[_labels_check_p] = _labels_check_jvp
if _CHECKIFY_RULES:
    _checkify.error_checks[_labels_check_p] = _labels_check_checkify
