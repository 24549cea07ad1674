"""The class axis held here: shard-local class arithmetic and the collectives
that complete per-example statistics across the devices that split it.

Under ``shard_map`` with ``axis_name`` (vocabulary parallelism) each device
holds an equal, contiguous slice of the classes, in ``axis_index`` order: the
global class ``k * C_local + c`` is local class ``c`` on device ``k``. Without
``axis_name`` every method is the plain single-device operation, so the
kernels read as plain math.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from xent_jax import _sharding


@dataclasses.dataclass(frozen=True)
class ClassAxis:
    """The mesh axes (``None``: none) over which the classes are split."""

    axis_name: Any = None

    def num_shards(self) -> int:
        if self.axis_name is None:
            return 1
        return jax.lax.psum(1, self.axis_name)

    def sum(self, v: Any) -> Any:
        """``v`` (per-example statistics) summed over the class shards."""
        return v if self.axis_name is None else jax.lax.psum(v, self.axis_name)

    def max(self, v: jax.Array) -> jax.Array:
        return v if self.axis_name is None else jax.lax.pmax(v, self.axis_name)

    def min(self, v: jax.Array) -> jax.Array:
        return v if self.axis_name is None else jax.lax.pmin(v, self.axis_name)

    def argmax(self, value: jax.Array, index: jax.Array) -> jax.Array:
        """The global argmax from each shard's ``(value, index)`` of its
        largest logit: the smallest index among the shards holding the
        largest value, a NaN (as ``jnp.argmax``, which takes the first NaN)
        beating every number."""
        if self.axis_name is None:
            return index
        nan = jnp.isnan(value)
        any_nan = self.max(nan.astype(jnp.int32)) > 0
        best = self.max(jnp.where(nan, -jnp.inf, value))
        candidate = jnp.where(any_nan, nan, value == best)
        return self.min(jnp.where(candidate, index, jnp.iinfo(jnp.int32).max))

    def row_sum(self, v: jax.Array) -> jax.Array:
        return self.sum(jnp.sum(v, axis=-1))

    def row_max(self, v: jax.Array) -> jax.Array:
        return self.max(jnp.max(v, axis=-1))

    def offset(self, num_local: int) -> Any:
        """Global id of the first class held here."""
        if self.axis_name is None:
            return 0
        return jax.lax.axis_index(self.axis_name) * num_local

    def ids(self, num_local: int) -> jax.Array:
        """Global ids ``[C_local]`` of the classes held here."""
        return jax.lax.iota(jnp.int32, num_local) + self.offset(num_local)

    def owned(self, ids: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
        """``(index, owned)``: each global id's index into the classes held
        here (clipped into range) and whether they hold it at all."""
        local = ids - self.offset(num_local)
        owned = (local >= 0) & (local < num_local)
        return jnp.clip(local, 0, num_local - 1), owned

    def take(self, values: jax.Array, ids: jax.Array) -> jax.Array:
        """``values[id]`` per example, for per-class ``values`` ``[C_local]``
        or per-example rows ``[..., C_local]`` (the logits).

        A gather from the slice that owns the id, 0 on the others, combined by
        a ``psum`` of per-example scalars. Where the class axis is split in
        ``values``' type (Explicit mesh axes) a masked reduction replaces the
        gather, which could not be typed without moving ``values``; only
        there, since on one device the gather reads one element per row.
        """
        num_local = values.shape[-1]
        if _sharding.class_axis_in_type(values):
            hit = self.ids(num_local) == ids[..., None]
            picked = jnp.sum(jnp.where(hit, values, 0), axis=-1)
        else:
            index, owned = self.owned(ids, num_local)
            if values.ndim == 1:
                picked = values[index]
            else:
                picked = jnp.take_along_axis(values, index[..., None], axis=-1)
                picked = picked[..., 0]
            picked = jnp.where(owned, picked, 0)
        return self.sum(picked)

    def scatter_add(self, num_local: int, ids: jax.Array, updates: jax.Array):
        """``[C_local]`` with ``updates`` (per example) added at the ids this
        device owns (the transpose of :meth:`take` for per-class values)."""
        index, owned = self.owned(ids, num_local)
        zeros = jnp.zeros((num_local,), updates.dtype)
        return zeros.at[index.reshape(-1)].add(jnp.where(owned, updates, 0).reshape(-1))
