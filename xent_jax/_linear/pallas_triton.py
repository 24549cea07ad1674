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
* backward, grid ``(token tiles, vocabulary tiles)``: recomputes the tile's
  logits, turns them into ``dz`` and, slice by slice of ``D``, adds
  ``dz . w_sliceᵀ`` to ``dx`` and ``x_sliceᵀ . dz`` to ``dw`` with float32
  atomic adds (and ``dz``'s column sums to ``db``). With ``filter_threshold``
  a tile whose probabilities are all below it skips the atomics.

16-bit operands go to ``tl.dot`` as they are with float32 accumulation. The
float32 accumulators of ``dx`` and ``dw`` are padded to whole tiles (atomics
need no masks then) and cast to the inputs' dtypes at the end. Block sizes
come from ``tiles.TILES["triton"]``; ``block_size`` is ignored. On CPU the
kernels run in Pallas's interpreter (``jax.lax.platform_dependent``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from xent_jax import _numerics, _registry, _stats
from xent_jax._labels import Labels
from xent_jax._linear import forward as fwd
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
    return _kernel(x, w, bias, labels, class_weights, opts, layout)


def _spec(x, w, opts, layout, threshold=None) -> common.Spec:
    n, d = x.shape
    itemsize = jnp.promote_types(x.dtype, w.dtype).itemsize
    tn, tv, td, splits = tiles.triton_tiles(n, fwd.vocab_size(w, layout), d, itemsize)
    t = dict(tn=tn, tv=tv, td=td, splits=splits)
    return common.spec_for(x, w, opts, layout, t, threshold)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    n_pad = _cdiv(spec.n, spec.tn) * spec.tn
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
        moved = _numerics.weighted(u_split[:, None], shifts - shift)
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


def _vocab_loop(saved, coefs, needs, filtering, opts, layout, cdt):
    """``backward._vocab_loop`` by the backward kernel."""
    threshold = opts.filter_threshold if filtering else None
    spec = _spec(saved.x, saved.w, opts, layout, threshold)
    n_pad = _cdiv(spec.n, spec.tn) * spec.tn
    v_pad = _cdiv(spec.v, spec.tv) * spec.tv
    d_pad = _cdiv(spec.d, spec.td) * spec.td
    cols = common.column_fields(
        saved.w, saved.bias, saved.class_weights, opts, layout, cdt
    )
    cols = {k: _padded(a, cols=v_pad) for k, a in cols.items()}
    rows = common.row_fields(saved, coefs, filtering, cdt)
    rows["label"] = common.local_labels(saved.labels, spec.v, opts)
    rows = {k: _padded(a, n_pad) for k, a in rows.items()}
    shapes = {
        "db": (1, v_pad),
        "dcw": (1, v_pad),
        "dw": (v_pad, d_pad) if spec.rows else (d_pad, v_pad),
        "dx": (n_pad, d_pad),
    }
    wanted = {
        "db": needs.bias,
        "dcw": needs.class_weights and coefs.smoothing is not None,
        "dw": needs.w,
        "dx": needs.x,
    }
    zeros = {k: jnp.zeros(shapes[k], cdt) for k, want in wanted.items() if want}
    if not zeros:
        return None, None, None, None
    args = common.same_varying((saved.x, saved.w, rows, cols, zeros))
    out = common.on_platform(
        "cuda", functools.partial(_kernels().backward_call, spec=spec), *args
    )
    dx, dw, db, dcw = (out.get(k) for k in ("dx", "dw", "db", "dcw"))
    if dx is not None:
        dx = dx[: spec.n, : spec.d]
    if dw is not None:
        dw = dw[: spec.v, : spec.d] if spec.rows else dw[: spec.d, : spec.v]
    db, dcw = (None if a is None else a[:, : spec.v] for a in (db, dcw))
    return common.finish_backward(saved, dx, dw, db, dcw)


# Pallas calls have no derivative rules: a second derivative raises by name.
_kernel = xla.fused_kernel(
    common.first_order_only(_row_statistics, 5), common.first_order_only(_vocab_loop, 2)
)


def _kernels():
    """The kernels' module, imported when first traced (Pallas takes ~0.6 s
    to import, which ``import xent_jax`` need not pay)."""
    from xent_jax._linear import pallas_triton_kernels

    return pallas_triton_kernels
