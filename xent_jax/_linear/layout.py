"""How the blockwise kernel cuts and walks its operands.

Vocabulary layout. ``w`` is viewed (without a copy) as ``[D, G, V / G]``:
``G`` equal contiguous groups of classes, and each step of the vocabulary loop
takes the same column range of every group. The loop therefore never slices
the group axis, so under ``jax.jit`` with ``w`` sharded on ``V`` over a number
of devices that divides ``G`` (``G = 8`` when 8 divides ``V``) the sharding
lands on that axis and XLA partitions the loop without gathering ``w``. A
class's global id is ``offset + g * V / G + column``. Where no sharding can
split ``w`` unseen (one device, a ``shard_map`` over every mesh axis, Explicit
mesh axes: ``_sharding.vocab_may_be_split``) there is one group: under the
TPU's tiled layouts the ``[D, G, V / G]`` view is no bitcast, and XLA:TPU
would copy ``w`` into it and ``dw`` out of it (1162 MiB at Gemma-2's head in
bfloat16; 37 MiB of temporaries with one group).

Row layout. A tied embedding is ``[V, D]``; slicing columns of its transpose
would make XLA CPU copy it (and its gradient) once, so the kernel also runs on
``w`` ``[V, D]`` directly (``Layout.rows``), viewed as ``[G, V / G, D]``.

XLA CPU notes (each measured with ``memory_analysis()``): 16-bit operands of a
loop's slices are upcast by XLA CPU, and the upcast of a loop-invariant ``w``
would be hoisted into a float32 copy of all of ``w``; see :func:`block`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _compat, _sharding

# Default block sizes, tuned on a 2-core CPU (benchmarks/bench_linear.py): a
# block of logits should stay cache-friendly while each matmul stays large
# enough to run at full speed.
DEFAULT_VOCAB_BLOCK = 1024
# Upper bound on the elements of one [token_block, vocab_block] block of logits.
DEFAULT_BLOCK_ELEMENTS = 1024 * 2048
# Budget of the default blocks' temporaries (see ``block_bytes``): at large D
# the [token_block, D] and [D, vocab_block] blocks, not the logits, dominate
# (71 MiB at D = 2304 with the blocks above), so the default blocks shrink
# until they fit. The tuned blocks of D <= 512 fit and stay as they are.
DEFAULT_BLOCK_BYTES = 24 * 2**20
# Vocabulary groups processed side by side; the largest that divides V is used.
GROUP_CHOICES = (8, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape decisions of the blockwise kernel."""

    token_block: Any  # an int, or the (symbolic) token count: one block
    vocab_block: int  # columns per group per step
    groups: int
    rows: bool  # w is [V, D] (a tied embedding), else [D, V]
    padded: bool  # some columns (on some shard) are padding, past num_classes
    # The scored rows come first and only their token blocks run (see
    # ``for_blocks``'s ``active``; api.skip_unscored).
    skip_unscored: bool = False


# With ``skip_unscored`` the token blocks are at most 1/SKIP_TOKEN_BLOCKS of the
# rows (the rows skipped count in quarters), but at least SKIP_MIN_TOKEN_BLOCK
# rows. Measured at 2048 x 512 x 32768 in float32 (docs/fused.md): quarters
# took 1.03x the default's time with every row scored and 0.55x / 0.31x at 50% /
# 75% unscored; eighths 1.08x, 0.58x, 0.32x; blocks of 128 rows were slower
# (1.21x at 1024 x 256 x 131072).
SKIP_TOKEN_BLOCKS = 4
SKIP_MIN_TOKEN_BLOCK = 256


def choose(
    block_size,
    n: Any,
    v: int,
    d: int,
    rows: bool,
    padded: bool,
    skip_unscored: bool = False,
    grouped_view: bool | None = None,
) -> Layout:
    """The layout for ``n`` tokens, ``v`` classes here and depth ``d``, from
    ``block_size`` (validated: ``None``, an int or ``(token_block,
    vocab_block)``).

    Without a token block, tokens are blocked so that one block of logits has
    at most ``DEFAULT_BLOCK_ELEMENTS`` entries, then the blocks not given are
    halved until their temporaries fit ``DEFAULT_BLOCK_BYTES``
    (:func:`fit_budget`). A symbolic token count (``jax.export``) is one token
    block: loops need static block shapes. ``grouped_view`` (default: whether
    a sharding may split the vocabulary, ``_sharding.vocab_may_be_split``)
    allows more than one vocabulary group.
    """
    if grouped_view is None:
        grouped_view = _sharding.vocab_may_be_split()
    groups = next(g for g in GROUP_CHOICES if v % g == 0) if grouped_view else 1
    tb = None
    if block_size is None:
        vb = DEFAULT_VOCAB_BLOCK
    elif isinstance(block_size, int):
        vb = block_size
    else:
        tb, vb = block_size
    cols = max(1, min(vb, v) // groups) * groups
    if not _compat.is_static(n):
        return Layout(n, cols // groups, groups, rows, padded, skip_unscored)
    if tb is None:
        tb = max(1, min(DEFAULT_BLOCK_ELEMENTS // cols, n))
        tb, cols = fit_budget(tb, cols, d, groups, block_size is None)
        if skip_unscored:
            tb, cols = _skipping_blocks(tb, cols, n, v, d, groups, block_size is None)
    tb = max(1, min(tb, n))
    return Layout(tb, cols // groups, groups, rows, padded, skip_unscored)


def _skipping_blocks(tb: int, cols: int, n: int, v: int, d: int, groups, vocab_free):
    """``(tb, cols)`` with the token block capped for ``skip_unscored`` and,
    where the vocabulary block is not given, the columns grown as far as the
    default blocks' temporaries (``block_bytes``) allow: with as many
    vocabulary steps as the default's, 4x as many token steps cost 1.07x its
    time at 1024 x 256 x 131072; 1.01x with blocks of 256 x 2048."""
    cap = max(SKIP_MIN_TOKEN_BLOCK, -(-n // SKIP_TOKEN_BLOCKS))
    if tb <= cap:
        return tb, cols
    budget = block_bytes(tb, cols, d)
    if vocab_free:
        cols = max(1, min(cols * (tb // cap), v) // groups) * groups
        while block_bytes(cap, cols, d) > budget and cols % (2 * groups) == 0:
            cols //= 2
    return cap, cols


def block_bytes(tb: int, cols: int, d: int) -> int:
    """An estimate of the blockwise kernel's temporaries on XLA CPU in
    float32, read off ``memory_analysis()`` buffer by buffer: two
    ``[tb, D]`` blocks of ``x`` (sliced, and the ``dx`` rows), three ``[D,
    cols]`` ones (the ``w`` block, the ``dw`` block and its product) and one
    ``[tb, cols]`` block of logits."""
    return 4 * (2 * tb * d + 3 * d * cols + tb * cols)


def fit_budget(tb: int, cols: int, d: int, groups: int, vocab_free: bool):
    """``(tb, cols)`` halved, the larger first (``cols`` only if
    ``vocab_free``, and never below one column per group), until
    ``block_bytes`` fits ``DEFAULT_BLOCK_BYTES`` or neither can shrink."""
    while block_bytes(tb, cols, d) > DEFAULT_BLOCK_BYTES:
        cols_can = vocab_free and cols % (2 * groups) == 0
        if cols_can and (cols > tb or tb == 1):
            cols //= 2
        elif tb > 1:
            tb = -(-tb // 2)
        else:
            break
    return tb, cols


class ScoredRows(NamedTuple):
    """The order in which a kernel visits the rows of ``x`` (``skip_unscored``):
    position ``i`` is row ``order[i]``, the scored rows first; positions from
    ``active`` on are unscored, and their token blocks do not run. The
    per-row vectors are in this order; ``x`` and ``dx`` stay in theirs and
    are gathered (``x_rows``) and scattered (``put_rows``) block by block, so
    that neither is copied whole."""

    order: jax.Array  # int32 [N], a permutation
    active: jax.Array  # int32 scalar: the scored rows


def x_rows(x, start, size: Any, rows: ScoredRows | None):
    """The rows of ``x`` at positions ``start:start+size`` (see ``block``)."""
    if rows is None:
        return block(x, start, size, 0)
    index = take(rows.order, start, size, 0)
    if _is_16bit(x):  # as in ``block``: no float32 copy of all of x
        x, index = jax.lax.optimization_barrier((x, index))
    return jnp.take(x, index, axis=0, mode="clip", unique_indices=True)


def put_rows(a, update, start, rows: ScoredRows | None):
    """``a`` with ``update`` at the positions ``start:`` (rows of ``a`` in
    ``rows``'s order where given)."""
    if rows is None:
        return put(a, update, start, 0)
    index = take(rows.order, start, update.shape[0], 0)
    return a.at[index].set(update, mode="clip", unique_indices=True)


def for_blocks(total: Any, block: Any, body, carry, active=None):
    """Runs ``body(start, size, carry)`` over ``[0, total)`` in blocks.

    Full blocks go through one ``fori_loop`` (traced ``start``, static
    ``size``); a remainder is one more static call, so no input is ever padded
    or copied to make ``total`` divisible by ``block``. Under ``shard_map``'s
    ``check_vma`` the carry must already vary over every axis the body's
    results vary over (see ``_sharding.varying_like``): loops and conds need
    equal types on every path.

    ``active`` (a traced count; ``None``: all): only the blocks holding one of
    the first ``active`` entries run, the loop's trip count computed at run
    time (a ``while_loop``; the kernels' gradients are their own, so nothing
    differentiates through it). None runs for ``active = 0`` (but a single
    block, ``block is total``, always runs).
    """
    if block is total:  # one (possibly symbolic) block
        return body(0, total, carry)
    n_full, rem = divmod(total, block)
    if active is not None:
        return _active_blocks(n_full, rem, block, body, carry, active)
    if n_full == 1:
        carry = body(0, block, carry)
    elif n_full > 1:
        carry = jax.lax.fori_loop(
            0, n_full, lambda i, c: body(i * block, block, c), carry
        )
    if rem:
        carry = body(n_full * block, rem, carry)
    return carry


def _active_blocks(n_full: int, rem: int, block: int, body, carry, active):
    trips = jnp.minimum(n_full, (active + block - 1) // block)
    if n_full:
        carry = jax.lax.fori_loop(
            0, trips, lambda i, c: body(i * block, block, c), carry
        )
    if rem:
        carry = jax.lax.cond(
            active > n_full * block,
            lambda c: body(n_full * block, rem, c),
            lambda c: c,
            carry,
        )
    return carry


def take(a, start, size: Any, axis: int):
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def put(a, update, start, axis: int):
    return jax.lax.dynamic_update_slice_in_dim(a, update, start, axis=axis)


def rows_of(v, t, nt):
    """Rows ``t:t+nt`` of a per-example vector, broadcastable to a block."""
    return take(v, t, nt, 0)[:, None]


def _is_16bit(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2


def block(a, start, size: Any, axis: int):
    """``size`` entries of a loop-invariant array from ``start`` along ``axis``.

    XLA CPU upcasts 16-bit float operands of slices to float32; on a
    loop-invariant operand that convert is hoisted out of the loop, i.e. a
    float32 copy of the whole of ``w`` (or ``x``). Tying the array to the
    loop-variant offset with a barrier keeps the conversion per block.
    """
    if _is_16bit(a):
        a, start = jax.lax.optimization_barrier((a, start))
    return take(a, start, size, axis)


def block_update(a, update, start, axis: int, dtype=None):
    """``dynamic_update_slice`` of a loop carry, in place; ``update`` is
    rounded to ``dtype`` (default: ``a``'s). A 16-bit float carry may be held
    as its raw bits (``a`` ``uint16``, ``dtype`` its float type): XLA CPU runs
    a 16-bit float update on a float32 copy of the whole carry, converted
    there and back on every step."""
    update = update.astype(a.dtype if dtype is None else dtype)
    if a.dtype == jnp.uint16 and update.dtype != jnp.uint16:
        update = raw_bits(update)
    return put(a, update, start, axis)


def raw_bits(a):
    """A 16-bit float array as ``uint16`` (others as they are): XLA CPU
    moves integers (updates, gathers, scatters) without the float32 round
    trip it gives 16-bit floats. ``from_raw_bits`` undoes it."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if _is_16bit(a) else a


def from_raw_bits(a, dtype):
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


class SplitFloat32(NamedTuple):
    """A float32 array held as the two 16-bit halves of its bits: an exact
    float32 accumulator whose high half has the size of the 16-bit result
    (``split``, ``rows``, ``put``, ``value``). A loop over blocks updates it
    as integers, which XLA CPU moves without the float32 round trip it gives
    a 16-bit float carry."""

    high: jax.Array  # uint16
    low: jax.Array  # uint16

    @classmethod
    def split(cls, a):
        bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32)
        return cls((bits >> 16).astype(jnp.uint16), bits.astype(jnp.uint16))

    def value(self):
        high = self.high.astype(jnp.uint32) << 16
        bits = high | self.low.astype(jnp.uint32)
        return jax.lax.bitcast_convert_type(bits, jnp.float32)

    def rounded(self, dtype, block: int):
        """The value rounded to the 16-bit ``dtype``, written over the high
        half ``block`` rows at a time (the high half's buffer is the result's)."""

        def step(t, nt, high):
            rows = SplitFloat32(high, self.low).rows(t, nt)
            return put(high, raw_bits(rows.astype(dtype)), t, 0)

        high = for_blocks(self.high.shape[0], block, step, self.high)
        return from_raw_bits(high, dtype)

    def rows(self, start, size: Any, order: ScoredRows | None = None):
        """Rows at positions ``start:start+size`` (in ``order`` where given)
        as float32."""
        return SplitFloat32(*(x_rows(h, start, size, order) for h in self)).value()

    def put(self, update, start, order: ScoredRows | None = None):
        """``update`` (float32) written over the rows at positions from
        ``start`` (in ``order`` where given)."""
        # Materialised (a cond's result) before either half is written: fused
        # into each half's update, it would read the other half after that
        # one's write, and XLA would copy both halves to keep the old values.
        # XLA CPU drops optimization barriers, and conds whose predicate is
        # constant or whose branches are the same: ``start`` is a loop index
        # (not batched under vmap), and either branch is right (x - 0 is x).
        after = jnp.asarray(start) >= 0
        update = jax.lax.cond(after, lambda u: u, lambda u: u - 0.0, update)
        halves = SplitFloat32.split(update)
        return SplitFloat32(
            *(put_rows(a, h, start, order) for a, h in zip(self, halves, strict=True))
        )


def grouped(a, groups: int):
    """``a`` [..., V] viewed as [..., G, V / G] (a bitcast); as is when G = 1.

    No size-1 group axis is added: XLA CPU copies a whole ``w`` to relayout
    one.
    """
    if groups == 1:
        return a
    return a.reshape(a.shape[:-1] + (groups, a.shape[-1] // groups))


def grouped_rows(a, groups: int):
    """``a`` [V, D] viewed as [G, V / G, D] (a bitcast); as is when G = 1."""
    if groups == 1:
        return a
    return a.reshape((groups, a.shape[0] // groups) + a.shape[1:])


class Views(NamedTuple):
    """Grouped views of the per-class operands."""

    w: jax.Array  # [D, (G,) L], or [(G,) L, D] in the row layout
    bias: jax.Array | None  # [(G,) L]
    class_weights: jax.Array | None  # [(G,) L]
    per_group: int  # L = V / G
    offset: Any  # global id of the first class held here


def views(w, bias, class_weights, layout: Layout, offset) -> Views:
    g = layout.groups
    v = w.shape[0] if layout.rows else w.shape[1]
    return Views(
        grouped_rows(w, g) if layout.rows else grouped(w, g),
        None if bias is None else grouped(bias, g),
        None if class_weights is None else grouped(class_weights, g),
        v // g,
        offset,
    )


def vocab_axis(a, layout: Layout) -> int:
    """The class axis of the grouped view of ``w`` (or of ``dw``)."""
    return a.ndim - 2 if layout.rows else a.ndim - 1


def w_block(vw: Views, s, cs: int, layout: Layout):
    """Classes ``s:s+cs`` of every group, flattened to [D, G cs] ([G cs, D] in
    the row layout): the dots stay 2-D (XLA CPU has no 16-bit kernel for some
    3-D dots)."""
    wb = block(vw.w, s, cs, vocab_axis(vw.w, layout))
    d = vw.w.shape[-1] if layout.rows else vw.w.shape[0]
    return wb.reshape(-1, d) if layout.rows else wb.reshape(d, -1)


def class_block(a, start, size: int):
    """Columns ``start:start+size`` of every group of a per-class vector,
    flattened (``None`` stays ``None``)."""
    return None if a is None else take(a, start, size, a.ndim - 1).reshape(-1)


def block_ids(vw: Views, start, size: int, groups: int):
    """Global class ids ``[G size]`` of a vocabulary block."""
    shape = (size,) if groups == 1 else (groups, size)
    j = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    ids = vw.offset + start + j
    if groups > 1:
        ids = ids + jax.lax.broadcasted_iota(jnp.int32, shape, 0) * vw.per_group
    return ids.reshape(-1)


def block_positions(vw: Views, ids, start, size: int, groups: int):
    """Each global id's index into a vocabulary block's ``[G size]`` columns
    (the inverse of :func:`block_ids`), ``G size`` where the block does not
    hold it: past the end, where ``mode="drop"`` and ``mode="fill"`` skip it."""
    local = ids - vw.offset
    group = local // vw.per_group
    column = local - group * vw.per_group - start
    held = (local >= 0) & (group < groups) & (column >= 0) & (column < size)
    return jnp.where(held, group * size + column, groups * size)
