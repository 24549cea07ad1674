r"""The blockwise kernel's backward pass.

Each block's logits are recomputed from ``x`` and ``w`` and turned into their
gradient (``blocks.logits_gradient``) with the per-example coefficients

.. math::
    \frac{\partial\ell}{\partial z} = \mathrm{coef}\;p
        - g_\mathrm{ce}(1-a)\,w_y\,\mathrm{onehot}(y) - g_\mathrm{ce}\,\tfrac{a}{V}\,u,
    \qquad \mathrm{coef} = g_\mathrm{ce} \textstyle\sum_c t_c + g_\mathrm{lse},

whose products with ``x`` and ``w`` are accumulated into ``dx``, ``dw`` and
``db`` one block at a time (``blocks.accumulate``). Gradient filtering
(Cut-Cross-Entropy) skips a block whose probabilities are all below the
threshold; the sparse label term of a skipped block is then applied exactly
by a gather and scatters, in the loop (the Pallas kernels leave it to
``_label_term``, after theirs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _sharding, _stats
from xent_jax._classes import ClassAxis
from xent_jax._linear import blocks
from xent_jax._linear import forward as fwd
from xent_jax._linear import layout as lay


class Saved(NamedTuple):
    """The forward pass's residuals: its inputs and three scalars per example."""

    x: jax.Array
    w: jax.Array
    bias: jax.Array | None
    labels: object  # _labels.Labels
    class_weights: jax.Array | None
    shift: jax.Array
    log_se: jax.Array
    label_logit: jax.Array
    entropy: jax.Array | None  # with return_aux
    rows: lay.ScoredRows | None = None  # skip_unscored: the rows' order


class Needs(NamedTuple):
    """Which gradients are asked for (``custom_vjp``'s ``symbolic_zeros``)."""

    x: bool
    w: bool
    bias: bool
    class_weights: bool


class Coefficients(NamedTuple):
    """Per-example coefficients of ``d loss / d z`` (see the module docstring)."""

    softmax: jax.Array  # coef
    onehot: jax.Array  # g_ce (1 - a) w_y
    smoothing: jax.Array | None  # g_ce: of u (a / V in it); in dcw, times a / V
    label: jax.Array  # g_ce on scored examples, 0 elsewhere
    entropy: jax.Array | None  # g_H on scored examples, 0 elsewhere


def coefficients(saved: Saved, cotangents, opts, layout, cdt) -> Coefficients:
    g_ce, g_lse = (_numerics.materialised(g, saved.log_se) for g in cotangents[:2])
    a = opts.label_smoothing
    w_y = fwd.label_weights(saved.labels, saved.class_weights, opts, cdt)
    sum_t = (1 - a) * w_y
    if a:
        u = fwd.smoothing_weights(saved.w, saved.class_weights, opts, layout, cdt)
        u_total = ClassAxis(opts.axis_name).sum(jnp.sum(u))
        sum_t = sum_t + u_total
    scored = saved.labels.scored
    coef, label = _stats.logit_coefficients(g_ce, g_lse, sum_t, scored)
    smoothing = label if a else None
    g_h = None
    if saved.entropy is not None and not _numerics.is_zero(cotangents.entropy):
        g_h = jnp.where(scored, cotangents.entropy.astype(saved.log_se.dtype), 0)
    return Coefficients(coef, label * (1 - a) * w_y, smoothing, label, g_h)


def gradients(saved: Saved, cotangents, needs: Needs, opts, layout, vocab_loop=None):
    """Cotangents of ``(x, w, bias, labels, class_weights)``. ``vocab_loop``
    (default: the XLA loop, ``_vocab_loop``'s contract) is the streaming part,
    which the Pallas kernels replace."""
    cdt = fwd.compute_dtype(saved.x, saved.w)
    coefs = coefficients(saved, cotangents, opts, layout, cdt)
    # A differentiated entropy turns the filter off: its gradient, p (log p +
    # H), is not bounded by p, and a skipped block dropped it (issue 28, item 3).
    filtering = (
        opts.filter_threshold is not None
        and not opts.label_smoothing
        and coefs.entropy is None
    )
    loop = _vocab_loop if vocab_loop is None else vocab_loop
    dx, dw, db, dcw = loop(saved, coefs, needs, filtering, opts, layout, cdt)
    label_after = filtering and vocab_loop is not None
    if isinstance(dx, lay.SplitFloat32):
        # Rounded in place, into the result's buffer, unless more float32
        # terms follow: the filter's label term or a sum over devices.
        if label_after or _sharding.extra_varying(dx.high, saved.x):
            dx = dx.value()
        else:
            dx = dx.rounded(saved.x.dtype, layout.token_block)
    if dw is not None:
        dw = dw.reshape(saved.w.shape)
    if db is not None:
        db = db.reshape(saved.bias.shape)
    if needs.class_weights:
        dcw = _class_weights_grad(saved, coefs, dcw, opts, cdt)
    if label_after:
        dx, dw, db = _label_term(saved, coefs.onehot, (dx, dw, db), opts, layout, cdt)
    if db is not None:
        db = db.astype(saved.bias.dtype)
    if dx is not None:
        # Under axis_name each shard holds its part of dx. As for `x @ w` with w
        # split over the axis, JAX sums the parts where x's type asks for it
        # (check_vma=True); without types the caller sums them.
        dx = _sharding.match_varying(dx, saved.x).astype(saved.x.dtype)
    return dx, dw, db, None, dcw


def _block_step(acc, t, nt, blk, saved, coefs, filtered, opts, layout, cdt):
    """One token block of one vocabulary block: its gradient, accumulated.
    ``filtered`` (with gradient filtering): every example's label coefficient
    (``label_coefficient``) and its label's index in this vocabulary block
    (``layout.block_positions``)."""
    xb = lay.x_rows(saved.x, t, nt, saved.rows)
    z, zm = fwd.block_logits(xb, blk, opts, layout, cdt)
    zs = zm - lay.rows_of(saved.shift, t, nt)
    log_se = lay.take(saved.log_se, t, nt, 0)
    p = jnp.exp(zs - log_se[:, None])
    hit = blk.ids == lay.rows_of(saved.labels.ids, t, nt)
    scored = lay.rows_of(saved.labels.scored, t, nt)
    c = jax.tree.map(lambda v: lay.take(v, t, nt, 0), coefs)
    entropy = None if c.entropy is None else lay.take(saved.entropy, t, nt, 0)
    block_coefs = blocks.BlockCoefficients(
        c.softmax, c.onehot, c.smoothing, c.entropy, entropy
    )
    dz = blocks.logits_gradient(z, zs, p, log_se, hit, block_coefs, blk.smoothing, opts)

    def xw_of(block_acc):
        # x of an unscored row must not reach dw, even when it is NaN (0 * NaN)
        return xb if block_acc[1] is None else jnp.where(scored, xb, 0)

    def add(block_acc):
        dx_rows, dwb, dbb, dcwb = block_acc
        dx_rows, dwb, dbb = blocks.accumulate(
            dx_rows, dwb, dbb, xw_of(block_acc), blk.w, dz, layout.rows, cdt
        )
        if dcwb is not None:  # sum_i g_i (lse_i - z_ic), on real columns
            per = _numerics.weighted(c.smoothing[:, None], log_se[:, None] - zs)
            # (in shifted coordinates: lse_i - z_ic = log_se_i - zs_ic)
            dcwb = dcwb + jnp.sum(jnp.where(blk.real, per, 0), axis=0)
        return dx_rows, dwb, dbb, dcwb

    # Only this block's rows of dx enter the step (and the filter's cond, which
    # would otherwise copy all of dx, [N, D], on each path).
    dx = acc[0]
    dx_rows = None if dx is None else _dx_rows(dx, t, nt, saved.rows)
    block_acc = (dx_rows,) + tuple(acc[1:])

    def labels_only(block_acc):
        k, at = (lay.take(v, t, nt, 0) for v in filtered)
        xw = xw_of(block_acc)
        return _skipped_labels(block_acc, xw, blk.w, k, at, layout.rows, cdt)

    if filtered is not None:
        skip = jnp.max(p) < opts.filter_threshold
        block_acc = jax.lax.cond(skip, labels_only, add, block_acc)
    else:
        block_acc = add(block_acc)
    if dx is not None:
        dx = _dx_put(dx, block_acc[0], t, saved.rows)
    return (dx,) + tuple(block_acc[1:])


def _skipped_labels(block_acc, xw, wb, k, at, rows: bool, cdt):
    """A skipped block's gradients from its label term alone: ``dz = -k`` at
    each row's label column ``at`` (if this block holds it, else ``at`` is
    past the block's end), rounded to the products' dtype as a kept block's
    ``dz`` is (``blocks.accumulate``)."""
    dx_rows, dwb, dbb, dcwb = block_acc
    op = jnp.promote_types(xw.dtype, wb.dtype)
    dz = (-k).astype(op).astype(cdt)[:, None]
    if dx_rows is not None:
        w_y = jnp.take(wb, at, axis=0 if rows else 1, mode="fill", fill_value=0)
        w_y = (w_y if rows else w_y.T).astype(op).astype(cdt)
        dx_rows = dx_rows + dz * w_y
    if dwb is not None:
        update = dz * xw.astype(op).astype(cdt)
        if rows:
            dwb = dwb.at[at].add(update, mode="drop")
        else:
            dwb = dwb.at[:, at].add(update.T, mode="drop")
    if dbb is not None:  # db sums dz before its rounding, as in accumulate
        dbb = dbb.at[at].add(-k, mode="drop")
    return dx_rows, dwb, dbb, dcwb


def _dx_rows(dx, t, nt, rows):
    if isinstance(dx, lay.SplitFloat32):
        return dx.rows(t, nt, rows)
    return lay.x_rows(dx, t, nt, rows)


def _dx_put(dx, update, t, rows):
    if isinstance(dx, lay.SplitFloat32):
        return dx.put(update, t, rows)
    return lay.put_rows(dx, update, t, rows)


# A 16-bit ``dw`` is written in spans of whole vocabulary blocks, each held
# as raw bits (``uint16``) while its blocks go in: XLA CPU updates a 16-bit
# float buffer by rewriting all of it, so writing a bfloat16 ``dw`` block by
# block made one pass over the whole ``dw`` per block (2.4 s of a 5.7 s step
# at 1024 x 512 x 65536; about 500 passes over 1.1 GiB at Gemma's
# 2304 x 256000), and spans make one per span. A pass measured 5-9% of the
# time of the four products of 128 tokens (``DW_SPAN_ROWS``), so spans of
# ``dw`` / (N / 128) bytes (rounded down to a divisor of the blocks) keep
# the passes near 5-20% of the loop's time, not 250 passes at 8 MiB. The
# span is held between ``DW_SPAN_BYTES`` and ``DW_SPAN_MAX_BYTES``, so the
# temporaries stay bounded in V.
DW_SPAN_BYTES = 8 * 2**20
DW_SPAN_MAX_BYTES = 64 * 2**20
DW_SPAN_ROWS = 128
# The platforms that get the spans. XLA:TPU and XLA:GPU update a 16-bit dw in
# place, and XLA:TPU keeps the raw-bits spans as a second dw beside the output
# (compiled deviceless for a v5e: 3434 MiB of temporaries at Gemma-2's head
# with spans, 1162 without; docs/fused.md, "Compiled for TPU and GPU").
DW_SPAN_PLATFORMS = ("cpu",)

# Bytes of a float32 accumulator of a 16-bit ``dx`` above which it is held as
# ``layout.SplitFloat32``: the same bits, with the high half in the result's
# buffer, so the temporaries hold half of it (36 instead of 72 MiB at N = 8192,
# D = 2304). Below, the plain accumulator measured a few percent faster.
DX_SPLIT_BYTES = 24 * 2**20


def _vocab_loop(saved: Saved, coefs, needs: Needs, filtering, opts, layout, cdt):
    """``(dx, dw, db, dcw)``: dw, db in the grouped layout, dcw the smoothing
    part of the class weights' gradient (grouped), each ``None`` if not asked."""
    x, w, bias = saved.x, saved.w, saved.bias
    n, d = x.shape
    cols = fwd.columns(w, bias, saved.class_weights, opts, layout, cdt)
    vw = cols.views
    dw_axis = lay.vocab_axis(vw.w, layout)

    k = label_coefficient(saved, coefs.onehot, opts) if filtering else None

    def vocab_step(s, cs, carry, span_start=0):
        dx, dw, db, dcw = carry
        blk = fwd.vocab_block(cols, s, cs, opts, layout)
        filtered = None
        if filtering:
            at = lay.block_positions(vw, saved.labels.ids, s, cs, layout.groups)
            filtered = (k, at)
        shape = blk.ids.shape
        acc = (
            dx,
            _zeros_like_block(dw, shape + (d,) if layout.rows else (d,) + shape, cdt),
            _zeros_like_block(db, shape, cdt),
            _zeros_like_block(dcw, shape, cdt),
        )
        acc = _sharding.varying_like(acc, x, w, bias, saved.labels, coefs.softmax)

        def token_step(t, nt, acc):
            return _block_step(
                acc, t, nt, blk, saved, coefs, filtered, opts, layout, cdt
            )

        dx, dwb, dbb, dcwb = lay.for_blocks(
            n,
            layout.token_block,
            token_step,
            acc,
            None if saved.rows is None else saved.rows.active,
        )
        return (
            dx,
            _put_block(dw, dwb, w, s - span_start, cs, dw_axis, w.dtype),
            _put_block(db, dbb, bias, s, cs, -1),
            _put_block(dcw, dcwb, saved.class_weights, s, cs, -1),
        )

    def zeros_dw(columns):
        shape = list(vw.w.shape)
        shape[dw_axis] = columns
        return _zeros(needs.w, lambda: (tuple(shape), w.dtype), w)

    dx = _zeros(needs.x, lambda: ((n, d), cdt), x, w, bias, saved.labels, coefs)
    if _split_dx(dx, x, cdt, layout):
        dx = lay.SplitFloat32.split(dx)
    init = (
        dx,
        zeros_dw(vw.per_group),
        # db in float32 until the end: the filter's label term is added after
        # the loop, and in 16 bits the two parts' rounding would not cancel
        _zeros(needs.bias, lambda: (vw.bias.shape, cdt), bias),
        _zeros(
            needs.class_weights and coefs.smoothing is not None,
            lambda: (cols.smoothing.shape, cdt),
            saved.class_weights,
        ),
    )
    dw_bytes = vw.w.size * w.dtype.itemsize
    span = _dw_span(
        vw.per_group, layout.vocab_block, dw_bytes, _span_bytes(dw_bytes, n)
    )

    def one_pass(init):
        return lay.for_blocks(vw.per_group, layout.vocab_block, vocab_step, init)

    if not needs.w or cdt == w.dtype or span is None:
        return one_pass(init)

    def span_step(start, size, carry):
        dx, dw, db, dcw = carry
        part = lay.raw_bits(zeros_dw(size))
        dx, part, db, dcw = lay.for_blocks(
            size,
            layout.vocab_block,
            lambda s, cs, c: vocab_step(start + s, cs, c, start),
            (dx, part, db, dcw),
        )
        # The span goes in as bits too: the pass over all of dw is then a copy
        # of 16-bit integers, not a conversion to float32 and back (2x slower).
        dw = lay.from_raw_bits(lay.put(lay.raw_bits(dw), part, start, dw_axis), w.dtype)
        return dx, dw, db, dcw

    def in_spans(init):
        return lay.for_blocks(vw.per_group, span, span_step, init)

    spans = dict.fromkeys(DW_SPAN_PLATFORMS, in_spans)
    return jax.lax.platform_dependent(init, default=one_pass, **spans)


def _split_dx(dx, x, cdt, layout) -> bool:
    """Whether to hold ``dx`` as ``layout.SplitFloat32``: 16-bit, large, and
    updated only inside a loop over whole token blocks (a block outside it,
    a shorter last one or the only one, makes XLA CPU copy both halves)."""
    if dx is None or x.dtype == cdt:
        return False
    if not isinstance(dx.size, int) or not isinstance(layout.token_block, int):
        return False  # symbolic shapes (jax.export)
    blocks, rest = divmod(dx.shape[0], layout.token_block)
    return dx.size * 4 > DX_SPLIT_BYTES and blocks > 1 and not rest


def _span_bytes(dw_bytes: int, rows) -> int:
    """The largest span ``_dw_span`` may choose for ``rows`` tokens (see
    ``DW_SPAN_ROWS``)."""
    if not isinstance(rows, int) or not isinstance(dw_bytes, int):
        return DW_SPAN_BYTES  # symbolic shapes (jax.export)
    wanted = dw_bytes * DW_SPAN_ROWS // max(rows, 1)
    return min(max(wanted, DW_SPAN_BYTES), DW_SPAN_MAX_BYTES)


def _dw_span(
    per_group: int, vocab_block: int, dw_bytes: int, budget: int
) -> int | None:
    """Columns per group of a 16-bit ``dw`` carried as raw bits at a time:
    whole vocabulary blocks dividing the columns (a last, shorter span would
    run outside the loop, where XLA CPU copies all of dw), at most ``budget``
    bytes. ``None`` (a pass per block) when the columns are no whole number of
    blocks."""
    blocks, rem = divmod(per_group, vocab_block)
    if rem or blocks == 0:
        return None
    fit = min(blocks, max(1, budget * blocks // dw_bytes))
    return vocab_block * max(k for k in range(1, fit + 1) if blocks % k == 0)


def _zeros(needed: bool, shape_and_dtype, *refs):
    """An accumulator of zeros typed to vary like ``refs``; ``None`` where the
    gradient is not asked for."""
    if not needed:
        return None
    return _sharding.zeros(*shape_and_dtype(), *refs)


def _zeros_like_block(total, shape, cdt):
    return None if total is None else jnp.zeros(shape, cdt)


def _put_block(total, block_sum, primal, s, cs: int, axis: int, dtype=None):
    """A vocabulary block's accumulated gradient written into ``total`` (the
    grouped layout; ``lay.raw_bits`` of ``dtype``), summed first over the
    data axes ``primal`` is replicated over (a block-sized all-reduce, not
    one of all of ``total``)."""
    if total is None:
        return None
    block_sum = _sharding.match_varying(block_sum, primal)
    axis = axis % total.ndim
    block_sum = block_sum.reshape(total.shape[:axis] + (cs,) + total.shape[axis + 1 :])
    return lay.block_update(total, block_sum, s, axis, dtype)


def _class_weights_grad(saved: Saved, coefs: Coefficients, smoothing_part, opts, cdt):
    """``d/dw_c = sum_i g_i [(1 - a) [y_i = c] (lse_i - z_iy) + a/V (lse_i -
    z_ic)]``: the one-hot part scattered from per-example scalars, the
    smoothing part accumulated in the loop."""
    cw = saved.class_weights
    classes = ClassAxis(opts.axis_name)
    label_xs = saved.label_logit - saved.shift
    per_example = _numerics.weighted(
        coefs.label * (1 - opts.label_smoothing), saved.log_se - label_xs
    )
    grad = classes.scatter_add(cw.shape[0], saved.labels.ids, per_example)
    grad = _sharding.match_varying(grad, cw)
    if smoothing_part is not None:  # sum_i g_i (lse_i - z_ic), times a / V here
        smooth = opts.label_smoothing / opts.num_classes
        grad = grad + smooth * smoothing_part.reshape(cw.shape)
    return grad.astype(cw.dtype)


def label_coefficient(saved: Saved, onehot_coef, opts):
    """``-d loss / d (x@w+b)_y`` of the one-hot term alone, per example:
    ``onehot_coef`` times the soft cap's derivative at the label's logit and
    ``1 / T`` (as ``blocks.logits_gradient`` applies them)."""
    k = onehot_coef
    if opts.logit_softcap is not None:
        k = _numerics.weighted(
            k, 1 - jnp.square(saved.label_logit / opts.logit_softcap)
        )
    return _numerics.tempered(k, opts.temperature)


def _label_term(saved: Saved, onehot_coef, grads, opts, layout, cdt):
    """The ``-onehot_coef * onehot(y)`` term of ``d loss / d z``, exactly: a
    gather and scatters, after a loop that left it out (the Pallas loops with
    gradient filtering; the XLA loop applies it per skipped block)."""
    dx, dw, db = grads
    x, w, bias = saved.x, saved.w, saved.bias
    k = label_coefficient(saved, onehot_coef, opts)
    y, owned = ClassAxis(opts.axis_name).owned(
        saved.labels.ids, fwd.vocab_size(w, layout)
    )
    k = jnp.where(owned, k, 0)
    if dx is not None:
        w_y = jnp.take(w, y, axis=0) if layout.rows else jnp.take(w, y, axis=1).T
        dx = dx - k[:, None] * w_y.astype(cdt)
    if dw is not None:
        dw = _label_term_dw(dw, y, k, x, w, layout.rows, cdt)
    if db is not None:
        db = _scatter_add(db, y, -k, bias)
    return dx, dw, db


def _scatter_add(grad, columns, update, primal):
    """``grad[columns] += update`` for a per-class ``grad`` (``db``, in
    float32), summed over the data axes that ``primal`` is replicated over (see
    ``_sharding.match_varying``): then through a ``grad``-sized buffer, since
    each device scatters to other columns."""
    update = update.astype(grad.dtype)
    if not _sharding.extra_varying(update, primal):
        return grad.at[columns].add(update)
    scattered = jnp.zeros(grad.shape, grad.dtype).at[columns].add(update)
    return grad + _sharding.match_varying(scattered, primal)


# Bytes of the float32 updates ``-k_i x_i`` the label term of ``dw`` makes at
# a time: all of them at once would be an [N, D] buffer (72 MiB at N = 8192,
# D = 2304), and in 16 bits their merge by column needs two more.
LABEL_TERM_CHUNK_BYTES = 4 * 2**20


def _label_term_dw(dw, y, k, x, w, rows: bool, cdt):
    """``dw[:, y_i] -= k_i x_i`` (``dw[y_i]`` in the row layout) for the
    local column ``y_i`` of each example, ``LABEL_TERM_CHUNK_BYTES`` of
    features at a time. A feature's updates meet its columns in the same
    order as in one scatter of all of them, so the chunks change no bit.
    Summed over the data axes that ``w`` is replicated over (see
    ``_sharding.match_varying``): then through a ``dw``-sized buffer, since
    each device scatters to other columns."""
    n, d = x.shape
    size = max(1, min(d, LABEL_TERM_CHUNK_BYTES // (4 * max(n, 1))))
    extra = _sharding.extra_varying(k, w) or _sharding.extra_varying(x, w)
    total = jnp.zeros(dw.shape, dw.dtype) if extra else dw
    total = _sharding.varying_like(total, k, x)
    scatter = _ColumnScatter(dw, y, rows)

    def chunk(f, size, total):
        update = -_numerics.weighted(k[:, None], lay.take(x, f, size, 1).astype(cdt))
        return scatter.add(total, update, f)

    total = scatter.decoded(lay.for_blocks(d, size, chunk, scatter.encoded(total)))
    return dw + _sharding.match_varying(total, w) if extra else total


class _ColumnScatter:
    """``grad[f:f+F, columns] += update.T`` for updates ``[N, F]``
    (``grad[columns, f:f+F] += update`` in the row layout), for one
    ``columns`` and any feature range. A 16-bit ``grad`` takes the updates
    merged by column in float32 (one rounding per column rather than one per
    example: a frequent label's column summed in bfloat16 loses its value),
    each column read, added to in ``grad``'s dtype and written once: the sums
    of a scatter-add, which XLA CPU would run on a float32 copy of all of
    ``grad``. Its gather and scatter move raw bits (``encoded``), as XLA CPU
    runs even a 16-bit scatter without arithmetic in float32."""

    def __init__(self, grad, columns, rows: bool):
        self.dtype = grad.dtype
        self.vocab_axis, self.feature_axis = (0, 1) if rows else (1, 0)
        self.merge = _numerics.compute_dtype(grad.dtype) != grad.dtype
        self.columns = columns
        if self.merge:
            order = jnp.argsort(columns)
            ordered = columns[order]
            first = jnp.arange(ordered.shape[0]) == 0  # (no example: all empty)
            starts = first | (ordered != jnp.roll(ordered, 1))
            self.order, self.segment = order, jnp.cumsum(starts) - 1
            # each column once; the spare entries point past the last column,
            # where the scatter drops them
            spare = jnp.full_like(columns, grad.shape[self.vocab_axis])
            self.columns = spare.at[self.segment].set(ordered)

    def encoded(self, grad):
        return lay.raw_bits(grad) if self.merge else grad

    def decoded(self, grad):
        return lay.from_raw_bits(grad, self.dtype)

    def add(self, grad, update, f):
        """``encoded(grad)`` with ``update`` ``[N, F]`` added at features
        ``f:f+F``."""
        va, fa = self.vocab_axis, self.feature_axis
        at = jnp.stack([self.columns, jnp.full_like(self.columns, f)], axis=1)
        mode = jax.lax.GatherScatterMode.FILL_OR_DROP
        dims = jax.lax.ScatterDimensionNumbers(
            update_window_dims=(1,),
            inserted_window_dims=(va,),
            scatter_dims_to_operand_dims=(va, fa),
        )
        if not self.merge:
            update = update.astype(self.dtype)
            return jax.lax.scatter_add(grad, at, update, dims, mode=mode)
        update = jax.ops.segment_sum(
            update[self.order], self.segment, num_segments=update.shape[0]
        ).astype(self.dtype)
        gather = jax.lax.GatherDimensionNumbers(
            offset_dims=(1,), collapsed_slice_dims=(va,), start_index_map=(va, fa)
        )
        sizes = [update.shape[1]] * 2
        sizes[va] = 1
        old = jax.lax.gather(grad, at, gather, tuple(sizes), mode=mode, fill_value=0)
        new = self.encoded(self.decoded(old) + update)
        return jax.lax.scatter(grad, at, new, dims, mode=mode)
