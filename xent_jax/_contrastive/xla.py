r"""Contrastive losses in row blocks: the ``[N, N]`` similarity matrix never exists.

Each step multiplies a block of ``r`` rows of ``a`` with the ``m`` columns of
``b`` it is paired against (a float32 tile of at most ``TILE_BYTES``), folds
the tile into per-row and per-column statistics, and drops it; the backward
pass recomputes the tiles. Memory is the tile plus ``O(N)`` statistics and the
float32 ``db`` accumulator: linear in ``N``, where materialising is
quadratic.

Across devices (``axis_name``, the pairs split over the mesh axis) the columns
travel around a ring with ``ppermute``: at hop ``h`` each device pairs its own
rows with the block of the device ``h`` places before it. What belongs to a
column (its running log-sum-exp in the forward pass; its cotangent, its
log-sum-exp and its ``db`` accumulator in the backward pass) travels with it,
and one last hop brings it home. Only ``O(N D)`` bytes move per device, never
an ``[N, N]`` block, and no device holds more than two column blocks.

The last row block may overlap the one before it (``start = min(k r, n - r)``
keeps every slice in bounds without padding ``a``); rows an earlier block
already covered are masked out of every sum (``Tile.fresh``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _compat, _numerics, _registry, _sharding, _stats
from xent_jax._linear.blocks import dot

# A float32 tile of rows x columns; the step keeps a few alive (the product,
# its exponentials, the logits' gradient).
TILE_BYTES = 1 << 24


def row_block(n_rows: int, n_cols: int, block_size: int | None) -> int:
    """Rows per step: ``block_size``, or as many as fit ``TILE_BYTES`` (a
    multiple of 8, at least 8), never more than the rows there are."""
    if block_size is None:
        if not (_compat.is_static(n_rows) and _compat.is_static(n_cols)):
            block_size = 128  # a symbolic batch (jax.export): a fixed block
        else:
            fit = TILE_BYTES // (4 * max(n_cols, 1))
            block_size = max(8, fit - fit % 8)
    return n_rows if _compat.is_static(n_rows) and block_size >= n_rows else block_size


class Tile(NamedTuple):
    """One row block against the columns it meets."""

    start: jax.Array  # index of its first row
    fresh: jax.Array  # [r] rows no earlier block covered
    a_rows: jax.Array  # [r, D]
    raw: jax.Array  # [r, m] a_rows . b, in the compute dtype

    def diagonal(self) -> jax.Array:
        """``[r, m]``: where the row's own pair is (on the home block)."""
        r, m = self.raw.shape
        return (self.start + jnp.arange(r))[:, None] == jnp.arange(m)[None, :]


def _tile(a, b, k, r: int, cdt) -> Tile:
    start = jnp.minimum(k * r, a.shape[0] - r)
    a_rows = jax.lax.dynamic_slice_in_dim(a, start, r)
    raw = dot(a_rows, b.astype(a_rows.dtype), ((1,), (1,)), cdt)
    fresh = start + jnp.arange(r) >= k * r
    return Tile(start, fresh, a_rows, raw)


def _row_blocks(n: int, r: int) -> int:
    return -(-n // r)


def _rows(v: jax.Array, t: Tile) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(v, t.start, t.raw.shape[0])


def _put_rows(v: jax.Array, rows: jax.Array, t: Tile) -> jax.Array:
    """``v`` with the tile's fresh rows replaced by ``rows``."""
    rows = jnp.where(t.fresh.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, _rows(v, t))
    return jax.lax.dynamic_update_slice_in_dim(v, rows, t.start, 0)


def _kept(t: Tile, valid, valid_cols):
    """``[r, m]``: the pairs of the tile both of whose sides are kept
    (``where``), or ``None`` without a mask."""
    if valid is None:
        return None
    return _rows(valid, t)[:, None] & valid_cols[None, :]


def _masked(x, kept, fill):
    return x if kept is None else jnp.where(kept, x, fill)


def _for_tiles(a, b, r: int, cdt, step, carry):
    """``step(tile, carry)`` over the row blocks of ``a`` against ``b``."""

    def body(k, carry):
        return step(_tile(a, b, k, r, cdt), carry)

    return jax.lax.fori_loop(0, _row_blocks(a.shape[0], r), body, carry)


def _ring(axis_name, home, visit, carry, moving, back):
    """Runs ``home(carry, moving)`` on this device's own block, then passes
    ``moving`` (a pytree of per-column arrays) one device along the ring and
    runs ``visit`` on what arrives, once per other device; a last hop brings
    ``back(moving)`` (what the columns' owners need) home. Without
    ``axis_name``: ``home`` alone."""
    carry, moving = home(carry, moving)
    if axis_name is None:
        return carry, back(moving)
    size = jax.lax.axis_size(axis_name)
    perm = [(i, (i + 1) % size) for i in range(size)]

    def hop(moving):
        return jax.tree.map(lambda v: jax.lax.ppermute(v, axis_name, perm), moving)

    def body(_, state):
        return visit(state[0], hop(state[1]))

    carry, moving = jax.lax.fori_loop(1, size, body, (carry, moving))
    return carry, hop(back(moving))


# --------------------------------------------------------------------- CLIP


class ClipStats(NamedTuple):
    """Log-sum-exps in shifted form (``lse = shift_of(row_max) + log(sum)``)."""

    rows: _stats.Online  # per row of a, over every column
    cols: _stats.Online  # per column of b, over every row


def _lse_minus(st: _stats.Online, v: jax.Array) -> jax.Array:
    """``lse - v`` in shifted coordinates."""
    return (_stats.shift_of(st.row_max) - v) + _stats.log_of_sum(st.sum_exp)


def _clip_forward_step(scale, valid, valid_cols, home: bool):
    def step(t: Tile, carry):
        rows, cols, own = carry
        s_pair = scale * t.raw
        s = _masked(s_pair, _kept(t, valid, valid_cols), -jnp.inf)
        old = _stats.Online(*(_rows(v, t) for v in rows))
        new = _stats.online_update(
            old, jnp.max(s, axis=1), lambda sh: jnp.sum(jnp.exp(s - sh[:, None]), 1)
        )
        rows = _stats.Online(
            *(_put_rows(v, n, t) for v, n in zip(rows, new, strict=True))
        )
        sf = jnp.where(t.fresh[:, None], s, -jnp.inf)
        cols = _stats.online_update(
            cols, jnp.max(sf, axis=0), lambda sh: jnp.sum(jnp.exp(sf - sh), 0)
        )
        if home:
            own = _put_rows(own, jnp.sum(jnp.where(t.diagonal(), s_pair, 0), 1), t)
        return rows, cols, own

    return step


def _clip_statistics(a, b, scale, valid, r, axis_name, cdt):
    n, m = a.shape[0], b.shape[0]
    scale = scale.astype(cdt)

    def run(home):
        def go(carry, moving):
            bv, valid_cols, cols = moving
            step = _clip_forward_step(scale, valid, valid_cols, home)
            rows, cols, own = _for_tiles(
                a, bv, r, cdt, step, (carry[0], cols, carry[1])
            )
            return (rows, own), (bv, valid_cols, cols)

        return go

    rows = _sharding.varying_like(_stats.online_init((n,), cdt), a, b)
    cols = _sharding.varying_like(_stats.online_init((m,), cdt), a, b)
    own = _sharding.zeros((n,), cdt, a, b)
    (rows, own), cols = _ring(
        axis_name, run(True), run(False), (rows, own), (b, valid, cols), lambda m: m[2]
    )
    return ClipStats(rows, cols), own


def _clip_loss(st: ClipStats, own):
    return 0.5 * (_lse_minus(st.rows, own) + _lse_minus(st.cols, own))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def clip_xla(a, b, scale, valid, block_size, axis_name):
    return _clip_fwd(a, b, scale, valid, block_size, axis_name)[0]


def _clip_fwd(a, b, scale, valid, block_size, axis_name):
    cdt = _numerics.compute_dtype(a.dtype)
    r = row_block(a.shape[0], b.shape[0], block_size)
    st, own = _clip_statistics(a, b, scale, valid, r, axis_name, cdt)
    return _clip_loss(st, own), (a, b, scale, valid, st)


def _softmax_of(s, st: _stats.Online, axis: int):
    """``exp(s - lse)`` along ``axis`` from the shifted statistics."""
    shift, log_se = _stats.shift_of(st.row_max), _stats.log_of_sum(st.sum_exp)
    return jnp.exp((s - jnp.expand_dims(shift, axis)) - jnp.expand_dims(log_se, axis))


def _clip_backward_step(scale, g, rows: _stats.Online, valid, home: bool, cdt):
    def step(t: Tile, carry):
        da, dscale, (bv, valid_cols, g_cols, cols, db) = carry
        kept = _kept(t, valid, valid_cols)
        s = _masked(scale * t.raw, kept, -jnp.inf)
        g_rows = _rows(g, t)
        row_st = _stats.Online(*(_rows(v, t) for v in rows))
        ds = 0.5 * (
            g_rows[:, None] * _softmax_of(s, row_st, 1)
            + g_cols[None, :] * _softmax_of(s, cols, 0)
        )
        if home:
            ds = ds - jnp.where(t.diagonal(), g_rows[:, None], 0)
        ds = _masked(jnp.where(t.fresh[:, None], ds, 0), kept, 0)
        da, db, dscale = _accumulate(da, db, dscale, t, bv, ds, cdt)
        return da, dscale, (bv, valid_cols, g_cols, cols, db)

    return step


def _accumulate(da, db, dscale, t: Tile, bv, ds, cdt):
    """A tile's share of ``da / scale`` (its rows), ``db / scale`` and
    ``dscale`` from the logits' gradient ``ds`` (products in the inputs'
    dtype, ``cdt`` accumulation). The scale multiplies ``da`` and ``db`` once,
    at the end, not every block's ``[N, D]`` product."""
    dso = ds.astype(t.a_rows.dtype)
    da_rows = _rows(da, t) + dot(dso, bv.astype(dso.dtype), ((1,), (0,)), cdt)
    da = jax.lax.dynamic_update_slice_in_dim(da, da_rows, t.start, 0)
    db = db + dot(dso, t.a_rows, ((0,), (0,)), cdt)
    return da, db, dscale + jnp.sum(ds * t.raw)


def _clip_bwd(block_size, axis_name, res, g):
    a, b, scale, valid, st = res
    cdt = _numerics.compute_dtype(a.dtype)
    r = row_block(a.shape[0], b.shape[0], block_size)
    g = _numerics.materialised(g, jnp.zeros(a.shape[:1], cdt))
    sc = scale.astype(cdt)

    def run(home):
        def go(carry, moving):
            da, dscale = carry
            step = _clip_backward_step(sc, g, st.rows, valid, home, cdt)
            da, dscale, moving = _for_tiles(
                a, moving[0], r, cdt, step, (da, dscale, moving)
            )
            return (da, dscale), moving

        return go

    da = _sharding.zeros(a.shape, cdt, a, b)
    db = _sharding.zeros(b.shape, cdt, a, b)
    dscale = _sharding.zeros((), cdt, a, b)
    moving = (b, valid, g, st.cols, db)
    (da, dscale), db = _ring(
        axis_name, run(True), run(False), (da, dscale), moving, lambda m: m[4]
    )
    return (
        _sharding.cotangent(sc * da, a),
        _sharding.cotangent(sc * db, b),
        _sharding.cotangent(dscale, scale),
        None,
    )


clip_xla.defvjp(_clip_fwd, _clip_bwd)


@_registry.register("clip", "xla")
def clip(a, b, scale, valid, block_size: int | None, axis_name: Any):
    return clip_xla(a, b, scale, valid, block_size, axis_name)


# ------------------------------------------------------------------- SigLIP


def _siglip_logits(t: Tile, scale, bias):
    return scale * t.raw + bias


def _siglip_forward_step(scale, bias, valid, valid_cols, home: bool):
    def step(t: Tile, loss):
        s = _siglip_logits(t, scale, bias)
        terms = jax.nn.softplus(s)  # -log sigmoid(-s): a pair that is not
        if home:
            terms = jnp.where(t.diagonal(), jax.nn.softplus(-s), terms)
        terms = _masked(terms, _kept(t, valid, valid_cols), 0)
        return _put_rows(loss, _rows(loss, t) + jnp.sum(terms, axis=1), t)

    return step


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def siglip_xla(a, b, scale, bias, valid, block_size, axis_name):
    return _siglip_fwd(a, b, scale, bias, valid, block_size, axis_name)[0]


def _siglip_fwd(a, b, scale, bias, valid, block_size, axis_name):
    cdt = _numerics.compute_dtype(a.dtype)
    r = row_block(a.shape[0], b.shape[0], block_size)
    sc, bi = scale.astype(cdt), bias.astype(cdt)

    def run(home):
        def go(loss, moving):
            step = _siglip_forward_step(sc, bi, valid, moving[1], home)
            return _for_tiles(a, moving[0], r, cdt, step, loss), moving

        return go

    loss = _sharding.zeros(a.shape[:1], cdt, a, b)
    loss, _ = _ring(axis_name, run(True), run(False), loss, (b, valid), lambda m: ())
    return loss, (a, b, scale, bias, valid)


def _siglip_backward_step(scale, bias, g, valid, home: bool, cdt):
    def step(t: Tile, carry):
        da, dscale, dbias, (bv, valid_cols, db) = carry
        s = _siglip_logits(t, scale, bias)
        # d/ds softplus(s) = sigmoid(s); d/ds softplus(-s) = -sigmoid(-s).
        p = jax.nn.sigmoid(s)
        if home:
            p = jnp.where(t.diagonal(), -jax.nn.sigmoid(-s), p)
        ds = jnp.where(t.fresh[:, None], _rows(g, t)[:, None] * p, 0)
        ds = _masked(ds, _kept(t, valid, valid_cols), 0)
        da, db, dscale = _accumulate(da, db, dscale, t, bv, ds, cdt)
        return da, dscale, dbias + jnp.sum(ds), (bv, valid_cols, db)

    return step


def _siglip_bwd(block_size, axis_name, res, g):
    a, b, scale, bias, valid = res
    cdt = _numerics.compute_dtype(a.dtype)
    r = row_block(a.shape[0], b.shape[0], block_size)
    g = _numerics.materialised(g, jnp.zeros(a.shape[:1], cdt))
    sc, bi = scale.astype(cdt), bias.astype(cdt)

    def run(home):
        def go(carry, moving):
            step = _siglip_backward_step(sc, bi, g, valid, home, cdt)
            *carry, moving = _for_tiles(a, moving[0], r, cdt, step, (*carry, moving))
            return tuple(carry), moving

        return go

    def zeros(shape):
        return _sharding.zeros(shape, cdt, a, b)

    carry = (zeros(a.shape), zeros(()), zeros(()))
    moving = (b, valid, zeros(b.shape))
    (da, dscale, dbias), db = _ring(
        axis_name, run(True), run(False), carry, moving, lambda m: m[2]
    )
    cts = (sc * da, sc * db, dscale, dbias)
    primals = (a, b, scale, bias)
    out = (_sharding.cotangent(c, p) for c, p in zip(cts, primals, strict=True))
    return (*out, None)


siglip_xla.defvjp(_siglip_fwd, _siglip_bwd)


@_registry.register("siglip", "xla")
def siglip(a, b, scale, bias, valid, block_size: int | None, axis_name: Any):
    return siglip_xla(a, b, scale, bias, valid, block_size, axis_name)
