r"""The fused loss as Pallas Triton kernels: ``implementation="pallas_triton"``.

Pallas has two GPU backends. The default one, Mosaic GPU, lowers to its own
warpgroup programming model and refuses a plain ``jnp.dot`` of two loaded
tiles in a kernel (its matmuls go through ``wgmma`` on shared-memory refs);
the Triton backend takes exactly that (``tl.dot``), which is what the GPU
kernels of the fused loss elsewhere are written in (Cut-Cross-Entropy and
Liger use Triton too). These kernels follow Cut-Cross-Entropy's design:

* forward, grid ``(token tiles, vocabulary splits)``: each program streams
  over its split's vocabulary tiles with an online log-sum-exp, computing
  each ``(tn, tv)`` tile of logits with a loop over ``D`` in slices of
  ``td``; the splits (enough programs to fill the GPU) are merged per row
  afterwards, as shards are;
* backward, grid ``(token tiles, vocabulary tiles)`` of a span: recomputes
  the tile's logits, turns them into ``dz`` and, slice by slice of ``D``,
  adds ``dz . w_sliceᵀ`` to ``dx`` and ``x_sliceᵀ . dz`` to ``dw`` with
  float32 atomic adds (and ``dz``'s column sums to ``db``). With
  ``filter_threshold`` a tile whose probabilities are all below it skips the
  atomics.

16-bit operands go to ``tl.dot`` as they are with float32 accumulation. The
float32 accumulators are padded to whole tiles (atomics need no masks then).
A float32 ``dw`` of whole tiles is its own accumulator; any other ``dw`` is
accumulated over vocabulary spans of at most ``DW_SPAN_BYTES`` (a loop over
the span's first column, one kernel), each rounded into ``dw`` once every
token is in, so no float32 ``dw`` (2.2 GiB at Gemma-2's head) is held. A
16-bit ``dx`` whose float32 accumulator would pass ``DX_INLINE_BYTES`` gets
a pass of its own over token spans (one more matmul per tile). Block sizes
come from ``tiles.TILES["triton"]``; ``block_size`` is ignored. On CPU the
kernels run in Pallas's interpreter (``jax.lax.platform_dependent``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _registry, _sharding, _stats
from xent_jax._labels import Labels
from xent_jax._linear import forward as fwd
from xent_jax._linear import layout as lay
from xent_jax._linear import pallas_common as common
from xent_jax._linear import tiles, xla
from xent_jax._linear.layout import Layout

NAME = "pallas_triton"


@_registry.register("linear", NAME)
def linear_pallas_triton(
    x, w, bias, labels: Labels, class_weights, opts, layout: Layout
):
    """Per-example statistics (``_stats.KernelOut``) of ``x @ w + bias`` by
    the Triton kernels (see the module docstring)."""
    common.check_supported(x, w, NAME)
    if x.shape[0] == 0:  # no tokens: no grid to launch
        return xla.linear_xla(x, w, bias, labels, class_weights, opts, layout)
    return _kernel(x, w, bias, labels, class_weights, None, opts, layout)


def _spec(x, w, opts, layout, threshold=None) -> common.Spec:
    n, d = x.shape
    itemsize = jnp.promote_types(x.dtype, w.dtype).itemsize
    tn, tv, td, splits = tiles.triton_tiles(n, fwd.vocab_size(w, layout), d, itemsize)
    t = dict(tn=tn, tv=tv, td=td, splits=splits)
    return common.spec_for(x, w, opts, layout, t, threshold)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(size: int, tile: int) -> int:
    """``size`` padded to whole tiles."""
    return _cdiv(size, tile) * tile


def _per_split(spec: common.Spec) -> int:
    """Vocabulary tiles per forward program."""
    return _cdiv(_cdiv(spec.v, spec.tv), spec.splits)


def _padded(a, rows: int = 0, cols: int = 0):
    """``a`` padded with zeros to ``rows`` rows (or ``cols`` columns)."""
    return jnp.pad(a, ((0, max(0, rows - a.shape[0])), (0, max(0, cols - a.shape[1]))))


def _row_statistics(x, w, bias, labels, class_weights, opts, layout):
    """``forward.row_statistics`` by the forward kernel."""
    spec = _spec(x, w, opts, layout)
    cols = common.column_fields(w, bias, class_weights, opts, layout, spec.cdt)
    n_pad = _round_up(spec.n, spec.tn)
    v_pad = spec.splits * _per_split(spec) * spec.tv
    cols_pad = {k: _padded(a, cols=v_pad) for k, a in cols.items()}
    rows = {"label": _padded(common.local_labels(labels, spec.v, opts), n_pad)}
    names = common.stat_names(spec, "u" in cols)
    args = common.same_varying((x, w, rows, cols_pad))
    call = functools.partial(
        _kernels().forward_call, spec=spec, names=names, per_split=_per_split(spec)
    )
    out = common.on_platform("cuda", call, *args)
    parts = {k: a.reshape(spec.splits, n_pad)[:, : spec.n] for k, a in out.items()}
    u_split = None
    if "u" in cols:
        u_split = jnp.sum(args[3]["u"].reshape(spec.splits, -1), axis=1)
    return common.finish_forward(_combine_splits(parts, u_split), cols, spec)


def _combine_splits(parts: dict, u_split) -> dict:
    """Per-split statistics ``[S, N]`` (each in its own shift) merged per row
    into ``[N, 1]``, as ``forward.combine_shards`` merges shards."""
    row_max = jnp.max(parts["row_max"], axis=0)
    shifts, shift = _stats.shift_of(parts["row_max"]), _stats.shift_of(row_max)
    out = {
        "row_max": row_max,
        "sum_exp": jnp.sum(_stats.rescaled(parts["sum_exp"], shifts, shift), 0),
        "label_logit": jnp.sum(parts["label_logit"], axis=0),
    }
    if "smooth_xs" in parts:
        moved = _numerics.weighted(u_split[:, None], _stats.half_shifted(shifts, shift))
        out["smooth_xs"] = jnp.sum(parts["smooth_xs"] + moved, axis=0)
    if "sum_exs" in parts:
        moments = _stats.rescaled_moment(
            parts["sum_exs"], parts["sum_exp"], shifts, shift
        )
        out["sum_exs"] = jnp.sum(moments, axis=0)
        value, best = parts["row_max"][0], parts["best_id"][0]
        for s in range(1, parts["row_max"].shape[0]):  # in class order
            new_value, new_id = parts["row_max"][s], parts["best_id"][s]
            wins = _stats.first_wins(new_value, new_id, value, best)
            value = jnp.where(wins, new_value, value)
            best = jnp.where(wins, new_id, best)
        out["best_id"] = best
    return {k: a[:, None] for k, a in out.items()}


# A 16-bit (or ragged) dw is accumulated in float32 over vocabulary spans of at
# most this many bytes, each rounded into dw once every token is in: never a
# float32 accumulator of all of dw (2.2 GiB at Gemma-2's head in bfloat16).
DW_SPAN_BYTES = 64 * 2**20
# A float32 accumulator of a 16-bit dx above this many bytes (256 MiB at
# N = 16384, D = 4096) gives way to a pass of its own over token spans of at
# most DW_SPAN_BYTES, each rounded into dx: one more matmul per tile.
DX_INLINE_BYTES = 128 * 2**20


def _vocab_loop(saved, coefs, needs, filtering, opts, layout, cdt):
    """``backward._vocab_loop`` by the backward kernel: one pass over the
    vocabulary (in spans when dw needs them, dx accumulated alongside), or a
    pass over token spans for dx and one over vocabulary spans for the rest
    (see ``DX_INLINE_BYTES``)."""
    threshold = opts.filter_threshold if filtering else None
    spec = _spec(saved.x, saved.w, opts, layout, threshold)
    n_pad, v_pad = _round_up(spec.n, spec.tn), _round_up(spec.v, spec.tv)
    cols = common.column_fields(
        saved.w, saved.bias, saved.class_weights, opts, layout, cdt
    )
    cols = {k: _padded(a, cols=v_pad) for k, a in cols.items()}
    rows = common.row_fields(saved, coefs, filtering, cdt)
    rows["label"] = common.local_labels(saved.labels, spec.v, opts)
    rows = {k: _padded(a, n_pad) for k, a in rows.items()}
    wanted = {
        "db": needs.bias,
        "dcw": needs.class_weights and coefs.smoothing is not None,
        "dw": needs.w,
        "dx": needs.x,
    }
    if not any(wanted.values()):
        return None, None, None, None
    args = common.same_varying((saved.x, saved.w, rows, cols))
    dx = None
    if wanted["dx"] and _dx_by_tokens(saved, args[0], spec, filtering):
        dx, wanted["dx"] = _token_pass(args, spec, saved.x.dtype), False
    if any(wanted.values()):
        dx_v, dw, db, dcw = _vocab_pass(args, spec, wanted, saved.w.dtype)
        dx = dx_v if dx is None else dx
    else:
        dw = db = dcw = None
    return common.finish_backward(saved, dx, dw, db, dcw)


def _launch(args, spec, zeros: dict, begin, tiles):
    """The backward kernel over ``tiles`` from ``begin = (row, column)``."""
    x, w, rows, cols = args
    begin = jnp.stack([jnp.asarray(b, jnp.int32) for b in begin])
    args = common.same_varying((x, w, begin, rows, cols, zeros))
    call = functools.partial(_kernels().backward_call, spec=spec, tiles=tiles)
    return common.on_platform("cuda", call, *args)


def _span(limit: int, tile: int, row_bytes: int) -> int:
    """The most whole tiles (at least one, at most ``limit`` rounded up) whose
    float32 accumulator of ``row_bytes`` per index fits ``DW_SPAN_BYTES``.
    The spans are walked by ``layout.for_blocks``: a loop over the whole ones
    (one kernel: the first row or column is data), then the rest."""
    fit = DW_SPAN_BYTES // row_bytes // tile * tile
    return min(max(tile, fit), _round_up(limit, tile))


def _dx_by_tokens(saved, x_varying, spec, filtering) -> bool:
    """Whether dx gets a pass of its own (rounded span by span): its float32
    accumulator is over ``DX_INLINE_BYTES`` and no float32 term follows (the
    filter's label term, a sum over devices)."""
    acc = _round_up(spec.n, spec.tn) * _round_up(spec.d, spec.td) * 4
    rounded_now = not filtering and not _sharding.extra_varying(x_varying, saved.x)
    return spec.cdt != saved.x.dtype and acc > DX_INLINE_BYTES and rounded_now


def _token_pass(args, spec, dtype):
    """dx in ``dtype``, token span by token span (each over all classes)."""
    d_pad, v_tiles = _round_up(spec.d, spec.td), _cdiv(spec.v, spec.tv)

    def launch(begin, size, dx):
        padded = _round_up(size, spec.tn)
        acc = jnp.zeros((padded, d_pad), spec.cdt)
        acc = _launch(args, spec, {"dx": acc}, (begin, 0), (padded // spec.tn, v_tiles))
        part = acc["dx"][:size, : spec.d].astype(dtype)
        return jax.lax.dynamic_update_slice(dx, part, (begin, 0))

    dx = _sharding.zeros((spec.n, spec.d), dtype, args)
    return lay.for_blocks(spec.n, _span(spec.n, spec.tn, d_pad * 4), launch, dx)


def _vocab_pass(args, spec, wanted, dtype):
    """``(dx, dw, db, dcw)`` (each ``None`` unless wanted) over all tokens,
    dw span by vocabulary span in ``dtype`` (one span, the accumulator
    itself, when float32 and whole tiles)."""
    n_pad, v_pad, d_pad = (
        _round_up(spec.n, spec.tn),
        _round_up(spec.v, spec.tv),
        _round_up(spec.d, spec.td),
    )
    shapes = {"db": (1, v_pad), "dcw": (1, v_pad), "dx": (n_pad, d_pad)}
    full = {k: jnp.zeros(s, spec.cdt) for k, s in shapes.items() if wanted[k]}
    full = _sharding.varying_like(full, args)

    def launch(begin, size, full):
        padded = _round_up(size, spec.tv)
        zeros = dict(full)
        if wanted["dw"]:
            shape = (padded, d_pad) if spec.rows else (d_pad, padded)
            zeros["dw"] = jnp.zeros(shape, spec.cdt)
        tiles = (n_pad // spec.tn, padded // spec.tv)
        out = _launch(args, spec, zeros, (0, begin), tiles)
        return out.pop("dw", None), out

    exact = dtype == spec.cdt and v_pad == spec.v and d_pad == spec.d
    if not wanted["dw"] or exact:
        dw, full = launch(0, spec.v, full)
    else:

        def span_launch(begin, size, carry):
            dw, full = carry
            acc, full = launch(begin, size, full)
            part = acc[:size, : spec.d] if spec.rows else acc[: spec.d, :size]
            at = (begin, 0) if spec.rows else (0, begin)
            return jax.lax.dynamic_update_slice(dw, part.astype(dtype), at), full

        shape = (spec.v, spec.d) if spec.rows else (spec.d, spec.v)
        dw = _sharding.zeros(shape, dtype, args)
        span = _span(spec.v, spec.tv, d_pad * 4)
        dw, full = lay.for_blocks(spec.v, span, span_launch, (dw, full))
    dx = full.get("dx")
    if dx is not None:
        dx = dx[: spec.n, : spec.d]
    db, dcw = (None if k not in full else full[k][:, : spec.v] for k in ("db", "dcw"))
    return dx, dw, db, dcw


# Pallas calls have no derivative rules: a second derivative raises by name.
_kernel = xla.fused_kernel(
    common.first_order_only(_row_statistics, 5), common.first_order_only(_vocab_loop, 2)
)


def _kernels():
    """The kernels' module, imported when first traced (Pallas takes ~0.6 s
    to import, which ``import xent_jax`` need not pay)."""
    from xent_jax._linear import pallas_triton_kernels

    return pallas_triton_kernels
