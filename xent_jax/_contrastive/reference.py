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


def _kept(valid, axis_name):
    """``(this device's pairs, every pair)`` kept by ``where``; ``None``
    without it."""
    if valid is None:
        return None, None
    if axis_name is None:
        return valid, valid
    return valid, jax.lax.all_gather(valid, axis_name, tiled=True)


def _drop(s, rows, cols, fill):
    """``s`` without the pairs ``where`` drops: ``fill`` (``-inf``, out of a
    log-sum-exp) where a kept row meets a dropped column, 0 on dropped rows
    (finite, their loss is zeroed after)."""
    if rows is None:
        return s
    return jnp.where(rows[:, None], jnp.where(cols[None, :], s, fill), 0)


@_registry.register("clip", "reference")
def clip(a, b, scale, valid, block_size: int | None, axis_name: Any):
    del block_size
    s_rows, s_cols, offset = _similarities(a, b, scale, axis_name)
    own = _own(s_rows, offset)
    mine, every = _kept(valid, axis_name)
    by_row = jax.nn.logsumexp(_drop(s_rows, mine, every, -jnp.inf), axis=1) - own
    s_cols = _drop(s_cols.T, mine, every, -jnp.inf).T
    by_col = jax.nn.logsumexp(s_cols, axis=0) - own
    return 0.5 * (by_row + by_col)


@_registry.register("siglip", "reference")
def siglip(a, b, scale, bias, valid, block_size: int | None, axis_name: Any):
    del block_size
    s_rows, _, offset = _similarities(a, b, scale, axis_name)
    s_rows = s_rows + bias.astype(s_rows.dtype)
    n = s_rows.shape[0]
    is_pair = (offset + jnp.arange(n))[:, None] == jnp.arange(s_rows.shape[1])
    signs = jnp.where(is_pair, 1.0, -1.0).astype(s_rows.dtype)
    mine, every = _kept(valid, axis_name)
    terms = _drop(-jax.nn.log_sigmoid(signs * s_rows), mine, every, 0)
    return jnp.sum(terms, axis=1)
