"""Segments: the sequences of packed and padded batches.

``segment_ids`` has the labels' shape; its last axis is the sequence. A
segment is a maximal run of equal ids along that axis within one row (all the
other axes), so the same id in two rows, or twice in a row with another id
between, names different segments. A negative id, or one equal to
``ignore_index``, marks padding: those positions are never scored.

Without ``segment_ids`` every row is one segment (a padded batch).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax import _checks, _options


class Segments(NamedTuple):
    """Each position's segment, as a dense index in ``[0, size)``."""

    index: jax.Array  # int32, the labels' shape
    size: Any  # an upper bound on the number of segments (the positions)


def validate(
    segment_ids: Any, shape: tuple, padding_id: Any = None
) -> tuple[jax.Array | None, int | None]:
    """``(segment_ids, segment_padding_id)`` checked: integer ids of the
    labels' ``shape`` (concrete ones representable in the dtype JAX holds
    them in), and a static padding id that dtype can hold."""
    name = "segment_padding_id"
    padding_id = _options.optional(_options.static_int, padding_id, name)
    if segment_ids is None:
        if padding_id is not None:
            raise ValueError("segment_padding_id needs segment_ids.")
        return None, None
    given = segment_ids
    segment_ids = _checks.as_array(segment_ids, "segment_ids")
    _checks.check_integer(segment_ids, "segment_ids")
    _check_held(given, segment_ids.dtype)
    _checks.check_shape(segment_ids, shape, "segment_ids", " (the labels' shape)")
    info = np.iinfo(segment_ids.dtype)
    if padding_id is not None and not info.min <= padding_id <= info.max:
        raise ValueError(
            f"segment_padding_id={padding_id} cannot occur in segment_ids of "
            f"dtype {segment_ids.dtype}."
        )
    return segment_ids, padding_id


def _check_held(given: Any, dtype) -> None:
    """Raises if concrete ids do not fit the dtype JAX holds them in (with
    x64 off, int64 ids become int32: 0 and 2**32 would merge silently)."""
    if isinstance(given, jax.core.Tracer) or isinstance(given, jax.Array):
        return
    values = np.asarray(given)
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        return
    info = np.iinfo(dtype)
    outside = (values < info.min) | (values > info.max)
    if outside.any():
        position = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(
            f"segment_ids{list(position)} = {values[position]} does not fit "
            f"{np.dtype(dtype).name}, the dtype JAX holds the ids in (with "
            "jax_enable_x64 off, 64-bit ids become 32-bit and would wrap into "
            "other ids): renumber the segments, or enable x64."
        )


def padding(
    segment_ids: jax.Array, ignore_index: int | None, padding_id: int | None = None
) -> jax.Array:
    """Where ``segment_ids`` marks padding: a negative id, ``ignore_index``, or
    ``padding_id`` (``segment_padding_id``: 0 for t5x's and MaxText's)."""
    pad = (
        segment_ids < 0
        if jnp.issubdtype(segment_ids.dtype, jnp.signedinteger)
        else (jnp.zeros(segment_ids.shape, bool))
    )
    info = np.iinfo(segment_ids.dtype)
    if ignore_index is not None and info.min <= ignore_index <= info.max:
        pad = pad | (segment_ids == jnp.asarray(ignore_index, segment_ids.dtype))
    if padding_id is not None:  # (validate: the dtype holds it)
        pad = pad | (segment_ids == jnp.asarray(padding_id, segment_ids.dtype))
    return pad


def kept(
    segment_ids: jax.Array, ignore_index: int | None, shift: int, padding_id=None
) -> jax.Array:
    """Where the segments let a position be scored: not padding, and with
    ``shift`` its target in its own segment."""
    keep = ~padding(segment_ids, ignore_index, padding_id)
    if shift:
        keep = keep & same_segment_ahead(segment_ids, shift)
    return keep


def same_segment_ahead(segment_ids: jax.Array, shift: int) -> jax.Array:
    """Whether position ``t + shift`` lies in the segment of position ``t``
    (False where ``t + shift`` is past the end): a packed sequence's last
    token does not predict the next sequence's first."""
    # Length-preserving (rotations, a mask of positions), so that a symbolic
    # length (jax.export) is never compared with the shift.
    axis = segment_ids.ndim - 1
    position = jax.lax.broadcasted_iota(jnp.int32, segment_ids.shape, axis)
    same = position + shift < segment_ids.shape[-1]
    for i in range(1, shift + 1):  # the target and every position in between
        ahead = jnp.concatenate([segment_ids[..., i:], segment_ids[..., :i]], axis)
        same = same & (ahead == segment_ids)
    return same


def segments(segment_ids: jax.Array | None, shape: tuple) -> Segments:
    """The dense segment index of every position of a ``shape`` batch."""
    if not shape:
        return Segments(jnp.zeros((), jnp.int32), 1)
    length = shape[-1]
    rows = jnp.zeros(shape, jnp.int32)
    for axis in range(len(shape) - 1):
        rows = rows * shape[axis] + jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    if segment_ids is None:
        return Segments(rows, math.prod(shape[:-1]))
    starts = jnp.concatenate(
        [
            jnp.ones(shape[:-1] + (1,), bool),
            segment_ids[..., 1:] != segment_ids[..., :-1],
        ],
        axis=-1,
    )
    run = jnp.cumsum(starts, axis=-1, dtype=jnp.int32) - 1
    return Segments(rows * length + run, jnp.size(segment_ids))


def mean_weights(scored, label_weight, segs: Segments, dtype):
    """Per-example weights ``1 / D_s`` of the cross-entropy (``D_s`` the sum
    of the scored examples' label weights in their segment, their count
    without weights) and ``1 / N_s`` of the z-loss (``N_s`` the count), 0 on
    unscored examples, and the number of segments with a scored example.
    The weights are in ``dtype``, the losses' (float64 under x64: 1/3 in
    float32 was off by 3e-8)."""
    index = segs.index.reshape(-1)

    def segment_totals(values):
        values = jnp.where(scored, values, 0).reshape(-1)
        return jax.ops.segment_sum(values, index, num_segments=segs.size)

    def inverse(totals):
        d = totals[index].reshape(scored.shape)
        return jnp.where(scored & (d != 0), 1 / jnp.where(d == 0, 1, d), 0)

    counts = segment_totals(jnp.ones(scored.shape, dtype))
    dens = counts if label_weight is None else segment_totals(label_weight)
    return inverse(dens), inverse(counts), jnp.sum(counts > 0)
