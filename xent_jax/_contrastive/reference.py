"""The contrastive losses on the materialised ``[N, N]`` similarity matrix,
under plain autodiff: the oracle the blockwise kernels are tested against."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _registry


def _similarities(a, b, scale, axis_name):
    """``scale * a_i . b_j`` of this device's rows against every column, and of
    every row against this device's columns, with the offset of its own pairs
    (the pairs are split over ``axis_name``, the same way for ``a`` and
    ``b``)."""
    cdt = _numerics.compute_dtype(a.dtype)
    a, b, scale = a.astype(cdt), b.astype(cdt), scale.astype(cdt)
    if axis_name is None:
        s = scale * (a @ b.T)
        return s, s, 0
    a_all = jax.lax.all_gather(a, axis_name, tiled=True)
    b_all = jax.lax.all_gather(b, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * a.shape[0]
    return scale * (a @ b_all.T), scale * (a_all @ b.T), offset


def _own(s_rows, offset):
    n = s_rows.shape[0]
    return s_rows[jnp.arange(n), offset + jnp.arange(n)]


@_registry.register("clip", "reference")
def clip(a, b, scale, block_size: int | None, axis_name: Any):
    del block_size
    s_rows, s_cols, offset = _similarities(a, b, scale, axis_name)
    own = _own(s_rows, offset)
    by_row = jax.nn.logsumexp(s_rows, axis=1) - own
    by_col = jax.nn.logsumexp(s_cols, axis=0) - own
    return 0.5 * (by_row + by_col)


@_registry.register("siglip", "reference")
def siglip(a, b, scale, bias, block_size: int | None, axis_name: Any):
    del block_size
    s_rows, _, offset = _similarities(a, b, scale, axis_name)
    s_rows = s_rows + bias.astype(s_rows.dtype)
    n = s_rows.shape[0]
    is_pair = (offset + jnp.arange(n))[:, None] == jnp.arange(s_rows.shape[1])
    signs = jnp.where(is_pair, 1.0, -1.0).astype(s_rows.dtype)
    return -jnp.sum(jax.nn.log_sigmoid(signs * s_rows), axis=1)
