"""Integer labels: which are class ids, which are ignored, which are bad.

Labels may have any integer dtype, from ``int8`` to ``uint64``. Nothing here
converts a number into the labels' dtype unless that dtype can represent it,
so no comparison wraps: a label is a class iff ``0 <= label < C``, it is
ignored iff it equals ``ignore_index`` (an ``ignore_index`` the dtype cannot
hold matches nothing), and anything else is out of range ("bad"). Only class
ids, all below ``C``, are ever converted to ``int32`` for indexing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from xent_jax import _compat


class Labels(NamedTuple):
    """Integer labels, classified (every field has the labels' shape)."""

    ids: jax.Array  # int32 class ids, 0 where the example is not scored
    scored: jax.Array  # bool: a class id (0 <= label < C), not ignore_index
    bad: jax.Array  # bool: neither a class id nor ignore_index


def _representable(value: int, dtype: Any) -> bool:
    info = np.iinfo(dtype)
    return int(info.min) <= value <= int(info.max)


def _classify(xp, labels, num_classes: int, ignore_index: int | None):
    """``(is_class, ignored)`` with ``xp`` numpy or jax.numpy."""
    dtype = labels.dtype
    is_class = labels >= xp.asarray(0, dtype)  # always true when unsigned
    if _representable(num_classes, dtype):
        is_class = is_class & (labels < xp.asarray(num_classes, dtype))
    ignored = xp.zeros(labels.shape, bool)
    if ignore_index is not None and _representable(ignore_index, dtype):
        ignored = labels == xp.asarray(ignore_index, dtype)
    return is_class, ignored


def classify(labels: jax.Array, num_classes: int, ignore_index: int | None) -> Labels:
    """Classifies ``labels`` against the global class count ``num_classes``."""
    is_class, ignored = _classify(jnp, labels, num_classes, ignore_index)
    scored = is_class & ~ignored
    ids = jnp.where(scored, labels, jnp.zeros((), labels.dtype)).astype(jnp.int32)
    return Labels(ids, scored, ~is_class & ~ignored)


def check_in_range(
    labels: jax.Array,
    num_classes: int,
    ignore_index: int | None,
    source: Any = None,
    name: str = "labels",
    shift: int = 0,
) -> jax.Array:
    """Raises for out-of-range class ids; under tracing, a ``checkify`` check.

    Concrete labels are read on the host and the first bad position is named.
    Traced labels cannot be read: the kernels turn such examples into NaN losses
    with no gradient, and this registers a check that ``checkify.checkify``
    surfaces (a no-op otherwise). Returns the labels, which the caller must
    use in place of its own: the check lives on that data path, so that
    rematerialisation or dead-code elimination cannot drop it. ``source`` is
    what the user passed, read when it is concrete (a numpy array closed over
    inside ``jit`` is, the jax array made of it is not). ``labels`` and
    ``source`` start ``shift`` positions into the user's last axis: the
    position named is the user's.
    """
    concrete = labels if source is None else source
    if not isinstance(concrete, jax.core.Tracer):
        values = np.asarray(concrete)
        is_class, ignored = _classify(np, values, num_classes, ignore_index)
        bad = ~is_class & ~ignored
        if bad.any():
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            users = list(position[:-1]) + [position[-1] + shift] if shift else position
            raise ValueError(
                f"{name}{list(users)} = {values[position]} is out of range: class "
                f"ids must lie in {_allowed(num_classes, ignore_index)} "
                f"({int(bad.sum())} bad label(s) in all)."
            )
        return labels
    params = dict(num_classes=int(num_classes), ignore_index=ignore_index, name=name)
    if not _compat.CHECKIFY_RULES:
        # Same behaviour, at the cost of an effect (and jit's slow dispatch).
        bad = classify(labels, num_classes, ignore_index).bad
        checkify.debug_check(~jnp.any(bad), _message(**params))
        return labels
    return _range_check_p.bind(labels, **params)


def _allowed(num_classes: int, ignore_index: int | None) -> str:
    allowed = f"[0, {num_classes})"
    if ignore_index is not None:
        allowed += f" or ignore_index={ignore_index}"
    return allowed


def _message(num_classes: int, ignore_index: int | None, name: str) -> str:
    return (
        f"{name} contains class ids outside {_allowed(num_classes, ignore_index)}; "
        "their losses are NaN."
    )


def _out_of_range(labels, **params):
    """Whether any traced label is out of range, and the message that says so."""
    bad = classify(labels, params["num_classes"], params["ignore_index"]).bad
    return jnp.any(bad), _message(**params)


# An identity primitive rather than checkify.debug_check: debug_check puts an
# ErrorEffect in the jaxpr, and jit's C++ fast dispatch path refuses
# effectful executables, so every jitted call paid about 0.1 ms of Python
# dispatch even when nothing checkifies it.
_range_check_p = _compat.register_identity_primitive(
    "xent_labels_in_range_check", _out_of_range
)


def prepare(
    labels: jax.Array,
    num_classes: int,
    ignore_index: int | None,
    shift: int = 0,
    source: Any = None,
) -> Labels:
    """Range-checked, classified labels; with ``shift``, position ``t`` takes
    the label at ``t + shift`` along the last axis, and the last ``shift``
    positions score nothing. Only the labels that are targets are checked:
    the first ``shift`` are inputs, never scored."""
    if shift:
        if labels.ndim == 0:
            raise ValueError("shift needs labels with a sequence (last) axis.")
        length = labels.shape[-1]
        labels = labels[..., shift:]
        if source is not None and not isinstance(source, jax.core.Tracer):
            source = np.asarray(source)[..., shift:]
    labels = check_in_range(labels, num_classes, ignore_index, source, shift=shift)
    out = classify(labels, num_classes, ignore_index)
    if shift:
        pad = [(0, 0)] * (labels.ndim - 1) + [(0, length - labels.shape[-1])]
        out = Labels(*(jnp.pad(f, pad) for f in out))
    return out


def restricted(labels: Labels, keep: jax.Array) -> Labels:
    """``labels`` scoring only where ``keep`` holds."""
    return labels._replace(scored=labels.scored & keep)
