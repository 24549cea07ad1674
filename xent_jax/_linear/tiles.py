"""Block sizes of the Pallas kernels: one small table per platform.

A Pallas kernel's tiles are static and hardware-shaped, unlike the XLA loop's
``block_size`` (which the Pallas kernels ignore: their results do not depend
on tiles beyond float round-off). The table gives the defaults; the functions
below only shrink them to the problem (and, on TPU, to the VMEM budget), never
break the hardware's rules, which are written beside each entry.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Tiles:
    token: int  # rows of x per tile
    vocab: int  # classes per tile
    depth: int = 0  # Triton: the slice of D each tl.dot takes (0: all of D)
    num_warps: int = 4  # Triton launch parameters
    num_stages: int = 2
    programs: int = 1  # Triton forward: split V until the grid has this many


TILES: dict[str, Tiles] = {
    # TPU (Mosaic). The last two dims of every block must be multiples of
    # (8, 128) for 32-bit operands and (16, 128) for 16-bit ones (a vreg is
    # 8 sublanes x 128 lanes, 16-bit values pack two rows per sublane), or
    # equal the array's dims; 256 x 512 feeds the 128x128 (v5e) and 256x256
    # (v6e, v7x) MXUs whole tiles. Each block holds all of D: x's (token, D)
    # and w's (D, vocab) tiles are double-buffered, plus the f32 accumulators
    # (dx (token, D), dw (D, vocab)) and a few (token, vocab) f32 temporaries;
    # ``tpu_tiles`` halves the vocabulary tile, then the token tile, until
    # that fits TPU_VMEM_BUDGET (D = 4096 in bf16 fits at 256 x 512: ~32 MiB).
    # Compiled deviceless for v5e and v6e (tests/test_deviceless.py, run in
    # CI) at both benchmark shapes and a ragged one, bf16 and f32.
    "tpu": Tiles(token=256, vocab=512),
    # Triton (GPU). Block dims must be powers of two (Triton tensors), and
    # tl.dot needs at least 16 in each of M, N, K. Tile-sized values (token x
    # vocab f32: logits, p, dz) live in registers, 64 a thread each at 128 x
    # 128 over 8 warps, a few of them at once. Shared memory holds
    # num_stages x (token x depth + depth x vocab) operand slices: 96 KiB at
    # depth 64 in bf16 (the depth is halved for 32-bit operands, see
    # ``triton_tiles``); compiled for sm_90 with Triton 3.9 the forward kernel
    # takes 96 KiB, the backward 160 KiB (f32 at depth 64 took 288 KiB, over
    # the 227 KiB an H100 block may have); ptxas gives both kernels 255
    # registers a thread, without spills but for the backward kernel with
    # every option (entropy, smoothing, soft cap: 488 bytes). The forward
    # pass splits the vocabulary until the grid has >= 4 programs per SM of
    # an H100 (132 SMs).
    "triton": Tiles(
        token=128, vocab=128, depth=64, num_warps=8, num_stages=3, programs=528
    ),
}

# Scoped VMEM requested by the TPU kernels, and what the tiles may use of it.
# v5e/v6e have 128 MiB of VMEM per core, v7x 64 MiB; the default scoped limit
# (16 or 32 MiB) is too small for D = 4096 at the default tiles.
TPU_VMEM_LIMIT = 48 * 2**20
TPU_VMEM_BUDGET = 40 * 2**20


def _aligned(size: int, limit: int, quantum: int) -> int:
    """``limit`` clipped to ``size``: the whole dim when that is smaller,
    else a multiple of ``quantum`` (at least one)."""
    if size <= limit:
        return size
    return max(quantum, limit // quantum * quantum)


def tpu_vmem_bytes(tn: int, tv: int, d: int, itemsize: int) -> int:
    """An upper estimate of the largest TPU kernel's VMEM (the dw kernel's
    or the dx kernel's, whichever is larger)."""
    operands = 2 * (tn * d + d * tv) * itemsize  # double-buffered x, w tiles
    temps = 8 * tn * tv * 4  # logits, p, dz, masks in f32
    dx = 2 * tn * d * 4  # the dx kernel's f32 output block, double-buffered
    dw = d * tv * 4 + 2 * d * tv * itemsize  # f32 accumulator + output block
    return operands + temps + max(dx, dw)


def tpu_tiles(n: int, v: int, d: int, x_bytes: int, w_bytes: int) -> tuple[int, int]:
    """``(token, vocab)`` tiles for ``n`` tokens, ``v`` classes, depth ``d``
    and ``x``, ``w`` of ``x_bytes``, ``w_bytes`` per element. The token tile
    is x's sublane dim (the vocabulary tile is a lane dim, or in the row
    layout a sublane dim of w, where 128 is a multiple of 8 and 16)."""
    t = TILES["tpu"]
    sublanes = 8 * max(1, 4 // x_bytes)
    itemsize = max(x_bytes, w_bytes)
    tn, tv = _aligned(n, t.token, sublanes), _aligned(v, t.vocab, 128)
    while tpu_vmem_bytes(tn, tv, d, itemsize) > TPU_VMEM_BUDGET:
        if tv > 128 and tv % 256 == 0:
            tv //= 2
        elif tn > sublanes and tn % (2 * sublanes) == 0:
            tn //= 2
        else:
            break  # the smallest legal tiles; the compiler has the last word
    return tn, tv


def _pow2(size: int, limit: int) -> int:
    """The power of two ``limit`` (itself one), shrunk to cover ``size``
    without waste, at least 16 (tl.dot's minimum)."""
    return max(16, min(limit, 1 << max(0, math.ceil(math.log2(max(size, 1))))))


def triton_tiles(n: int, v: int, d: int, itemsize: int) -> tuple[int, int, int, int]:
    """``(token, vocab, depth, splits)`` for the Triton kernels and operands
    of ``itemsize`` bytes: the forward pass runs ``splits`` programs per
    token tile, each on a contiguous range of vocabulary tiles."""
    t = TILES["triton"]
    for size in (t.token, t.vocab, t.depth):
        if size < 16 or size & (size - 1):
            raise ValueError(f"Triton tiles must be powers of two >= 16; got {t}")
    depth = max(16, t.depth * 2 // max(2, itemsize))  # same bytes per slice
    tn, tv, td = _pow2(n, t.token), _pow2(v, t.vocab), _pow2(d, depth)
    token_tiles, vocab_tiles = -(-n // tn), -(-v // tv)
    splits = min(vocab_tiles, max(1, -(-t.programs // token_tiles)))
    per_split = -(-vocab_tiles // splits)
    return tn, tv, td, -(-vocab_tiles // per_split)
