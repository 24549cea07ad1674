r"""Distillation between two linear heads in vocabulary blocks: neither
``[N, V]`` logit array exists.

Each step multiplies all ``N`` rows of both heads with one block of ``c``
classes (float32 ``[N, c]`` blocks of at most ``TILE_BYTES``). The forward
pass folds each block into online log-sum-exps (student and teacher at the
temperature, the student's raw logits for the hard-label term), picks the
label's logit and, for a KL ``KL(A || B)``, carries ``sum exp(a - s_a) ((a -
s_a) - (b - s_b))`` at the heads' running shifts (moved as they grow, like
the fused loss's entropy moment), so that ``KL = that / S_a - log S_a + log
S_b``. The Jensen-Shannon divergence takes a second pass: with every row's
log-sum-exp known it sums from exact log-probabilities (``log m`` of the
mixture needs both). The backward pass
recomputes each block, forms the logits' gradient in closed form and
produces ``dW``'s block whole (written once, in ``W``'s dtype) and ``dx``'s
float32 share. A ``jax.custom_vjp`` saves the inputs and a few numbers per
row.

The last class block may overlap the one before it (``start = min(k c, V -
c)``); classes an earlier block covered are masked out of every sum.
Under ``axis_name`` (both heads' classes split over the axis, as in
:func:`xent_jax.linear_cross_entropy`), the per-row statistics are combined
with a ``pmax`` and ``psum``s: only per-row scalars cross devices.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _compat, _numerics, _registry, _sharding, _stats
from xent_jax._linear.blocks import dot

TILE_BYTES = 1 << 24  # a float32 [N, c] block


class Options(NamedTuple):
    """The static options of the kernel (hashable)."""

    divergence: str  # "forward_kl", "reverse_kl" or "jsd"
    beta: float
    temperature: float
    alpha: float  # weight of the hard-label cross-entropy
    block_size: int | None
    vd: bool  # w is [V, D]
    axis_name: object
    teacher_grad: bool


def class_block(n: int, v: int, block_size: int | None) -> int:
    """Classes per step: ``block_size``, or as many as fit ``TILE_BYTES`` (a
    multiple of 128, at least 128), never more than ``v``."""
    if block_size is None:
        fit = TILE_BYTES // (4 * n) if _compat.is_static(n) else 512
        block_size = max(128, fit - fit % 128)
    return min(block_size, v)


def _classes(w, vd: bool) -> int:
    return w.shape[0] if vd else w.shape[1]


class Block(NamedTuple):
    start: jax.Array
    fresh: jax.Array  # [c] classes no earlier block covered
    ids: jax.Array  # [c] global class ids


def _block(k, c: int, v: int, offset) -> Block:
    start = jnp.minimum(k * c, v - c)
    cols = start + jnp.arange(c)
    return Block(start, cols >= k * c, offset + cols)


def _w_block(w, blk: Block, c: int, vd: bool):
    return jax.lax.dynamic_slice_in_dim(w, blk.start, c, axis=0 if vd else 1)


def _logits(x, w_blk, vd: bool, cdt):
    op = jnp.promote_types(x.dtype, w_blk.dtype)  # never rounds w to x's dtype
    contract = ((1,), (1,)) if vd else ((1,), (0,))
    x, w_blk = x.astype(op), w_blk.astype(op)
    if x.shape[1] == 1:
        # XLA makes a product over one element a multiply, fused into each
        # consumer, where LLVM contracts "x w - max(x w)" into an FMA: its
        # result is the product's rounding error, not 0 (one-class heads had
        # losses and gradients of 1e-6). A zero second term keeps a sum.
        x = jnp.pad(x, ((0, 0), (0, 1)))
        w_blk = jnp.pad(w_blk, ((0, 1), (0, 0)) if not vd else ((0, 0), (0, 1)))
    return dot(x, w_blk, contract, cdt)


def _offset(v_local: int, axis_name):
    if axis_name is None:
        return 0
    return jax.lax.axis_index(axis_name) * v_local


def _for_blocks(v: int, c: int, step, carry):
    return jax.lax.fori_loop(0, -(-v // c), step, carry)


class Stats(NamedTuple):
    """Per-row statistics, in shifted form."""

    student: _stats.Online  # z_s = x w / T
    teacher: _stats.Online  # z_t = x_t w_t / T
    raw: _stats.Online  # x w (the hard-label term's logits)
    label: jax.Array  # the raw logit of the label
    # For a KL, sum exp(a - s_a) ((a - s_a) - (b - s_b)): ``a`` the weighing
    # head (the teacher's for "forward_kl"), ``b`` the other, ``s`` the shifts.
    cross: jax.Array


def _kl_heads(opts: Options, student, teacher):
    """``(a, b)`` of ``KL(softmax a || softmax b)``, in the divergence's order."""
    return (teacher, student) if opts.divergence == "forward_kl" else (student, teacher)


def _cross_moved(opts: Options, cross, old: tuple, new: tuple):
    """``Stats.cross`` moved from the heads' ``old`` shifts to their ``new``
    ones (each a ``(student, teacher)`` pair of ``Online`` states)."""
    (old_a, old_b), (new_a, new_b) = _kl_heads(opts, *old), _kl_heads(opts, *new)
    da, db = _stats.shift_change(old_a, new_a), _stats.shift_change(old_b, new_b)
    return _stats.moved_weighted_sum(cross, old_a.sum_exp, da, da - db)


def _cross_terms(opts: Options, new: tuple, h: Heads):
    """One block's terms of ``Stats.cross`` at the ``new`` shifts."""
    heads, logits = _kl_heads(opts, *new), _kl_heads(opts, h.zs, h.zt)
    za, zb = (
        z - _stats.shift_of(st.row_max)[:, None]
        for z, st in zip(logits, heads, strict=True)
    )
    return jnp.sum(_numerics.weighted(jnp.exp(za), za - zb), axis=1)


def _kl_of(cross, a: _stats.Online, b: _stats.Online):
    """``KL(softmax a || softmax b)`` from the completed statistics: ``E_a[(a -
    s_a) - (b - s_b)] - log S_a + log S_b``, never below 0 (its rounding
    could be)."""
    s = a.sum_exp
    mean = jnp.where(s == 0, 0, cross / jnp.where(s == 0, 1, s))
    kl = mean - _stats.log_of_sum(s) + _stats.log_of_sum(b.sum_exp)
    return jnp.maximum(kl, 0)


def _log_softmax(z, st: _stats.Online) -> jax.Array:
    """``z``'s log-probabilities in shifted coordinates, ``(z - s) - log S``:
    the shift is not added to ``log S`` and taken off again, which would put
    the rounding of ``z``'s product (an FMA where XLA contracts it) in every
    probability of a one-class row."""
    return (z - _stats.shift_of(st.row_max)[:, None]) - _stats.log_of_sum(st.sum_exp)[
        :, None
    ]


def _update(st: _stats.Online, z) -> _stats.Online:
    return _stats.online_update(
        st, jnp.max(z, axis=1), lambda sh: jnp.sum(jnp.exp(z - sh[:, None]), axis=1)
    )


def _combine(st: _stats.Online, axis_name) -> _stats.Online:
    if axis_name is None:
        return st
    row_max = jax.lax.pmax(st.row_max, axis_name)
    moved = _stats.rescaled(
        st.sum_exp, _stats.shift_of(st.row_max), _stats.shift_of(row_max)
    )
    return _stats.Online(row_max, jax.lax.psum(moved, axis_name))


class Heads(NamedTuple):
    """One block of both heads' logits, masked to the block's fresh classes."""

    raw: jax.Array  # student x w
    zs: jax.Array  # student at the temperature
    zt: jax.Array  # teacher at the temperature


def _heads(x, w, xt, wt, blk: Block, c: int, opts: Options, cdt) -> Heads:
    raw = _logits(x, _w_block(w, blk, c, opts.vd), opts.vd, cdt)
    zt = _logits(xt, _w_block(wt, blk, c, opts.vd), opts.vd, cdt)
    gone = ~blk.fresh[None, :]
    raw = jnp.where(gone, -jnp.inf, raw)
    zt = jnp.where(gone, -jnp.inf, zt / opts.temperature)
    return Heads(raw, raw / opts.temperature, zt)


def _statistics(x, w, xt, wt, ids, opts: Options, cdt) -> Stats:
    n, v = x.shape[0], _classes(w, opts.vd)
    c, offset = class_block(n, v, opts.block_size), _offset(v, opts.axis_name)

    def step(k, st: Stats):
        blk = _block(k, c, v, offset)
        h = _heads(x, w, xt, wt, blk, c, opts, cdt)
        student, teacher = _update(st.student, h.zs), _update(st.teacher, h.zt)
        cross = st.cross
        if opts.divergence != "jsd":  # the KL in this pass
            new = (student, teacher)
            cross = _cross_moved(opts, cross, (st.student, st.teacher), new)
            cross = cross + _cross_terms(opts, new, h)
        if not opts.alpha:
            return Stats(student, teacher, st.raw, st.label, cross)
        hit = ids[:, None] == blk.ids[None, :]
        label = st.label + jnp.sum(jnp.where(hit & blk.fresh, h.raw, 0), axis=1)
        raw = student if opts.temperature == 1 else _update(st.raw, h.raw)
        return Stats(student, teacher, raw, label, cross)

    init = _stats.online_init((n,), cdt)
    zero = jnp.zeros((n,), cdt)
    st = _sharding.varying_like(Stats(init, init, init, zero, zero), x, w, xt, wt)
    st = _for_blocks(v, c, step, st)
    axis = opts.axis_name
    if axis is None:
        return st
    student, teacher = _combine(st.student, axis), _combine(st.teacher, axis)
    cross = st.cross
    if opts.divergence != "jsd":  # moved to the global shifts, then summed
        old, new = (st.student, st.teacher), (student, teacher)
        cross = _cross_moved(opts, cross, old, new)
    label, cross = jax.lax.psum((st.label, cross), axis)
    return Stats(student, teacher, _combine(st.raw, axis), label, cross)


class LogProbs(NamedTuple):
    q: jax.Array  # student log-probabilities
    p: jax.Array  # teacher log-probabilities
    m: jax.Array | None  # the mixture's, for "jsd"


def _log_probs(h: Heads, student, teacher, opts: Options) -> LogProbs:
    q, p = _log_softmax(h.zs, student), _log_softmax(h.zt, teacher)
    m = None
    if opts.divergence == "jsd":
        b = opts.beta
        m = jnp.logaddexp(jnp.log(b) + p, jnp.log1p(-b) + q)
    return LogProbs(q, p, m)


def _kl_terms(log_a, log_b):
    """``a (log a - log b)`` elementwise; 0 where ``a`` is 0."""
    return _numerics.weighted(jnp.exp(log_a), log_a - log_b)


def _divergence_sums(lp: LogProbs, opts: Options) -> tuple[jax.Array, jax.Array]:
    """Per row: ``(KL(P || ·), KL(Q || ·))`` as the divergence needs them (the
    unused one 0)."""
    zero = jnp.zeros(lp.q.shape[:1], lp.q.dtype)
    if opts.divergence == "forward_kl":
        return jnp.sum(_kl_terms(lp.p, lp.q), axis=1), zero
    if opts.divergence == "reverse_kl":
        return zero, jnp.sum(_kl_terms(lp.q, lp.p), axis=1)
    return (
        jnp.sum(_kl_terms(lp.p, lp.m), axis=1),
        jnp.sum(_kl_terms(lp.q, lp.m), axis=1),
    )


class Saved(NamedTuple):
    student: _stats.Online
    teacher: _stats.Online
    raw: _stats.Online
    kl_p: jax.Array  # KL(P || Q) or KL(P || M)
    kl_q: jax.Array  # KL(Q || P) or KL(Q || M)


def _forward(x, w, xt, wt, ids, opts: Options, cdt) -> tuple[jax.Array, Saved]:
    st = _statistics(x, w, xt, wt, ids, opts, cdt)
    if opts.divergence != "jsd":
        kl = _kl_of(st.cross, *_kl_heads(opts, st.student, st.teacher))
        zero = jnp.zeros_like(kl)
        kl_p, kl_q = (kl, zero) if opts.divergence == "forward_kl" else (zero, kl)
        saved = Saved(st.student, st.teacher, st.raw, kl_p, kl_q)
        return _row_loss(saved, st.label, opts), saved
    return _jsd_forward(x, w, xt, wt, opts, cdt, st)


def _jsd_forward(x, w, xt, wt, opts: Options, cdt, st: Stats):
    """The second pass "jsd" needs: ``log M`` takes both heads' exact
    log-probabilities."""
    n, v = x.shape[0], _classes(w, opts.vd)
    c, offset = class_block(n, v, opts.block_size), _offset(v, opts.axis_name)

    def step(k, sums):
        blk = _block(k, c, v, offset)
        h = _heads(x, w, xt, wt, blk, c, opts, cdt)
        lp = _log_probs(h, st.student, st.teacher, opts)
        return tuple(
            s + d for s, d in zip(sums, _divergence_sums(lp, opts), strict=True)
        )

    zero = _sharding.zeros((n,), cdt, x, w, xt, wt)
    kl_p, kl_q = _for_blocks(v, c, step, (zero, zero))
    if opts.axis_name is not None:
        kl_p, kl_q = jax.lax.psum((kl_p, kl_q), opts.axis_name)
    saved = Saved(st.student, st.teacher, st.raw, kl_p, kl_q)
    return _row_loss(saved, st.label, opts), saved


def _row_loss(s: Saved, label, opts: Options):
    b = opts.beta
    div = {
        "forward_kl": s.kl_p,
        "reverse_kl": s.kl_q,
        "jsd": b * s.kl_p + (1 - b) * s.kl_q,
    }
    loss = (1 - opts.alpha) * opts.temperature**2 * div[opts.divergence]
    if opts.alpha:
        shift = _stats.shift_of(s.raw.row_max)
        ce = _stats.log_of_sum(s.raw.sum_exp) - (label - shift)
        loss = loss + opts.alpha * ce
    return loss


def _logit_gradients(h: Heads, lp: LogProbs, s: Saved, g, ids, blk: Block, opts):
    """``(d loss / d raw student logits, d loss / d raw teacher logits)`` of
    one block (the teacher's ``None`` unless asked for)."""
    scale = (1 - opts.alpha) * opts.temperature  # T^2 / T: the tempered chain
    q, p = jnp.exp(lp.q), jnp.exp(lp.p)
    gs = (scale * g)[:, None]
    weighted = _numerics.weighted  # 0 where a probability is 0
    if opts.divergence == "forward_kl":
        ds = q - p
        dt = None
        if opts.teacher_grad:
            dt = weighted(p, (lp.p - lp.q) - s.kl_p[:, None])
    elif opts.divergence == "reverse_kl":
        ds = weighted(q, (lp.q - lp.p) - s.kl_q[:, None])
        dt = p - q if opts.teacher_grad else None
    else:
        b = opts.beta
        ds = (1 - b) * weighted(q, (lp.q - lp.m) - s.kl_q[:, None])
        dt = None
        if opts.teacher_grad:
            dt = b * weighted(p, (lp.p - lp.m) - s.kl_p[:, None])
    ds = gs * ds
    if opts.alpha:
        hit = ids[:, None] == blk.ids[None, :]
        soft = jnp.exp(_log_softmax(h.raw, s.raw))
        ds = ds + (opts.alpha * g)[:, None] * (soft - hit)
    keep = blk.fresh[None, :] & (g != 0)[:, None]
    ds = jnp.where(keep, ds, 0)
    return ds, None if dt is None else jnp.where(keep, gs * dt, 0)


def _grad_block(x, w, dw, dz, blk: Block, c: int, opts: Options, cdt):
    """``dz``'s share of ``dx`` (float32) and the block of ``dw``, written
    once (its fresh classes)."""
    w_blk = _w_block(w, blk, c, opts.vd)
    op = jnp.promote_types(x.dtype, w.dtype)
    dzo, x = dz.astype(op), x.astype(op)
    dx = dot(dzo, w_blk.astype(op), ((1,), (0,)) if opts.vd else ((1,), (1,)), cdt)
    lhs, rhs = (dzo, x) if opts.vd else (x, dzo)
    new = dot(lhs, rhs, ((0,), (0,)), cdt).astype(dw.dtype)
    axis = 0 if opts.vd else 1
    old = jax.lax.dynamic_slice_in_dim(dw, blk.start, c, axis=axis)
    fresh = blk.fresh[:, None] if opts.vd else blk.fresh[None, :]
    new = jnp.where(fresh, new, old)
    return dx, jax.lax.dynamic_update_slice_in_dim(dw, new, blk.start, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def distill_xla(x, w, xt, wt, ids, opts: Options):
    return _fwd(x, w, xt, wt, ids, opts)[0]


def _fwd(x, w, xt, wt, ids, opts):
    cdt = _numerics.compute_dtype(jnp.promote_types(x.dtype, xt.dtype))
    loss, saved = _forward(x, w, xt, wt, ids, opts, cdt)
    return loss, (x, w, xt, wt, ids, saved)


def _bwd(opts: Options, res, g):
    x, w, xt, wt, ids, s = res
    cdt = _numerics.compute_dtype(jnp.promote_types(x.dtype, xt.dtype))
    g = _numerics.materialised(g, jnp.zeros(x.shape[:1], cdt))
    n, v = x.shape[0], _classes(w, opts.vd)
    c, offset = class_block(n, v, opts.block_size), _offset(v, opts.axis_name)

    def step(k, carry):
        dx, dw, dxt, dwt = carry
        blk = _block(k, c, v, offset)
        h = _heads(x, w, xt, wt, blk, c, opts, cdt)
        lp = _log_probs(h, s.student, s.teacher, opts)
        ds, dt = _logit_gradients(h, lp, s, g, ids, blk, opts)
        dx_blk, dw = _grad_block(x, w, dw, ds, blk, c, opts, cdt)
        if dt is not None:
            dxt_blk, dwt = _grad_block(xt, wt, dwt, dt, blk, c, opts, cdt)
            dxt = dxt + dxt_blk
        return dx + dx_blk, dw, dxt, dwt

    def zeros(a, dtype):
        return _sharding.zeros(a.shape, dtype, x, w, xt, wt)

    # Without teacher_grad the teacher's cotangents are None (zero), never
    # a W-sized array of zeros.
    teacher = (
        (zeros(xt, cdt), zeros(wt, wt.dtype)) if opts.teacher_grad else (None, None)
    )
    carry = (zeros(x, cdt), zeros(w, w.dtype), *teacher)
    cts = _for_blocks(v, c, step, carry)
    out = [
        None if ct is None else _sharding.cotangent(ct, p)
        for ct, p in zip(cts, (x, w, xt, wt), strict=True)
    ]
    return (*out, None)


distill_xla.defvjp(_fwd, _bwd)


@_registry.register("distillation", "xla")
def distillation(x, w, xt, wt, ids, opts: Options):
    return distill_xla(x, w, xt, wt, ids, opts)
