"""Validation of the loss options, and the frozen options object it returns.

Static options (label smoothing, z-loss, ignore_index, block sizes...) are
Python numbers that shape the program, so they are checked here, once, and
never truncated or coerced: an integer option takes an ``int`` (numpy integer
scalars and concrete 0-d jax integer arrays included, ``bool`` not), a real
option a finite real number (numpy scalars and concrete 0-d jax arrays
included). A traced value raises a ``TypeError`` naming the option.
Every front end builds one :class:`SoftmaxOptions`; the kernels read only it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax import _checks, _sharding

REDUCTIONS = ("none", "sum", "mean")
# Softmax losses also average per segment (sequence) first, then over segments.
SOFTMAX_REDUCTIONS = REDUCTIONS + ("mean_per_segment",)
Reduction = Literal["none", "sum", "mean"]
SoftmaxReduction = Literal["none", "sum", "mean", "mean_per_segment"]


def _traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _static_error(name: str, kind: str, value: Any) -> TypeError:
    if _traced(value):
        return TypeError(
            f"{name} must be a static Python {kind}; got a traced value (pass it "
            "as a static argument, e.g. with jax.jit(..., static_argnames=...), "
            "or close over it)."
        )
    return TypeError(f"{name} must be a Python {kind}; got {value!r}.")


def _scalar(value: Any) -> Any:
    """A 0-d numpy array or concrete (not traced) jax array as its scalar, and
    a 16-bit float scalar (``ml_dtypes``, not a ``numbers.Real``) as a Python
    float, exactly; anything else as it is."""
    concrete = isinstance(value, jax.Array) and not _traced(value)
    if (isinstance(value, np.ndarray) or concrete) and value.ndim == 0:
        value = np.asarray(value)[()]
    if isinstance(value, np.generic) and jnp.issubdtype(value.dtype, jnp.floating):
        return float(value)
    return value


def static_int(value: Any, name: str, minimum: int | None = None) -> int:
    """An ``int`` (numpy or concrete 0-d jax integers included), at least
    ``minimum``."""
    given, value = value, _scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _static_error(name, "int", given)
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}.")
    return value


def static_bool(value: Any, name: str) -> bool:
    """A ``bool`` (numpy's and concrete 0-d jax booleans included); never a
    string or a number taken for its truth value."""
    given, value = value, _scalar(value)
    if not isinstance(value, (bool, np.bool_)):
        raise _static_error(name, "bool", given)
    return bool(value)


def static_float(
    value: Any,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    given, value = value, _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _static_error(name, "float", given)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}.")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}]; got {value}.")
    return value


def check_temperature(temperature: float | None, dtype) -> None:
    """Raises unless ``temperature`` and its reciprocal are normal numbers of
    ``dtype``, the dtype the logits are computed in: XLA may divide by a
    constant as a product with its reciprocal and flushes subnormals to zero,
    and outside that range the tempered logits turned to NaN (issue 28, item
    5). Inside it, the shifted logits ``(x - max) / T`` are exact or ±inf."""
    if temperature is None:
        return
    tiny = float(jnp.finfo(dtype).tiny)
    if not tiny <= temperature <= 1.0 / tiny:
        raise ValueError(
            f"temperature={temperature!r} is outside [{tiny:.7g}, {1.0 / tiny:.7g}],"
            f" where {jnp.dtype(dtype).name} (the dtype the logits are computed "
            "in) holds it and its reciprocal as normal numbers."
        )


def optional(validate, value: Any, *args, **kwargs):
    return None if value is None else validate(value, *args, **kwargs)


def choice(value: Any, allowed: Sequence[Any], name: str) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}.")
    return value


def axis_names(value: Any) -> Any:
    """A ``shard_map`` axis name or a tuple of them, made hashable."""
    if isinstance(value, list):
        return tuple(value)
    return value


def block_size(value: Any) -> None | int | tuple[int, int]:
    """``None``, an int (classes per step) or ``(token_block, vocab_block)``."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                "block_size must be None, an int (vocabulary block) or a pair "
                f"(token_block, vocab_block); got {value!r}."
            )
        return tuple(static_int(b, "block_size", minimum=1) for b in value)
    return static_int(value, "block_size", minimum=1)


def normalizer(value: Any, parts: int) -> tuple[jax.Array, ...] | None:
    """The denominators a ``normalizer=`` gives to each of a mean's ``parts``.

    A scalar replaces every denominator; a pair (only where the mean has two
    parts: the cross-entropy and the z-loss) gives one to each.
    """
    if value is None:
        return None
    values = value if isinstance(value, (tuple, list)) else (value,)
    if len(values) not in (1, parts):
        raise ValueError(
            "normalizer must be a scalar"
            + (" or a pair (cross-entropy, z-loss)" if parts == 2 else "")
            + f"; got a sequence of {len(values)}."
        )
    out = []
    for v in values:
        v = _checks.as_array(v, "normalizer")
        _checks.check_real(v, "normalizer")
        _checks.check_shape(v, (), "normalizer", " (a scalar)")
        out.append(v)
    return tuple(out) * (parts if len(out) == 1 else 1)


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
    """The validated static options of every softmax loss (hashable: the
    kernels take it as a static argument)."""

    integer: bool
    ignore_index: int | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    temperature: float | None = None  # divides the logits before anything else
    logit_softcap: float | None = None  # then s * tanh(z / s)
    num_classes: int = 0  # the global class count, set once it is known
    axis_name: Any = None  # shard_map axes that split the classes
    aux: bool = False  # also compute the argmax and the entropy
    filter_threshold: float | None = None  # fused loss: gradient filtering
    reduction: str = "none"
    reduction_axis_name: Any = None  # shard_map axes that split the examples
    shift: int = 0  # score position t against label t + shift


def softmax_options(
    *,
    integer: bool,
    ignore_index: Any = None,
    label_smoothing: Any = 0.0,
    z_loss: Any = 0.0,
    temperature: Any = None,
    logit_softcap: Any = None,
    axis_name: Any = None,
    return_aux: Any = False,
    filter_threshold: Any = None,
    reduction: Any = "none",
    reduction_axis_name: Any = None,
    shift: Any = 0,
) -> SoftmaxOptions:
    """Validates the options every softmax loss shares."""
    if ignore_index is not None and not integer:
        raise ValueError("ignore_index applies to integer labels only.")
    shift = static_int(shift, "shift", minimum=0)
    if shift and not integer:
        raise ValueError(
            "shift applies to integer labels: soft targets at position t are "
            "already the distribution of the token after it."
        )
    axis_name, reduction_axis_name = map(axis_names, (axis_name, reduction_axis_name))
    _sharding.check_reduction_axes(axis_name, reduction_axis_name)
    return SoftmaxOptions(
        integer=integer,
        ignore_index=optional(static_int, ignore_index, "ignore_index"),
        label_smoothing=static_float(label_smoothing, "label_smoothing", 0.0, 1.0),
        z_loss=static_float(z_loss, "z_loss", 0.0),
        temperature=optional(
            static_float, temperature, "temperature", 0.0, low_open=True
        ),
        logit_softcap=optional(
            static_float, logit_softcap, "logit_softcap", 0.0, low_open=True
        ),
        axis_name=axis_name,
        aux=static_bool(return_aux, "return_aux"),
        filter_threshold=optional(
            static_float, filter_threshold, "filter_threshold", 0.0, 1.0
        ),
        reduction=choice(reduction, SOFTMAX_REDUCTIONS, "reduction"),
        reduction_axis_name=reduction_axis_name,
        shift=shift,
    )
