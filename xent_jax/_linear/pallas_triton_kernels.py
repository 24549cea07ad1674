"""The Pallas Triton kernels of ``pallas_triton`` and their ``pallas_call``s.

Imported when a kernel is first traced, so that ``import xent_jax`` does not
load Pallas (about 0.6 s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xent_jax._linear import blocks, tiles
from xent_jax._linear import pallas_common as common

# --- pallas_call plumbing -----------------------------------------------------


def _params():
    t = tiles.TILES["triton"]
    return plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def forward_call(x, w, rows, cols, *, spec, names, per_split, interpret):
    token_tiles = pl.cdiv(spec.n, spec.tn)
    shape = (spec.splits * token_tiles * spec.tn, 1)
    kernel = functools.partial(_forward_kernel, spec=spec, per_split=per_split)
    return pl.pallas_call(
        kernel,
        out_shape={k: common.out_struct(shape, spec.cdt, x) for k in names},
        grid=(token_tiles, spec.splits),
        compiler_params=_params(),
        cost_estimate=common.cost(
            spec,
            x,
            w,
            products=1,
            x_reads=spec.splits,
            w_reads=token_tiles,
            written=len(names) * shape[0] * 4,
        ),
        interpret=interpret,
        name="xent_linear_forward",
    )(x, w, rows, cols)


def backward_call(x, w, begin, rows, cols, zeros, *, spec, tiles, interpret):
    """One backward pass over ``tiles`` (token tiles, vocabulary tiles) from
    ``begin`` (int32 ``[first row, first column]``, traced: one kernel for
    every span). ``dx`` and ``dw`` are indexed from ``begin`` (a span's own
    accumulator), ``db`` and ``dcw`` by global column."""
    first = 3 + len(rows) + len(cols)  # the accumulators, flattened (sorted)
    aliases = {first + k: k for k in range(len(zeros))}
    out_shape = {k: common.out_struct(a.shape, a.dtype, x) for k, a in zeros.items()}
    products = 1 + ("dx" in zeros) + ("dw" in zeros)  # logits, dx, dW
    return pl.pallas_call(
        functools.partial(_backward_kernel, spec=spec),
        out_shape=out_shape,
        grid=tiles,
        input_output_aliases=aliases,
        compiler_params=_params(),
        cost_estimate=common.cost(  # float32 atomic adds
            spec,
            x,
            w,
            products=products,
            x_reads=tiles[1],
            w_reads=tiles[0],
            written=sum(a.size * a.dtype.itemsize for a in zeros.values()),
            extent=(tiles[0] * spec.tn, tiles[1] * spec.tv),
        ),
        interpret=interpret,
        name="xent_linear_backward",
    )(x, w, begin, rows, cols, zeros)


# --- the kernels --------------------------------------------------------------


def _ids(start, size: int, axis: int):
    """Row (``axis=0``: ``[size, 1]``) or column (``[1, size]``) indices."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _int32_loop(n: int, step, carry):
    """``fori_loop(0, n, ...)`` with an int32 index, as the program ids: under
    x64 a Python bound made it int64, and the interpreter's atomic add refused
    indices of mixed dtypes (found by the fuzzer, issue 9)."""
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(n), step, carry)


def _load_x(x_ref, r0, k0, spec):
    """``x[r0:r0+tn, k0:k0+td]``, 0 outside ``x``."""
    mask = (_ids(r0, spec.tn, 0) < spec.n) & (_ids(k0, spec.td, 1) < spec.d)
    block = x_ref.at[pl.ds(r0, spec.tn), pl.ds(k0, spec.td)]
    return plgpu.load(block, mask=mask, other=0.0)


def _load_w(w_ref, k0, c0, spec):
    """``w``'s slice ``[td, tv]`` (``[tv, td]`` in rows), 0 outside ``w``."""
    if spec.rows:
        mask = (_ids(c0, spec.tv, 0) < spec.v) & (_ids(k0, spec.td, 1) < spec.d)
        block = w_ref.at[pl.ds(c0, spec.tv), pl.ds(k0, spec.td)]
    else:
        mask = (_ids(k0, spec.td, 0) < spec.d) & (_ids(c0, spec.tv, 1) < spec.v)
        block = w_ref.at[pl.ds(k0, spec.td), pl.ds(c0, spec.tv)]
    return plgpu.load(block, mask=mask, other=0.0)


def _logits(x_ref, w_ref, colv: dict, r0, c0, col, spec):
    """``(z, zm)``: a tile's capped logits (a loop over slices of D) and the
    same masked to ``-inf`` on padding and past ``v``."""

    def step(k, acc):
        k0 = k * spec.td
        xb, wb = _load_x(x_ref, r0, k0, spec), _load_w(w_ref, k0, c0, spec)
        return acc + common.raw_logits(xb, wb, spec)

    zero = jnp.zeros((spec.tn, spec.tv), spec.cdt)
    raw = _int32_loop(pl.cdiv(spec.d, spec.td), step, zero)
    z = blocks.capped(raw, colv.get("bias"), spec.opts)
    ok = common.column_mask(col, colv, spec, True)
    return z, jnp.where(ok, z, -jnp.inf)


def _forward_kernel(x_ref, w_ref, rows, cols, out, *, spec, per_split):
    i, s = pl.program_id(0), pl.program_id(1)
    r0 = i * spec.tn
    label = rows["label"][pl.ds(r0, spec.tn), :]

    def step(t, carry):
        st, u_seen = carry
        c0 = (s * per_split + t) * spec.tv
        col = _ids(c0, spec.tv, 1)
        colv = {k: r[:, pl.ds(c0, spec.tv)] for k, r in cols.items()}
        _, zm = _logits(x_ref, w_ref, colv, r0, c0, col, spec)
        u = colv.get("u")  # 0 past v (padded)
        new = common.online_tile(st, zm, col.astype(spec.cdt), col == label, u, u_seen)
        if u is not None:
            u_seen = u_seen + jnp.sum(u, axis=1, keepdims=True)
        return new, u_seen

    u0 = jnp.zeros((1, 1), spec.cdt) if "u" in cols else None
    init = (common.init_stats(out, (spec.tn, 1), spec.cdt), u0)
    st, _ = _int32_loop(per_split, step, init)
    n_pad = out["row_max"].shape[0] // spec.splits
    for k, ref in out.items():
        ref[pl.ds(s * n_pad + r0, spec.tn), :] = st[k]


def _backward_kernel(x_ref, w_ref, begin_ref, rows, cols, _zeros, out, *, spec):
    i, j = pl.program_id(0), pl.program_id(1)
    r0, c0 = begin_ref[0] + i * spec.tn, begin_ref[1] + j * spec.tv
    col = _ids(c0, spec.tv, 1)
    rowv = {k: r[pl.ds(r0, spec.tn), :] for k, r in rows.items()}
    colv = {k: r[:, pl.ds(c0, spec.tv)] for k, r in cols.items()}
    z, zm = _logits(x_ref, w_ref, colv, r0, c0, col, spec)
    hit = col == rowv["label"]
    dz, zs, p = common.gradient_tile(z, zm, rowv, hit, colv.get("u"), spec.opts)
    inside = (_ids(r0, spec.tn, 0) < spec.n) & (col < spec.v)
    dz = jnp.where(inside, dz, 0)
    cols_at = (pl.ds(jnp.int32(0), 1), pl.ds(c0, spec.tv))
    if "dcw" in out:  # label smoothing: never filtered
        ok = common.both(inside, common.column_mask(col, colv, spec, False))
        sums = common.smoothing_column_sums(zs, rowv, ok)
        plgpu.atomic_add(out["dcw"], cols_at, sums)

    def add():
        if "dx" in out or "dw" in out:
            at = (i * spec.tn, j * spec.tv)  # in the span's accumulators
            _accumulate(x_ref, w_ref, dz, rowv["scored"], out, (r0, c0), at, spec)
        if "db" in out:
            plgpu.atomic_add(out["db"], cols_at, jnp.sum(dz, axis=0, keepdims=True))

    keep = common.keep_tile(p, inside, spec)
    if keep is None:
        add()
    else:
        pl.when(keep)(add)


def _accumulate(x_ref, w_ref, dz, scored, out, tile, at, spec):
    """``dx += dz . wᵀ`` and ``dw += xᵀ . dz`` slice by slice of D, for the
    tile at global ``tile = (r0, c0)``, into the accumulators at ``at``."""
    (r0, c0), (ar, ac) = tile, at

    def step(k, carry):
        k0 = k * spec.td
        if "dx" in out:
            part = common.dx_part(dz, _load_w(w_ref, k0, c0, spec), spec)
            plgpu.atomic_add(out["dx"], (pl.ds(ar, spec.tn), pl.ds(k0, spec.td)), part)
        if "dw" in out:
            part = common.dw_part(_load_x(x_ref, r0, k0, spec), dz, scored, spec)
            span_at = (pl.ds(k0, spec.td), pl.ds(ac, spec.tv))
            plgpu.atomic_add(out["dw"], span_at[::-1] if spec.rows else span_at, part)
        return carry

    _int32_loop(pl.cdiv(spec.d, spec.td), step, 0)
