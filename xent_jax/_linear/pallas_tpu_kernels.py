"""The Pallas TPU (Mosaic) kernels of ``pallas_tpu`` and their ``pallas_call``s.

Imported when a kernel is first traced, so that ``import xent_jax`` does not
load Pallas (about 0.6 s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from xent_jax._linear import blocks, tiles
from xent_jax._linear import pallas_common as common

# --- pallas_call plumbing -----------------------------------------------------


def _block_specs(spec: common.Spec, rows: dict, cols: dict, vocab_major: bool):
    """Input BlockSpecs of ``(x, w, rows, cols)`` for a grid ``(i, j)``
    (token, vocabulary tile) or, if ``vocab_major``, ``(j, i)``."""

    def ij(a, b):
        return (b, a) if vocab_major else (a, b)

    tn, tv, d = spec.tn, spec.tv, spec.d
    x = pl.BlockSpec((tn, d), lambda a, b: (ij(a, b)[0], 0))
    if spec.rows:
        w = pl.BlockSpec((tv, d), lambda a, b: (ij(a, b)[1], 0))
    else:
        w = pl.BlockSpec((d, tv), lambda a, b: (0, ij(a, b)[1]))
    row = pl.BlockSpec((tn, 1), lambda a, b: (ij(a, b)[0], 0))
    col = pl.BlockSpec((1, tv), lambda a, b: (0, ij(a, b)[1]))
    return x, w, {k: row for k in rows}, {k: col for k in cols}


def _params(semantics):
    return pltpu.CompilerParams(
        dimension_semantics=semantics, vmem_limit_bytes=tiles.TPU_VMEM_LIMIT
    )


def _grid(spec: common.Spec, vocab_major: bool = False):
    grid = (pl.cdiv(spec.n, spec.tn), pl.cdiv(spec.v, spec.tv))
    return grid[::-1] if vocab_major else grid


def forward_call(x, w, rows, cols, *, spec, names, interpret):
    row = pl.BlockSpec((spec.tn, 1), lambda i, j: (i, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec),
        out_shape={k: common.out_struct((spec.n, 1), spec.cdt, x) for k in names},
        grid=_grid(spec),
        in_specs=_block_specs(spec, rows, cols, False),
        out_specs={k: row for k in names},
        scratch_shapes=[pltpu.VMEM((1, 1), spec.cdt)] if "u" in cols else [],
        compiler_params=_params(("parallel", "arbitrary")),
        cost_estimate=common.cost(
            spec,
            x,
            w,
            products=1,
            x_reads=1,
            w_reads=_grid(spec)[0],
            written=len(names) * spec.n * 4,
        ),
        interpret=interpret,
        name="xent_linear_forward",
    )(x, w, rows, cols)


def dx_call(x, w, rows, cols, *, spec, interpret):
    return pl.pallas_call(
        functools.partial(_dx_kernel, spec=spec),
        out_shape=common.out_struct((spec.n, spec.d), spec.cdt, x),
        grid=_grid(spec),
        in_specs=_block_specs(spec, rows, cols, False),
        out_specs=pl.BlockSpec((spec.tn, spec.d), lambda i, j: (i, 0)),
        compiler_params=_params(("parallel", "arbitrary")),
        cost_estimate=common.cost(
            spec,
            x,
            w,
            products=2,
            x_reads=1,
            w_reads=_grid(spec)[0],
            written=spec.n * spec.d * 4,
        ),
        interpret=interpret,
        name="xent_linear_dx",
    )(x, w, rows, cols)


def dw_call(x, w, rows, cols, *, spec, names, w_dtype, interpret):
    tv, d = spec.tv, spec.d
    col = pl.BlockSpec((1, tv), lambda j, i: (0, j))
    shapes = {"db": (1, spec.v), "dcw": (1, spec.v)}
    specs = {"db": col, "dcw": col}
    if spec.rows:
        shapes["dw"] = (spec.v, d)
        specs["dw"] = pl.BlockSpec((tv, d), lambda j, i: (j, 0))
    else:
        shapes["dw"] = (d, spec.v)
        specs["dw"] = pl.BlockSpec((d, tv), lambda j, i: (0, j))
    dtypes = {"db": spec.cdt, "dcw": spec.cdt, "dw": w_dtype}
    scratch = []
    if "dw" in names:
        scratch = [pltpu.VMEM((tv, d) if spec.rows else (d, tv), spec.cdt)]
    return pl.pallas_call(
        functools.partial(_dw_kernel, spec=spec),
        out_shape={k: common.out_struct(shapes[k], dtypes[k], x) for k in names},
        grid=_grid(spec, vocab_major=True),
        in_specs=_block_specs(spec, rows, cols, True),
        out_specs={k: specs[k] for k in names},
        scratch_shapes=scratch,
        compiler_params=_params(("parallel", "arbitrary")),
        cost_estimate=common.cost(
            spec,
            x,
            w,
            products=2,
            x_reads=_grid(spec, True)[0],
            w_reads=1,
            written=spec.d * spec.v * jnp.dtype(w_dtype).itemsize,
        ),
        interpret=interpret,
        name="xent_linear_dw",
    )(x, w, rows, cols)


# --- the kernels --------------------------------------------------------------


def _ids(start, size: int, axis: int):
    """Global row (``axis=0``: ``[size, 1]``) or column (``[1, size]``) ids."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _logits(x_ref, w_ref, colv: dict, col, spec):
    """``(z, zm)``: a tile's capped logits and the same masked to ``-inf``
    where the column is padding or past ``v``."""
    raw = common.raw_logits(x_ref[...], w_ref[...], spec)
    z = blocks.capped(raw, colv.get("bias"), spec.opts)
    ok = common.column_mask(col, colv, spec, spec.ragged_cols)
    return z, (z if ok is None else jnp.where(ok, z, -jnp.inf))


def _smoothing(colv: dict, col, spec):
    u = colv.get("u")
    if u is None or not spec.ragged_cols:
        return u
    return jnp.where(col < spec.v, u, 0)


def _forward_kernel(x_ref, w_ref, rows, cols, out, *scratch, spec):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for k, value in common.init_stats(out, (spec.tn, 1), spec.cdt).items():
            out[k][...] = value
        for ref in scratch:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    colv = {k: r[...] for k, r in cols.items()}
    col = _ids(j * spec.tv, spec.tv, 1)
    _, zm = _logits(x_ref, w_ref, colv, col, spec)
    u = _smoothing(colv, col, spec)
    st = {k: r[...] for k, r in out.items()}
    hit = col == rows["label"][...]
    u_seen = scratch[0][...] if scratch else None
    new = common.online_tile(st, zm, col.astype(spec.cdt), hit, u, u_seen)
    for k, value in new.items():
        out[k][...] = value
    if scratch:
        scratch[0][...] += jnp.sum(u, axis=1, keepdims=True)


def _tile(x_ref, w_ref, rows, cols, i, j, spec):
    """A tile's ``(dz, zs, ok, keep)``: the logits gradient (0 outside the
    arrays), shifted logits, where rows and columns are valid and real, and
    whether the filter keeps the tile."""
    colv = {k: r[...] for k, r in cols.items()}
    rowv = {k: r[...] for k, r in rows.items()}
    col, row = _ids(j * spec.tv, spec.tv, 1), _ids(i * spec.tn, spec.tn, 0)
    z, zm = _logits(x_ref, w_ref, colv, col, spec)
    hit = col == rowv["label"]
    u = _smoothing(colv, col, spec)
    dz, zs, p = common.gradient_tile(z, zm, rowv, hit, u, spec.opts)
    inside = common.both(
        row < spec.n if spec.ragged_rows else None,
        col < spec.v if spec.ragged_cols else None,
    )
    if inside is not None:
        dz = jnp.where(inside, dz, 0)
    ok = common.both(inside, common.column_mask(col, colv, spec, False))
    return dz, zs, ok, common.keep_tile(p, inside, spec)


def _when(keep, fn):
    if keep is None:
        fn()
    else:
        pl.when(keep)(fn)


def _dx_kernel(x_ref, w_ref, rows, cols, dx_ref, *, spec):
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dx_ref[...] = jnp.zeros(dx_ref.shape, dx_ref.dtype)

    dz, _, _, keep = _tile(x_ref, w_ref, rows, cols, i, j, spec)

    def add():
        wb = w_ref[...]
        if spec.ragged_cols:  # w's columns past v are undefined: 0 * NaN
            col = _ids(j * spec.tv, spec.tv, 0 if spec.rows else 1)
            wb = jnp.where(col < spec.v, wb, 0)
        dx_ref[...] += common.dx_part(dz, wb, spec)

    _when(keep, add)


def _dw_kernel(x_ref, w_ref, rows, cols, out, *scratch, spec):
    j, i = pl.program_id(0), pl.program_id(1)
    acc = scratch[0] if scratch else None

    @pl.when(i == 0)
    def _init():
        for ref in [acc] + [out[k] for k in ("db", "dcw") if k in out]:
            if ref is not None:
                ref[...] = jnp.zeros(ref.shape, ref.dtype)

    dz, zs, ok, keep = _tile(x_ref, w_ref, rows, cols, i, j, spec)
    if "dcw" in out:  # label smoothing: never filtered
        rowv = {k: r[...] for k, r in rows.items()}
        out["dcw"][...] += common.smoothing_column_sums(zs, rowv, ok)

    def add():
        if acc is not None:
            xb = x_ref[...]
            if spec.ragged_rows:  # x's rows past n are undefined
                xb = jnp.where(_ids(i * spec.tn, spec.tn, 0) < spec.n, xb, 0)
            acc[...] += common.dw_part(xb, dz, rows["scored"][...], spec)
        if "db" in out:
            out["db"][...] += jnp.sum(dz, axis=0, keepdims=True)

    _when(keep, add)
    if acc is not None:

        @pl.when(i == pl.num_programs(1) - 1)
        def _store():
            out["dw"][...] = acc[...].astype(out["dw"].dtype)
