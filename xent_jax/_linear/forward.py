"""The blockwise kernel's forward pass, and what both passes share.

The forward pass streams over vocabulary blocks and, inside each, over token
blocks, folding each block of logits into per-row running statistics
(``blocks.forward_step``). Under ``axis_name`` each device streams over its
own columns, and the statistics are combined with one ``pmax`` and ``psum``s
of per-example scalars.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _sharding, _stats
from xent_jax._classes import ClassAxis
from xent_jax._labels import Labels
from xent_jax._linear import blocks
from xent_jax._linear import layout as lay
from xent_jax._linear.layout import Layout
from xent_jax._options import SoftmaxOptions


def compute_dtype(x, w):
    return _numerics.compute_dtype(jnp.promote_types(x.dtype, w.dtype))


def vocab_size(w, layout: Layout) -> int:
    """Classes (on this device) of the kernel's ``w``."""
    return w.shape[0] if layout.rows else w.shape[1]


def smoothing_weights(w, class_weights, opts: SoftmaxOptions, layout: Layout, cdt):
    """The columns' smoothing targets ``[V_local]`` (per unit of a row's label
    weight): ``a / V`` times the class weights, 0 on padding columns; ``None``
    without label smoothing. The factor is in ``u`` rather than applied to
    the sum ``sum_c u_c (z_c - s)``, which would overflow first (issue 28)."""
    a = opts.label_smoothing
    if not a:
        return None
    v = vocab_size(w, layout)
    u = jnp.full((v,), a / opts.num_classes, cdt)
    if class_weights is not None:
        u = u * class_weights.astype(cdt)
    if layout.padded:
        u = jnp.where(ClassAxis(opts.axis_name).ids(v) < opts.num_classes, u, 0)
    return u


def label_weights(labels: Labels, class_weights, opts: SoftmaxOptions, cdt):
    """``class_weights[label]`` per example (1 without class weights)."""
    if class_weights is None:
        return jnp.ones(labels.ids.shape, cdt)
    return ClassAxis(opts.axis_name).take(class_weights.astype(cdt), labels.ids)


class Columns(NamedTuple):
    """The per-class operands, grouped (see ``layout``), and their offset."""

    views: lay.Views
    smoothing: jax.Array | None  # grouped smoothing weights


def columns(w, bias, class_weights, opts, layout: Layout, cdt) -> Columns:
    classes = ClassAxis(opts.axis_name)
    u = smoothing_weights(w, class_weights, opts, layout, cdt)
    views = lay.views(w, bias, None, layout, classes.offset(vocab_size(w, layout)))
    return Columns(views, None if u is None else lay.grouped(u, layout.groups))


class Block(NamedTuple):
    """One vocabulary block: classes ``s:s+cs`` of every group."""

    w: jax.Array  # [D, G cs], or [G cs, D] in the row layout
    bias: jax.Array | None  # [G cs]
    ids: jax.Array  # global class ids [G cs]
    real: jax.Array  # False on padding columns
    smoothing: jax.Array | None  # smoothing weights [G cs]


def vocab_block(cols: Columns, s, cs: int, opts, layout: Layout) -> Block:
    vw = cols.views
    ids = lay.block_ids(vw, s, cs, layout.groups)
    return Block(
        lay.w_block(vw, s, cs, layout),
        lay.class_block(vw.bias, s, cs),
        ids,
        ids < opts.num_classes,
        lay.class_block(cols.smoothing, s, cs),
    )


def block_logits(xb, blk: Block, opts, layout: Layout, cdt):
    """``(z, zm)``: a block's capped logits, and the same with ``-inf`` on
    padding columns."""
    z = blocks.logits(xb, blk.w, blk.bias, opts, layout.rows, cdt)
    return z, jnp.where(blk.real, z, -jnp.inf) if layout.padded else z


def row_statistics(x, w, bias, labels: Labels, class_weights, opts, layout, rows=None):
    """Every row's statistics over this device's columns, and the columns'
    total smoothing weight, both combined over the class shards; with
    ``rows`` (``layout.ScoredRows``) in its order, and only the token blocks
    of its scored rows run (the others keep ``blocks.init``'s statistics)."""
    n, cdt = x.shape[0], compute_dtype(x, w)
    cols = columns(w, bias, class_weights, opts, layout, cdt)

    def vocab_step(s, cs, carry):
        st, u_seen = carry
        blk = vocab_block(cols, s, cs, opts, layout)
        label_at = lay.block_positions(cols.views, labels.ids, s, cs, layout.groups)

        def token_step(t, nt, st):
            xb = lay.x_rows(x, t, nt, rows)
            _, zm = block_logits(xb, blk, opts, layout, cdt)
            at = lay.take(label_at, t, nt, 0)
            st_rows = jax.tree.map(lambda a: lay.take(a, t, nt, 0), st)
            new = blocks.forward_step(st_rows, zm, blk.ids, at, blk.smoothing, u_seen)
            return jax.tree.map(lambda a, b: lay.put(a, b, t, 0), st, new)

        active = None if rows is None else rows.active
        st = lay.for_blocks(n, layout.token_block, token_step, st, active)
        if blk.smoothing is not None:
            u_seen = u_seen + jnp.sum(blk.smoothing)
        return st, u_seen

    init = (blocks.init(n, cdt, opts.aux), jnp.zeros((), cdt))
    init = _sharding.varying_like(init, x, w, bias, labels, class_weights)
    per_group = cols.views.per_group
    st, u_local = lay.for_blocks(per_group, layout.vocab_block, vocab_step, init)
    return combine_shards(st, u_local, cols.smoothing is not None, opts)


def combine_shards(st: blocks.RowStats, u_local, smoothing: bool, opts):
    """Each shard's statistics moved to the global shift and summed (also
    used by the Pallas kernels, whose forward pass yields the same ``st``)."""
    classes = ClassAxis(opts.axis_name)
    if opts.axis_name is None:
        return st, u_local if smoothing else None
    online = _stats.combine_shards(st.online, classes)
    shift_old, shift = (_stats.shift_of(s.row_max) for s in (st.online, online))
    out = blocks.RowStats(online, classes.sum(st.label_logit), st.smooth_xs)
    u_total = None
    if smoothing:
        moved = _numerics.weighted(u_local, _stats.half_shifted(shift_old, shift))
        out = out._replace(smooth_xs=classes.sum(st.smooth_xs + moved))
        u_total = classes.sum(u_local)
    if st.sum_exs is not None:
        moment = _stats.rescaled_moment(st.sum_exs, st.online.sum_exp, shift_old, shift)
        out = out._replace(
            sum_exs=classes.sum(moment),
            best_id=classes.argmax(st.online.row_max, st.best_id),
        )
    return out, u_total


def target_sums(
    label_logit, shift, smooth_xs, u_total, labels, class_weights, opts, cdt
):
    """``(sum_t, sum_t_xs)`` per example (see ``_stats``); ``u_total`` is the
    total smoothing weight, ``None`` without label smoothing. The logits are
    tempered already; the sums are taken halved (``smooth_xs`` is)."""
    w_y = label_weights(labels, class_weights, opts, cdt)
    label_xh = _stats.half_shifted(label_logit, shift)
    sum_t, sum_t_xh = _stats.integer_target_sums(
        opts.label_smoothing, w_y, label_xh, u_total, smooth_xs
    )
    return sum_t, _stats.doubled(sum_t_xh, None)


def outputs(st: blocks.RowStats, u_total, labels: Labels, class_weights, opts, cdt):
    """Per-example ``(KernelOut, shift, log_se)`` from the row statistics."""
    shift = _stats.shift_of(st.online.row_max)
    log_se = _stats.log_of_sum(st.online.sum_exp)
    sum_t, sum_t_xs = target_sums(
        st.label_logit, shift, st.smooth_xs, u_total, labels, class_weights, opts, cdt
    )
    ce = _stats.cross_entropy(sum_t, sum_t_xs, log_se, shift)
    out = _stats.KernelOut(jnp.where(labels.scored, ce, 0), shift + log_se)
    if st.sum_exs is not None:
        entropy = _stats.entropy(log_se, st.sum_exs, st.online.sum_exp)
        out = out._replace(entropy=entropy, argmax=st.best_id)
    return out, shift, log_se
