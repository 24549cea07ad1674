r"""Fused linear + softmax cross-entropy that never materialises the logits.

For hidden states ``x`` ``[N, D]``, a classifier ``w`` ``[D, V]`` and an
optional bias ``b``, the logits are ``z = cap(x @ w + b)`` with the optional
soft cap ``cap(r) = s * tanh(r / s)``. The loss per example is exactly that of
:func:`xent_jax.softmax_cross_entropy_with_integer_labels` on ``z``:

.. math::
    \ell = \mathrm{lse}\,\textstyle\sum_c t_c - \sum_c t_c z_c + \zeta\,\mathrm{lse}^2,
    \qquad t = w_{cls} \odot \bigl((1 - a)\,\mathrm{onehot}(y) + a / V\bigr),

and, with ``p = softmax(z)``, ``dl/dz = (sum(t) + 2 zeta lse) p - t``; the
soft cap multiplies it by ``1 - (z / s)^2``.

The ``"blockwise"`` implementation streams over vocabulary blocks (and token
blocks). The forward pass keeps, per example, a running maximum and sum of
exponentials (an online log-sum-exp), the label's logit and, under label
smoothing, the class-weighted sum of the logits; it saves only its inputs and
two per-example scalars (``lse`` and the label logit). The backward pass
recomputes each block's logits and accumulates ``dx``, ``dw`` and ``db`` one
block at a time, so no ``[N, V]`` array ever exists: memory is
``O(token_block * vocab_block)`` on top of the inputs and the gradients.

Vocabulary layout. ``w`` is viewed (without a copy) as ``[D, G, V / G]``:
``G`` equal contiguous groups of classes, and each step of the vocabulary loop
takes the same column range of every group. The loop therefore never slices the
group axis, so under ``jax.jit`` with ``w`` sharded on ``V`` over a number of
devices that divides ``G`` (``G = 8`` when 8 divides ``V``) the sharding lands
on that axis and XLA partitions the loop without gathering ``w``: the only
collectives are all-reduces of per-example scalars and of ``dx`` (tested on 8
CPU devices). A class's global id is ``offset + g * V / G + column``.

Many devices. With ``Auto`` mesh axes GSPMD partitions the loops as above.
Inside ``shard_map`` (``axis_name``) each device streams over its own slice of
``w`` (``offset = axis_index * V_local``) and the per-example statistics are
combined with one ``pmax`` and ``psum``s. With ``Explicit`` mesh axes, where
the slicing of split axes cannot be typed, the public function wraps the same
per-device computation in a ``shard_map`` over the inputs' mesh itself.

XLA CPU notes (each measured with ``memory_analysis()``): 16-bit operands of a
loop's slices are upcast by XLA CPU, and the upcast of a loop-invariant ``w``
would be hoisted into a float32 copy of all of ``w``; see :func:`_block`. A
loop carries its operands in row-major layout, so slicing columns of a
transposed ``w`` (``emb.T``) would copy it (and its gradient) once. The
kernel therefore also has a row layout (``_Config.rows``): when ``w`` is traced
as a transpose it runs on ``transpose(w)`` ``[V, D]``, which XLA folds with the
caller's transpose, slicing rows of ``emb`` and producing ``dw`` as ``[V, D]``
(see :func:`_is_transposed`). In that layout the grouped view is
``[G, V / G, D]``.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _checks, _sharding
from xent_jax._reduction import Reduction, reduce_loss
from xent_jax._softmax import (
    class_ids,
    class_offset,
    compute_dtype,
    label_values,
    owned_index,
    softmax_cross_entropy_with_integer_labels,
)

Implementation = Literal["blockwise", "reference"]
IMPLEMENTATIONS = ("blockwise", "reference")

# Default block sizes, tuned on a 2-core CPU (benchmarks/bench_linear.py): a
# block of logits should stay cache-friendly while each matmul stays large
# enough to run at full speed.
DEFAULT_VOCAB_BLOCK = 1024
# Upper bound on the elements of one [token_block, vocab_block] block of logits.
DEFAULT_BLOCK_ELEMENTS = 1024 * 2048
# Vocabulary groups processed side by side (see the module docstring); the
# largest of these that divides V is used.
_GROUP_CHOICES = (8, 4, 2, 1)


class _Config(NamedTuple):
    """Static (hashable) options of the blockwise kernel."""

    label_smoothing: float
    z_loss: float
    ignore_index: int | None
    num_classes: int  # real classes; global ids >= num_classes are padding
    padded: bool  # whether any column of w (on any shard) is padding
    logit_softcap: float | None
    token_block: int
    vocab_block: int  # columns per group per step
    groups: int
    filter_threshold: float | None
    axis_name: Any  # shard_map axes over which the vocabulary is split
    rows: bool  # the kernel's w is [V, D] (a tied embedding), else [D, V]


# --- small helpers -------------------------------------------------------------


def _for_blocks(total: int, block: int, body, carry):
    """Runs ``body(start, size, carry)`` over ``[0, total)`` in blocks.

    Full blocks go through one ``fori_loop`` (traced ``start``, static
    ``size``); a remainder is one more static call, so no input is ever padded
    or copied to make ``total`` divisible by ``block``. Under ``shard_map``'s
    ``check_vma`` the carry must already vary over every axis the body's
    results vary over (see ``_sharding.varying_like``): loops and conds need
    equal types on every path.
    """
    n_full, rem = divmod(total, block)
    if n_full == 1:
        carry = body(0, block, carry)
    elif n_full > 1:
        carry = jax.lax.fori_loop(
            0, n_full, lambda i, c: body(i * block, block, c), carry
        )
    if rem:
        carry = body(n_full * block, rem, carry)
    return carry


def _slice(a, start, size: int, axis: int):
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def _update(a, update, start, axis: int):
    return jax.lax.dynamic_update_slice_in_dim(a, update, start, axis=axis)


def _global(stats, cfg: _Config):
    """``psum`` of per-example statistics over the vocabulary shards."""
    return stats if cfg.axis_name is None else jax.lax.psum(stats, cfg.axis_name)


def _block_logits(xb, wb, bb, cfg: _Config, cdt):
    """The (capped) logits of one block: ``xb`` [n, D] times ``wb`` [D, c]
    (``wb`` [c, D], transposed, under ``cfg.rows``).

    The operands are multiplied in their own dtype with ``cdt`` (float32 for
    16-bit inputs) accumulation; only the block is ever cast.
    """
    op = jnp.promote_types(xb.dtype, wb.dtype)
    raw = jax.lax.dot_general(
        xb.astype(op),
        wb.astype(op),
        (((1,), (1 if cfg.rows else 0,)), ((), ())),
        preferred_element_type=cdt,
    )
    if bb is not None:
        raw = raw + bb.astype(cdt)
    if cfg.logit_softcap is None:
        return raw
    s = cfg.logit_softcap
    return s * jnp.tanh(raw / s)


def _grouped(a, groups: int):
    """``a`` [..., V] viewed as [..., G, V / G] (a bitcast); as is when G = 1.

    No size-1 group axis is added: XLA CPU copies a whole ``w`` to relayout
    one.
    """
    if groups == 1:
        return a
    return a.reshape(a.shape[:-1] + (groups, a.shape[-1] // groups))


def _grouped_rows(a, groups: int):
    """``a`` [V, D] viewed as [G, V / G, D] (a bitcast); as is when G = 1."""
    if groups == 1:
        return a
    return a.reshape((groups, a.shape[0] // groups) + a.shape[1:])


def _block_ids(start, size: int, groups: int, per_group: int, offset):
    """Global class ids ``[G, size]`` (``[size]`` when G = 1) of a block."""
    shape = (size,) if groups == 1 else (groups, size)
    j = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    if groups == 1:
        return offset + start + j
    g = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return offset + g * per_group + start + j


def _is_16bit(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2


def _block(a, start, size: int, axis: int):
    """``size`` entries of a loop-invariant array from ``start`` along ``axis``.

    XLA CPU upcasts 16-bit float operands of slices to float32; on a
    loop-invariant operand that convert is hoisted out of the loop, i.e. a
    float32 copy of the whole of ``w`` (or ``x``). Tying the array to the
    loop-variant offset with a barrier keeps the conversion per block.
    """
    if _is_16bit(a):
        a, start = jax.lax.optimization_barrier((a, start))
    return _slice(a, start, size, axis)


def _block_update(a, update, start, axis: int):
    """``dynamic_update_slice`` of a 16-bit carry, kept in its own dtype."""
    if _is_16bit(a):
        a, start = jax.lax.optimization_barrier((a, start))
    return _update(a, update.astype(a.dtype), start, axis)


def _example_terms(labels, class_weights, cfg: _Config, cdt):
    """Per-example ``(scored, bad, w_y)`` and the scalar ``sum_c w_c``.

    An example is scored unless its label is ``ignore_index`` or out of range
    (``bad``: loss NaN, no gradient), as in the core loss; ``w_y`` is read by a
    gather from the shard that owns the label, never through an ``[N, V]``
    one-hot. Padding classes weigh nothing.
    """
    bad = _checks.label_out_of_range(labels, cfg.num_classes, cfg.ignore_index)
    scored = ~bad
    if cfg.ignore_index is not None:
        scored &= labels != cfg.ignore_index
    if class_weights is None:
        return scored, bad, jnp.ones(labels.shape, cdt), float(cfg.num_classes)
    cw = class_weights.astype(cdt)
    w_y = label_values(cw, labels, cfg.axis_name)
    if cfg.padded:
        num_local = cw.shape[0]
        real = class_ids(num_local, cfg.axis_name) < cfg.num_classes
        cw = jnp.where(real, cw, 0)
    return scored, bad, w_y, _global(jnp.sum(cw), cfg)


# --- the blockwise kernel --------------------------------------------------------


class _Views(NamedTuple):
    """Grouped views of the per-class operands (see the module docstring)."""

    w: jax.Array  # [D, (G,) L], or [(G,) L, D] under cfg.rows
    bias: jax.Array | None  # [(G,) L]
    smooth_w: jax.Array | None  # class weights [(G,) L] under label smoothing
    per_group: int  # L = V / G
    offset: Any  # global id of the first class


def _views(w, bias, class_weights, cfg: _Config) -> _Views:
    G = cfg.groups
    smooth_w = None
    if cfg.label_smoothing and class_weights is not None:
        smooth_w = _grouped(class_weights, G)
    return _Views(
        _grouped_rows(w, G) if cfg.rows else _grouped(w, G),
        None if bias is None else _grouped(bias, G),
        smooth_w,
        _vocab_size(w, cfg) // G,
        class_offset(_vocab_size(w, cfg), cfg.axis_name),
    )


def _vocab_size(w, cfg: _Config) -> int:
    """Classes (on this device) of the kernel's ``w``."""
    return w.shape[0] if cfg.rows else w.shape[1]


def _vocab_axis(a, cfg: _Config) -> int:
    """The class axis of the grouped view of ``w`` (or of ``dw``)."""
    return a.ndim - 2 if cfg.rows else a.ndim - 1


def _w_block(vw: _Views, s, cs: int, d: int, cfg: _Config):
    """Classes ``s:s+cs`` of every group, flattened to [D, G cs] ([G cs, D]
    under ``cfg.rows``): the dots stay 2-D (XLA CPU has no 16-bit kernel for
    some 3-D dots)."""
    wb = _block(vw.w, s, cs, _vocab_axis(vw.w, cfg))
    return wb.reshape(-1, d) if cfg.rows else wb.reshape(d, -1)


def _per_class_block(a, start, size: int):
    return None if a is None else _slice(a, start, size, a.ndim - 1)


def _flat(a):
    return None if a is None else a.reshape(-1)


def _rows(v, t, nt: int):
    """Rows ``t:t+nt`` of a per-example vector, broadcastable to a block."""
    return _slice(v, t, nt, 0)[:, None]


def _forward(x, w, bias, labels, class_weights, cfg: _Config):
    """Losses ``[N]``, ``lse`` ``[N]`` and the label logit ``z_y`` ``[N]``."""
    n = x.shape[0]
    cdt = compute_dtype(jnp.promote_types(x.dtype, w.dtype))
    a = cfg.label_smoothing
    vw = _views(w, bias, class_weights, cfg)

    def vocab_step(s, cs, carry):
        wb = _w_block(vw, s, cs, x.shape[1], cfg)
        bb = _flat(_per_class_block(vw.bias, s, cs))
        ub = _flat(_per_class_block(vw.smooth_w, s, cs))
        ids = _block_ids(s, cs, cfg.groups, vw.per_group, vw.offset).reshape(-1)

        real = ids < cfg.num_classes  # False on padding columns

        def token_step(t, nt, carry):
            m, se, zy, swz = carry
            z = _block_logits(_block(x, t, nt, 0), wb, bb, cfg, cdt)
            if cfg.padded:
                z = jnp.where(real, z, -jnp.inf)
            m_old = _slice(m, t, nt, 0)
            m_new = jnp.maximum(m_old, jnp.max(z, axis=1))
            # Rows with no finite logit yet shift by 0, so that exp stays finite.
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0)
            se_b = _slice(se, t, nt, 0) * jnp.exp(m_old - shift)
            se_b = se_b + jnp.sum(jnp.exp(z - shift[:, None]), axis=1)
            hit = ids == _slice(labels, t, nt, 0)[:, None]
            zy_b = _slice(zy, t, nt, 0) + jnp.sum(jnp.where(hit, z, 0), axis=1)
            m = _update(m, m_new, t, 0)
            se = _update(se, se_b, t, 0)
            zy = _update(zy, zy_b, t, 0)
            if a:
                # sum_c w_c z_c. As in the core kernel a zero weight on a -inf
                # logit contributes 0, a nonzero one makes the loss infinite.
                uz = z
                if ub is not None:
                    u = ub.astype(cdt)
                    uz = jnp.where(u != 0, u * z, 0)
                if cfg.padded:
                    uz = jnp.where(real, uz, 0)
                swz_b = _slice(swz, t, nt, 0) + jnp.sum(uz, axis=1)
                swz = _update(swz, swz_b, t, 0)
            return m, se, zy, swz

        return _for_blocks(n, cfg.token_block, token_step, carry)

    zeros = jnp.zeros((n,), cdt)
    init = (jnp.full((n,), -jnp.inf, cdt), zeros, zeros, zeros)
    init = _sharding.varying_like(init, x, w, bias, labels, class_weights)
    m, se, zy, swz = _for_blocks(vw.per_group, cfg.vocab_block, vocab_step, init)
    if cfg.axis_name is not None:
        # Combine the shards' online statistics: rescale each shard's sum of
        # exponentials from its own shift to the global one.
        m_all = jax.lax.pmax(m, cfg.axis_name)
        shift = jnp.where(jnp.isfinite(m), m, 0)
        shift_all = jnp.where(jnp.isfinite(m_all), m_all, 0)
        se = jnp.where(se > 0, se * jnp.exp(shift - shift_all), 0)
        m, (se, zy, swz) = m_all, _global((se, zy, swz), cfg)
    # As in the core kernel, a row without any finite logit has lse 0 (its loss
    # is then +inf or 0), never NaN from -inf - -inf.
    has_mass = se > 0
    lse = jnp.where(has_mass, jnp.log(jnp.where(has_mass, se, 1)), 0)
    lse = lse + jnp.where(jnp.isfinite(m), m, 0)

    scored, bad, w_y, w_sum = _example_terms(labels, class_weights, cfg, cdt)
    sum_t = (1 - a) * w_y
    sum_tx = (1 - a) * w_y * zy
    if a:
        sum_t = sum_t + (a / cfg.num_classes) * w_sum
        sum_tx = sum_tx + (a / cfg.num_classes) * swz
    loss = sum_t * lse - sum_tx + cfg.z_loss * lse**2
    loss = jnp.where(scored, loss, 0)
    loss = jnp.where(bad, jnp.nan, loss)
    return loss, lse, zy


def _backward(x, w, bias, labels, class_weights, lse, zy, g_loss, g_lse, cfg):
    """``dx``, ``dw``, ``dbias`` for per-example cotangents of loss and lse."""
    n, d = x.shape
    op = jnp.promote_types(x.dtype, w.dtype)
    cdt = compute_dtype(op)
    a = cfg.label_smoothing
    vw = _views(w, bias, class_weights, cfg)

    scored, _, w_y, w_sum = _example_terms(labels, class_weights, cfg, cdt)
    g_loss = jnp.where(scored, g_loss.astype(cdt), 0)
    sum_t = (1 - a) * w_y + ((a / cfg.num_classes) * w_sum if a else 0)
    # dl/dz = coef * p - onehot_coef * onehot(y) - smooth_coef * w_c, per row.
    coef = g_loss * (sum_t + 2 * cfg.z_loss * lse) + g_lse.astype(cdt)
    onehot_coef = g_loss * (1 - a) * w_y
    smooth_coef = g_loss * (a / cfg.num_classes)
    # Gradient filtering (Cut-Cross-Entropy): the softmax part of a block is
    # skipped when all its probabilities are below the threshold; the sparse
    # label part is then applied exactly outside the loop. Label smoothing
    # spreads gradient over every class, so it turns filtering off.
    filtering = cfg.filter_threshold is not None and not a

    def vocab_step(s, cs, carry):
        dx, dw, db = carry
        wb = _w_block(vw, s, cs, x.shape[1], cfg)
        bb = _flat(_per_class_block(vw.bias, s, cs))
        ub = _flat(_per_class_block(vw.smooth_w, s, cs))
        ids = _block_ids(s, cs, cfg.groups, vw.per_group, vw.offset).reshape(-1)

        real = ids < cfg.num_classes  # False on padding columns

        def token_step(t, nt, carry):
            dx, dwb, dbb = carry
            xb = _block(x, t, nt, 0)
            z = _block_logits(xb, wb, bb, cfg, cdt)
            zm = jnp.where(real, z, -jnp.inf) if cfg.padded else z
            p = jnp.exp(zm - _rows(lse, t, nt))
            dz = _rows(coef, t, nt) * p
            if not filtering:
                hit = ids == _slice(labels, t, nt, 0)[:, None]
                dz = dz - jnp.where(hit, _rows(onehot_coef, t, nt), 0)
            if a:
                u = 1 if ub is None else ub.astype(cdt)
                if cfg.padded:
                    u = jnp.where(real, u, 0)
                dz = dz - _rows(smooth_coef, t, nt) * u
            if cfg.logit_softcap is not None:
                # d(s tanh(r / s)) / dr = 1 - tanh^2 = 1 - (z / s)^2, from the
                # unmasked (finite) z.
                dz = dz * (1 - jnp.square(z / cfg.logit_softcap))

            def accumulate(_):
                # Matmuls in the inputs' dtype, accumulated in cdt.
                dzo = dz.astype(op)
                dx_b = jax.lax.dot_general(
                    dzo,
                    wb.astype(op),
                    (((1,), (0 if cfg.rows else 1,)), ((), ())),
                    preferred_element_type=cdt,
                )
                # dw's block: [D, G c], or [G c, D] under cfg.rows.
                lhs, rhs = (dzo, xb.astype(op)) if cfg.rows else (xb.astype(op), dzo)
                dw_b = jax.lax.dot_general(
                    lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=cdt
                )
                db_b = jnp.sum(dz, axis=0)
                return (
                    _update(dx, _slice(dx, t, nt, 0) + dx_b, t, 0),
                    dwb + dw_b,
                    dbb + db_b,
                )

            if not filtering:
                return accumulate(None)
            skip = jnp.max(p) < cfg.filter_threshold
            return jax.lax.cond(skip, lambda _: (dx, dwb, dbb), accumulate, None)

        dwb_shape = ids.shape + (d,) if cfg.rows else (d,) + ids.shape
        init = (dx, jnp.zeros(dwb_shape, cdt), jnp.zeros(ids.shape, cdt))
        init = _sharding.varying_like(init, x, w, bias, labels, coef)
        dx, dwb, dbb = _for_blocks(n, cfg.token_block, token_step, init)
        # Under shard_map with examples split over a data axis that w is
        # replicated over, each block of dw is summed over that axis here: a
        # block-sized all-reduce, rather than one of all of dw at the end.
        dwb = _sharding.match_varying(dwb, w)
        # Back to the grouped layout [D, (G,) cs] ([(G,) cs, D]) for the update.
        axis = _vocab_axis(dw, cfg)
        dwb = dwb.reshape(dw.shape[:axis] + (cs,) + dw.shape[axis + 1 :])
        dw = _block_update(dw, dwb, s, axis)
        if db is not None:
            dbb = _sharding.match_varying(dbb, bias)
            dbb = dbb.reshape(db.shape[:-1] + (cs,)).astype(db.dtype)
            db = _update(db, dbb, s, db.ndim - 1)
        return dx, dw, db

    init = (
        _sharding.varying_like(
            jnp.zeros((n, d), cdt), x, w, bias, labels, class_weights, coef
        ),
        _sharding.varying_like(jnp.zeros(vw.w.shape, w.dtype), w),
        None
        if bias is None
        else _sharding.varying_like(jnp.zeros(vw.bias.shape, bias.dtype), bias),
    )
    dx, dw, db = _for_blocks(vw.per_group, cfg.vocab_block, vocab_step, init)
    dw = dw.reshape(w.shape)
    db = None if bias is None else db.reshape(bias.shape)

    if filtering:
        # The -onehot_coef * onehot(y) term, exactly: a gather and scatters.
        k = onehot_coef
        if cfg.logit_softcap is not None:
            k = k * (1 - jnp.square(zy / cfg.logit_softcap))
        y, owned = owned_index(labels, _vocab_size(w, cfg), cfg.axis_name)
        k = jnp.where(owned, k, 0)
        g_rows = -(x.astype(cdt) * k[:, None])  # [N, D]
        if cfg.rows:
            dx = dx - k[:, None] * jnp.take(w, y, axis=0).astype(cdt)
            dw = _scatter_add(dw, y, g_rows, w, rows=True)
        else:
            w_cols = jnp.take(w, y, axis=1).astype(cdt)  # [D, N]
            dx = dx - k[:, None] * w_cols.T
            dw = _scatter_add(dw, y, g_rows.T, w)
        if db is not None:
            db = _scatter_add(db, y, -k, bias)
    # Under axis_name each shard holds its part of dx. As for `x @ w` with w
    # split over the axis, JAX sums the parts where x's type asks for it
    # (check_vma=True); without types the caller sums them.
    return _sharding.match_varying(dx, x).astype(x.dtype), dw, db


def _scatter_add(grad, columns, update, primal, rows: bool = False):
    """``grad[..., columns] += update`` (``update``'s last axis per example;
    ``grad[columns] += update``, its first axis, when ``rows``), summed over
    the data axes that ``primal`` is replicated over (see
    ``_sharding.match_varying``): then through a ``grad``-sized buffer, since
    each device scatters to other columns."""
    update = update.astype(grad.dtype)
    at = (columns,) if rows else (..., columns)
    if not _sharding.extra_varying(update, primal):
        return grad.at[at].add(update)
    scattered = jnp.zeros(grad.shape, grad.dtype).at[at].add(update)
    return grad + _sharding.match_varying(scattered, primal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(x, w, bias, labels, class_weights, cfg: _Config):
    loss, lse, _ = _forward(x, w, bias, labels, class_weights, cfg)
    return loss, lse


def _blockwise_fwd(x, w, bias, labels, class_weights, cfg: _Config):
    loss, lse, zy = _forward(x, w, bias, labels, class_weights, cfg)
    # Residuals: the inputs plus two per-example scalars; nothing of size V*N.
    return (loss, lse), (x, w, bias, labels, class_weights, lse, zy)


def _blockwise_bwd(cfg: _Config, residual, cotangents):
    x, w, bias, labels, class_weights, lse, zy = residual
    g_loss, g_lse = cotangents
    dx, dw, db = _backward(
        x, w, bias, labels, class_weights, lse, zy, g_loss, g_lse, cfg
    )
    # Labels are integers; class weights get no gradient (as in the core loss).
    return dx, dw, db, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# --- layout of w ----------------------------------------------------------------


def _is_transposed(w) -> bool:
    """Whether ``w`` is, under tracing, the output of a 2-D ``transpose``.

    A tied embedding is passed as ``emb.T``. Under ``jax.jit`` the kernel then
    runs on ``jnp.transpose(w)``, which XLA folds with the caller's transpose
    (``transpose(transpose(emb))`` is ``emb``), so the loops slice rows of
    ``emb`` itself and ``dw`` is produced in ``emb``'s layout: neither ``w`` nor
    its gradient is copied. Autodiff tracers (JVP / linearize) are unwrapped to
    their primal. Only the choice of path depends on this: when a transpose is
    not recognised (eager arrays, a transpose behind a cast or a jit boundary,
    other tracers or jax versions), the ``[D, V]`` path runs, as before.
    """
    try:
        t = w
        for _ in range(16):  # nested JVP / linearize (primal), vmap (val) tracers
            inner = getattr(t, "primal", None)
            if inner is None:
                inner = getattr(t, "val", None)
            if not isinstance(inner, jax.core.Tracer):
                break
            t = inner
        eqn = getattr(t, "parent", None)  # DynamicJaxprTracer's producer
        if eqn is None or getattr(eqn, "primitive", None) is not jax.lax.transpose_p:
            return False
        # The last two axes swapped (a vmapped 2-D transpose keeps batch axes).
        perm = tuple(eqn.params["permutation"])
        n = len(perm)
        return n >= 2 and perm == tuple(range(n - 2)) + (n - 1, n - 2)
    except Exception:  # noqa: BLE001 (jax internals: never fail here)
        return False


# --- reference ------------------------------------------------------------------


def _reference_logits(x, w, bias, softcap):
    cdt = compute_dtype(jnp.promote_types(x.dtype, w.dtype))
    op = jnp.promote_types(x.dtype, w.dtype)
    logits = jnp.matmul(x.astype(op), w.astype(op), preferred_element_type=cdt)
    if bias is not None:
        logits = logits + bias.astype(cdt)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


# --- public API -------------------------------------------------------------------


def _block_sizes(block_size, n: int, v: int, groups: int) -> tuple[int, int]:
    """``(token_block, columns per group per step)`` from ``block_size``.

    Without a token block, tokens are blocked so that one block of logits has
    at most ``DEFAULT_BLOCK_ELEMENTS`` entries.
    """
    if block_size is None:
        vb = DEFAULT_VOCAB_BLOCK
        tb = None
    elif isinstance(block_size, int):
        vb, tb = block_size, None
    else:
        try:
            tb, vb = (int(b) for b in block_size)
        except (TypeError, ValueError):
            raise ValueError(
                "block_size must be None, an int (vocabulary block) or a pair "
                f"(token_block, vocab_block); got {block_size!r}."
            ) from None
    if vb < 1 or (tb is not None and tb < 1):
        raise ValueError(f"block sizes must be positive; got {block_size!r}.")
    vb = max(1, min(vb, v) // groups)
    if tb is None:
        tb = DEFAULT_BLOCK_ELEMENTS // (vb * groups)
    return max(1, min(tb, n)), vb


def linear_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "mean",
    normalizer: jax.typing.ArrayLike | None = None,
    block_size: int | tuple[int, int] | None = None,
    return_lse: bool = False,
    implementation: Implementation | None = None,
    filter_threshold: float | None = None,
    num_classes: int | None = None,
    axis_name: Any = None,
    reduction_axis_name: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Cross-entropy of ``x @ w + bias`` without materialising the logits.

    Equals ``softmax_cross_entropy_with_integer_labels(cap(x @ w + bias),
    labels, **options)`` with ``cap(r) = s * tanh(r / s)`` when
    ``logit_softcap=s`` (Gemma 2), i.e. per example

    .. math::
        \ell = (1 - a)\, w_y (\mathrm{lse} - z_y)
          + \frac{a}{V} \sum_c w_c (\mathrm{lse} - z_c) + \zeta\,\mathrm{lse}^2,
        \qquad z = \mathrm{cap}(x W + b),

    but the default implementation streams over blocks of the vocabulary (and
    of the tokens) with an online log-sum-exp, saves only its inputs and two
    scalars per example, and recomputes each block's logits in the backward
    pass: memory is ``O(token_block * vocab_block)`` (plus a float32 ``dx``
    accumulator for 16-bit ``x``), never ``O(N * V)``. ``value_and_grad``
    costs 4 matmuls of the size of ``x @ w`` instead of 3, but moves no
    ``[N, V]`` array through memory. Forward-mode autodiff (``jax.jvp``,
    ``jax.hessian``) needs ``implementation="reference"``.

    Args:
      x: Hidden states ``[..., D]``, any floating dtype. 16-bit inputs are
        multiplied in their own dtype with float32 accumulation.
      w: Classifier ``[D, V]`` (a Dense kernel). For a tied embedding ``[V, D]``
        pass ``emb.T``: under ``jax.jit`` the kernel then reads rows of
        ``emb`` directly, and neither ``w`` nor its gradient is copied (outside
        ``jit`` an eager ``emb.T`` is already a copy). The blocks themselves are
        never upcast or copied beyond one block.
      labels: Integer class ids ``[...]`` (``x``'s shape without ``D``). Ids
        outside ``[0, V)`` other than ``ignore_index`` raise ``ValueError`` for
        concrete inputs; under ``jit`` their loss is NaN with no gradient and
        ``jax.experimental.checkify.checkify`` reports them.
      bias: Optional ``[V]`` bias. ``-inf`` entries mask classes out of the
        softmax (a label on a masked class, or label smoothing with masked
        classes, gives an infinite loss, as for logits).
      ignore_index: Label value whose examples get loss 0 and gradient 0 and
        leave the mean's denominator.
      label_smoothing: ``a`` in ``[0, 1]``; the target is ``(1-a) onehot + a/V``.
      class_weights: ``[V]`` per-class weights (PyTorch's ``weight``).
      z_loss: Coefficient of the auxiliary ``lse**2`` term.
      logit_softcap: Optional ``s > 0``: the logits become ``s tanh(z / s)``
        before the loss, with the chain-rule factor in the gradient.
      reduction: ``"mean"`` (default; the sum over the sum of
        ``class_weights[label]`` over scored examples, their count without
        weights, 0 when there are none), ``"sum"`` or ``"none"``.
      normalizer: Replaces the denominator of ``"mean"``.
      block_size: ``None`` (defaults tuned for CPU: 1024 classes per step and
        token blocks of ``2**21 // 1024`` rows), an int (classes per step) or
        ``(token_block, vocab_block)``. Results do not depend on it beyond
        float round-off.
      return_lse: Also return the per-example log-sum-exp of the (capped)
        logits, differentiable, with the labels' shape.
      implementation: ``"blockwise"`` (default) or ``"reference"`` (materialises
        the logits and calls the core loss; the oracle for tests).
      filter_threshold: ``None`` (default, exact) or a probability: in the
        backward pass a block whose probabilities are all below it skips its
        matmuls (Cut-Cross-Entropy's gradient filtering; the label term stays
        exact). The error in each logit's gradient is below ``threshold *
        (sum(t) + 2 z_loss lse)``. No effect with label smoothing.
      num_classes: The number of real classes when ``w``'s vocabulary is
        padded (to a multiple of 128, or of the devices): columns with global
        id ``>= num_classes`` get no probability, no smoothing mass and no
        gradient, and labels must lie below it. Default: all of ``V``.
      axis_name: Inside ``jax.shard_map``, the mesh axis (or axes) over which
        the vocabulary is split (Megatron's vocabulary parallelism): ``w``,
        ``bias`` and ``class_weights`` hold this device's contiguous slice of
        ``V_local`` classes, global ids ``axis_index * V_local + j``; ``x`` and
        the (global) labels are the same on every device of the axis. Only
        per-example scalars cross devices in the forward pass (a ``pmax`` and a
        ``psum``); the backward pass is local. Each device's ``dx`` is its part
        of the gradient, exactly as for ``x @ w`` with ``w`` split over the
        axis: with ``check_vma=True`` the parts are summed where ``x``'s type
        asks for it (``x`` replicated over the axis), with ``check_vma=False``
        the caller sums them (``psum`` over ``axis_name``), so the fused loss
        is a drop-in for ``softmax_cross_entropy_with_integer_labels(x @ w,
        axis_name=...)`` either way. Smoothing, class weights, z-loss and the
        range of labels are over the global classes.
      reduction_axis_name: Inside ``jax.shard_map``, the data-parallel axes over
        which the examples are split: ``"mean"`` and ``"sum"`` are global (see
        :func:`xent_jax.softmax_cross_entropy_with_integer_labels`). Must not
        name an ``axis_name`` axis.

    Returns:
      The loss (a scalar for ``"mean"``/``"sum"``, the labels' shape for
      ``"none"``; float32 for 16-bit inputs), and with ``return_lse=True`` a
      pair ``(loss, lse)``. Gradients have the dtypes of ``x``, ``w``, ``bias``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import xent_jax
      >>> x = jnp.ones((4, 8)); w = jnp.zeros((8, 1000))
      >>> y = jnp.array([0, 1, 2, 3])
      >>> loss = xent_jax.linear_cross_entropy(x, w, y)
      >>> print(round(float(loss), 4))  # uniform logits: log(1000)
      6.9078
      >>> dx, dw = jax.grad(xent_jax.linear_cross_entropy, argnums=(0, 1))(x, w, y)
    """
    _checks.check_floating(x, "x")
    _checks.check_floating(w, "w")
    _checks.check_integer(labels, "labels")
    implementation, label_smoothing, z_loss = _checks.check_common_options(
        reduction, implementation, IMPLEMENTATIONS, label_smoothing, z_loss
    )
    if logit_softcap is not None:
        logit_softcap = _checks.check_static_float(
            logit_softcap, "logit_softcap", 0.0, float("inf")
        )
        if logit_softcap == 0:
            raise ValueError("logit_softcap must be positive; got 0.")
    if filter_threshold is not None:
        filter_threshold = _checks.check_static_float(
            filter_threshold, "filter_threshold", 0.0, 1.0
        )
    if ignore_index is not None:
        ignore_index = int(ignore_index)

    x, w, labels = jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    if w.ndim != 2:
        raise ValueError(f"w must have shape (D, V); got {w.shape}.")
    d, v_local = w.shape
    v = v_local  # global columns
    if axis_name is not None:
        v = v_local * jax.lax.psum(1, axis_name)
    _sharding.check_reduction_axes(axis_name, reduction_axis_name)
    if num_classes is None:
        num_classes = v
    elif not 1 <= int(num_classes) <= v:
        raise ValueError(
            f"num_classes must lie in [1, {v}] (w's global vocabulary); got "
            f"{num_classes}."
        )
    num_classes = int(num_classes)
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(
            f"x must have shape (..., {d}) (its last axis is w's first, D); got "
            f"{x.shape}."
        )
    batch_shape = x.shape[:-1]
    _checks.check_shape(labels, batch_shape, "labels", " (x's shape without D)")
    if bias is not None:
        _checks.check_floating(bias, "bias")
        bias = jnp.asarray(bias)
        _checks.check_shape(bias, (v_local,), "bias", " (one entry per class)")
    if class_weights is not None:
        _checks.check_floating(class_weights, "class_weights")
        class_weights = jnp.asarray(class_weights)
        _checks.check_shape(
            class_weights, (v_local,), "class_weights", " (one per class)"
        )
    labels = _checks.check_labels_in_range(labels, num_classes, ignore_index)

    options = dict(
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        ignore_index=ignore_index,
        num_classes=num_classes,
        padded=num_classes < v,
        logit_softcap=logit_softcap,
        filter_threshold=filter_threshold,
        # A tied embedding's emb.T: the kernel runs on w.T [V, D], which XLA
        # folds with the caller's transpose (see _is_transposed).
        rows=implementation == "blockwise" and _is_transposed(w),
    )
    if options["rows"]:
        w = jnp.transpose(w)
    per_example = functools.partial(
        _per_example, implementation=implementation, block_size=block_size, **options
    )
    args = (x, w, bias, labels, class_weights)
    if axis_name is None and _sharding.explicit_axes(*args):
        per_example, args = _in_explicit_shard_map(
            per_example, *args, rows=options["rows"]
        )
    losses, lse, example_weight = per_example(*args, axis_name=axis_name)
    denominator = None
    if reduction == "mean" and normalizer is None:
        denominator = jnp.sum(example_weight)
    loss = reduce_loss(losses, reduction, denominator, normalizer, reduction_axis_name)
    return (loss, lse) if return_lse else loss


def _per_example(
    x, w, bias, labels, class_weights, *, axis_name, implementation, block_size, **opts
):
    """Per-example losses, lse and weights in the mean's denominator (the
    label's class weight, 1 without weights, 0 when not scored), with the
    labels' shape. ``w`` is ``[V, D]`` under ``opts["rows"]``."""
    d, v_local = w.shape[::-1] if opts["rows"] else w.shape
    x2 = x.reshape(-1, d)
    y1 = labels.reshape(-1)
    groups = next(g for g in _GROUP_CHOICES if v_local % g == 0)
    tb, vb = _block_sizes(block_size, x2.shape[0], v_local, groups)
    cfg = _Config(
        token_block=tb, vocab_block=vb, groups=groups, axis_name=axis_name, **opts
    )
    if implementation == "reference":
        if axis_name is not None:
            raise NotImplementedError(
                'implementation="reference" does not support axis_name; use the '
                "default implementation inside shard_map."
            )
        logits = _reference_logits(x2, w, bias, cfg.logit_softcap)
        real = None
        if cfg.padded:
            real = jnp.broadcast_to(jnp.arange(v_local) < cfg.num_classes, logits.shape)
            logits = jnp.where(real, logits, -jnp.inf)
        losses = softmax_cross_entropy_with_integer_labels(
            logits,
            y1,
            where=real,
            ignore_index=cfg.ignore_index,
            label_smoothing=cfg.label_smoothing,
            class_weights=class_weights,
            z_loss=cfg.z_loss,
            implementation="reference",
        )
        lse = jax.nn.logsumexp(logits, axis=-1)
    else:
        losses, lse = _blockwise(x2, w, bias, y1, class_weights, cfg)
    cdt = jnp.float32 if class_weights is None else compute_dtype(class_weights.dtype)
    scored, _, w_y, _ = _example_terms(y1, class_weights, cfg, cdt)
    example_weight = jnp.where(scored, w_y, 0)
    return tuple(a.reshape(labels.shape) for a in (losses, lse, example_weight))


def _in_explicit_shard_map(per_example, x, w, bias, labels, class_weights, rows):
    """``per_example`` inside ``jax.shard_map`` over the mesh of the inputs'
    Explicit sharding types, and the inputs placed for it.

    With Explicit mesh axes every array's type says how it is split, and the
    kernel's slicing of split axes cannot be typed; inside ``shard_map`` it
    runs on each device's block instead, exactly as under ``axis_name`` (the
    axes that split ``w``'s vocabulary) with the examples split as ``x``'s
    leading axes are. Inputs placed otherwise (``w`` or ``x`` split over
    ``D``, labels placed unlike ``x``) are resharded first. The per-example
    outputs are split like the examples. ``w`` is ``[V, D]`` when ``rows``.
    """
    args = (x, w, bias, labels, class_weights)
    mesh = _sharding.explicit_mesh(*args)
    x_spec = tuple(_sharding.explicit_spec(x) or ())
    batch = (x_spec[: x.ndim - 1] + (None,) * x.ndim)[: x.ndim - 1]
    vocab = (tuple(_sharding.explicit_spec(w) or ()) + (None, None))[0 if rows else 1]
    P = jax.sharding.PartitionSpec
    w_spec = P(vocab, None) if rows else P(None, vocab)
    specs = (P(*batch, None), w_spec, P(vocab), P(*batch), P(vocab))
    args = tuple(
        None if a is None else _sharding.reshard_to(a, spec, mesh)
        for a, spec in zip(args, specs, strict=True)
    )

    def run(*args, axis_name=None):
        del axis_name  # None here (the caller's); inside, the vocabulary's axes
        return jax.shard_map(
            functools.partial(per_example, axis_name=vocab),
            mesh=mesh,
            in_specs=specs,
            out_specs=(P(*batch),) * 3,
        )(*args)

    return run, args
