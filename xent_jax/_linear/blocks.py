r"""The blockwise kernel's phases, each a pure function of one block.

A block is ``nt`` tokens by ``c`` classes. The forward pass folds each block's
logits into per-row running statistics (:func:`forward_step`, an online
log-sum-exp in shifted coordinates, see ``_stats``); the backward pass turns a
block's logits into their gradient (:func:`logits_gradient`) and accumulates
its products with ``x`` and ``w`` (:func:`accumulate`). Each phase is tested
alone against plain ``jnp`` on one block (``tests/test_linear_blocks.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _stats
from xent_jax._options import SoftmaxOptions


def dot(a, b, contract, cdt):
    """``a . b`` contracting ``contract`` with ``cdt`` accumulation. 16-bit
    operands go to the matmul as they are, except on CPU, where XLA's 16-bit
    GEMM runs far below its float32 rate (no bfloat16 instructions on AVX2
    machines; measured in ``benchmarks/bench_linear.py``'s GEMM table): there
    the blocks are cast to ``cdt`` first (block-sized, never all of ``w``)."""

    def native(a, b):
        dims = (contract, ((), ()))
        return jax.lax.dot_general(a, b, dims, preferred_element_type=cdt)

    if a.dtype == cdt and b.dtype == cdt:
        return native(a, b)

    def cpu(a, b):
        return native(a.astype(cdt), b.astype(cdt))

    return jax.lax.platform_dependent(a, b, cpu=cpu, default=native)


def divides_inputs(opts: SoftmaxOptions) -> bool:
    """Whether the temperature divides ``x`` and the bias before the matmul
    rather than the logits after it (without a soft cap; see ``logits``)."""
    return opts.temperature is not None and opts.logit_softcap is None


def _temperature_parts(temperature: float) -> tuple[float, float]:
    """``T = m / s``, ``m`` in ``[1, 2)`` and ``s`` a power of two."""
    mantissa, exponent = math.frexp(temperature)  # T = mantissa 2^exponent
    return 2 * mantissa, 2.0 ** (1 - exponent)


def divided_input(v, opts: SoftmaxOptions):
    """``x`` (or the bias) divided, where ``divides_inputs``, by the part of
    ``T`` in ``[1, 2)``: that only shrinks it, so no product of the matmul
    overflows where the logit does not (a divided ``x`` of ``2^127`` at ``T =
    2^-126`` did, issue 28's campaign). ``capped`` multiplies by the rest, a
    power of two, exactly."""
    return v / _temperature_parts(opts.temperature)[0]


def logits(xb, wb, bb, opts: SoftmaxOptions, rows: bool, cdt):
    """The logits of a block: ``cap((xb @ wb + bb) / T)`` for ``xb`` [nt, D],
    ``wb`` [D, c] (``wb`` [c, D] when ``rows``) and the bias ``bb`` [c].

    The operands are multiplied in their own dtype with ``cdt`` (float32 for
    16-bit inputs) accumulation; only the block is ever cast.
    """
    op = jnp.promote_types(xb.dtype, wb.dtype)
    bias = None if bb is None else bb.astype(cdt)
    if divides_inputs(opts):
        # Divide x (in cdt), not the logits: XLA turns "/ T" into "* (1/T)",
        # and LLVM contracts that multiply with the shift's subtraction into
        # an FMA in some fusions and not others, so at |z| ~ 1e30 the block
        # max and exp(z - max) saw logits a rounding apart: exp(+-1e23), an
        # inf or zero sum. The multiply left in the chain is by a power of
        # two, exact, so every fusion rounds z alike. (Capped logits are
        # bounded: harmless there.)
        xb = divided_input(xb.astype(cdt), opts)
        if bias is not None:
            bias = divided_input(bias, opts)
        op = jnp.promote_types(cdt, wb.dtype)
    raw = dot(xb.astype(op), wb.astype(op), ((1,), (1 if rows else 0,)), cdt)
    return capped(raw, bias, opts)


def capped(raw, bias, opts: SoftmaxOptions):
    """``cap((raw + bias) / T)`` from a block's matmul ``raw``; only ``(raw +
    bias) s`` where ``divides_inputs`` (``x`` and ``bias`` were divided by the
    rest of ``T`` before the matmul, see ``divided_input``). The Pallas
    kernels' logits too, so that every kernel rounds them alike."""
    if bias is not None:
        raw = raw + bias
    if divides_inputs(opts):
        scale = _temperature_parts(opts.temperature)[1]
        return raw if scale == 1 else raw * scale
    raw = _numerics.tempered(raw, opts.temperature)
    if opts.logit_softcap is None:
        return raw
    s = opts.logit_softcap
    return s * jnp.tanh(raw / s)


class RowStats(NamedTuple):
    """Per-row running statistics of the forward pass (each ``[nt]``)."""

    online: _stats.Online  # running max and sum of exponentials
    label_logit: jax.Array  # z_y, exactly (0 where the label is not here)
    smooth_xs: jax.Array  # sum_c u_c (z_c - shift) / 2: _stats.half_shifted
    sum_exs: jax.Array | None = None  # sum_c e_c (z_c - shift): the entropy
    best_id: jax.Array | None = None  # the argmax so far (its value: row_max)


def init(n, cdt, aux: bool) -> RowStats:
    zeros = jnp.zeros((n,), cdt)
    st = RowStats(_stats.online_init((n,), cdt), zeros, zeros)
    if aux:
        st = st._replace(sum_exs=zeros, best_id=jnp.zeros((n,), jnp.int32))
    return st


def forward_step(st: RowStats, z, ids, label_at, u=None, u_seen=None) -> RowStats:
    """``st`` updated with a block of logits ``z`` [nt, c] (``-inf`` on
    padding columns) of the classes ``ids`` [c] (increasing).

    ``label_at`` [nt] is each row's label column in the block, ``c`` where the
    block does not hold it (``layout.block_positions``): the label's logit is
    gathered, where a masked sum over the block made XLA CPU write and read a
    block-sized array. Under label smoothing ``u`` [c]
    holds the columns' smoothing targets (``a / V`` times the class weights,
    0 on padding) and ``u_seen`` their sum over the columns already folded
    in, with which ``smooth_xs`` follows the shift as it moves.
    """
    block_max = jnp.max(z, axis=1)
    online = _stats.online_update(
        st.online,
        block_max,
        lambda shift: jnp.sum(jnp.exp(z - shift[:, None]), axis=1),
    )
    label_z = jnp.take_along_axis(
        z, label_at[:, None], axis=1, mode="fill", fill_value=0
    )[:, 0]
    label_logit = st.label_logit + label_z
    shift_old = _stats.shift_of(st.online.row_max)
    shift = _stats.shift_of(online.row_max)
    zs = z - shift[:, None]
    smooth_xs = st.smooth_xs
    if u is not None:
        moved = _numerics.weighted(u_seen, _stats.half_shifted(shift_old, shift))
        zh = _stats.half_shifted(z, shift[:, None])
        smooth_xs = smooth_xs + moved + jnp.sum(_numerics.weighted(u, zh), axis=1)
    new = RowStats(online, label_logit, smooth_xs)
    if st.sum_exs is None:
        return new
    moment = _stats.rescaled_moment(st.sum_exs, st.online.sum_exp, shift_old, shift)
    exs = _numerics.weighted(jnp.exp(zs), zs)
    block_id = ids[jnp.argmax(z, axis=1)]
    wins = _stats.first_wins(block_max, block_id, st.online.row_max, st.best_id)
    return new._replace(
        sum_exs=moment + jnp.sum(exs, axis=1),
        best_id=jnp.where(wins, block_id, st.best_id),
    )


class BlockCoefficients(NamedTuple):
    """Per-row coefficients ``[nt]`` of a block's logits gradient."""

    softmax: jax.Array  # of p
    onehot: jax.Array | None  # of onehot(y); None: applied elsewhere (filter)
    smoothing: jax.Array | None  # of the smoothing weights u
    entropy: jax.Array | None  # g_H, of -p (log p + H)
    entropy_value: jax.Array | None  # H


def logits_gradient(z, zs, p, log_se, hit, c: BlockCoefficients, u, opts):
    """``d loss / d x@w+b`` of a block: ``c.softmax p - c.onehot onehot -
    c.smoothing u - c.entropy p (log p + H)`` per row, times the soft cap's
    derivative ``1 - (z / s)^2`` (from the finite, unmasked capped logits
    ``z``) and ``1 / T``.

    ``zs`` are the shifted logits (``-inf`` on padding), ``p`` their softmax
    and ``log_se`` [nt] its log-normaliser, so ``log p = zs - log_se``.
    """
    dz = _stats.softmax_part(c.softmax, p)
    if c.onehot is not None:
        dz = dz - jnp.where(hit, c.onehot[:, None], 0)
    if c.smoothing is not None:
        dz = dz - c.smoothing[:, None] * u
    if c.entropy is not None:
        log_p = zs - log_se[:, None]
        d_log_p = _numerics.weighted(p, log_p + c.entropy_value[:, None])
        dz = dz - _stats.softmax_part(c.entropy, d_log_p)
    if opts.logit_softcap is not None:
        # weighted: an unscored row (dz = 0) stays 0 even where z is NaN
        dz = _numerics.weighted(dz, 1 - jnp.square(z / opts.logit_softcap))
    return _numerics.tempered(dz, opts.temperature)  # d(r / T) / dr = 1 / T


def accumulate(dx_rows, dw_acc, db_acc, xb, wb, dz, rows: bool, cdt):
    """A block's share of the gradients: ``dx_rows + dz @ w_bᵀ``,
    ``dw_acc + x_bᵀ dz`` (``dzᵀ x_b`` when ``rows``), ``db_acc + sum dz``.

    The products run in the inputs' dtype with ``cdt`` accumulation; ``None``
    accumulators are skipped (nothing asked for that gradient).
    """
    op = jnp.promote_types(xb.dtype, wb.dtype)
    dzo = dz.astype(op)
    if dx_rows is not None:
        dx_rows = dx_rows + dot(dzo, wb.astype(op), ((1,), (0 if rows else 1,)), cdt)
    if dw_acc is not None:
        lhs, rhs = (dzo, xb.astype(op)) if rows else (xb.astype(op), dzo)
        dw_acc = dw_acc + dot(lhs, rhs, ((0,), (0,)), cdt)
    if db_acc is not None:
        db_acc = db_acc + jnp.sum(dz, axis=0)
    return dx_rows, dw_acc, db_acc
