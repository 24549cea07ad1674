"""Benchmark of the fused linear cross-entropy against materialised optax.

Two tables, for ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` of the
mean loss over integer labels, float32:

* memory: the compiled temporary memory (``memory_analysis()``, compile only,
  nothing runs) of ``xent_jax.linear_cross_entropy`` and of
  ``optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()``
  at N=8192, D=1024 for V in {32768, 131072, 262144}, with their ratio and the
  bytes of one float32 logits array for scale, and of the fused loss on a tied
  embedding ``emb`` [V, D] passed as ``emb.T`` (W's size if it were copied);
* time: the median wall time of both, and their ratio, at N=2048, D=512,
  V=32768 and N=1024, D=256, V=131072.

    python benchmarks/bench_linear.py            # the README's tables
    python benchmarks/bench_linear.py --smoke    # tiny shapes, seconds (CI)
    python benchmarks/bench_linear.py --block-size 1024,2048   # tuning

The machines are shared and noisy: timings are interleaved, repeated and
reduced to medians, and the ratios are what to read.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import median_times  # benchmarks/_timing.py

from xent_jax import linear_cross_entropy

MEMORY_SHAPES = [(8192, 1024, 32768), (8192, 1024, 131072), (8192, 1024, 262144)]
TIME_SHAPES = [(2048, 512, 32768), (1024, 256, 131072)]
SMOKE_MEMORY_SHAPES = [(256, 64, 1024), (256, 64, 4096)]
SMOKE_TIME_SHAPES = [(128, 32, 2048)]
MiB = 2**20


def _losses(block_size=None, filter_threshold=None) -> dict:
    def xent(x, w, y):
        return linear_cross_entropy(
            x, w, y, block_size=block_size, filter_threshold=filter_threshold
        )

    def optax_loss(x, w, y):
        return optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

    return {"xent": xent, "optax": optax_loss}


def _step(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def temp_bytes(loss, n: int, d: int, v: int, dtype=jnp.float32, tied=False) -> int:
    """Compiled temporary memory of value_and_grad(loss) w.r.t. (x, w); with
    ``tied``, ``loss`` gets ``emb`` [V, D] in place of ``w``."""
    x = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((v, d) if tied else (d, v), dtype)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    compiled = _step(loss).lower(x, w, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_table(shapes, block_size) -> list[dict]:
    rows = []
    print(
        "| N x D x V | logits MiB | xent temp MiB | optax temp MiB | optax/xent "
        "| W MiB | xent on emb.T temp MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, d, v in shapes:
        losses = _losses(block_size)
        mem = {name: temp_bytes(f, n, d, v) / MiB for name, f in losses.items()}
        tied = lambda x, e, y, f=losses["xent"]: f(x, e.T, y)  # noqa: E731
        mem["tied"] = temp_bytes(tied, n, d, v, tied=True) / MiB
        row = dict(shape=f"{n}x{d}x{v}", logits=n * v * 4 / MiB, **mem)
        rows.append(row)
        print(
            f"| {row['shape']} | {row['logits']:.0f} | {mem['xent']:.1f} "
            f"| {mem['optax']:.0f} | {mem['optax'] / mem['xent']:.0f} "
            f"| {d * v * 4 / MiB:.0f} | {mem['tied']:.1f} |",
            flush=True,
        )
    return rows


def time_table(shapes, block_size, filter_threshold, repeats: int) -> list[dict]:
    rows = []
    print(
        "| N x D x V | xent ms | optax ms | xent/optax "
        + ("| xent filtered ms | filtered/optax " if filter_threshold else "")
        + "|"
    )
    print("|---|---|---|---" + ("|---|---" if filter_threshold else "") + "|")
    for n, d, v in shapes:
        kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(kx, (n, d), jnp.float32)
        w = jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)
        y = jax.random.randint(ky, (n,), 0, v)
        fns = {name: _step(f) for name, f in _losses(block_size).items()}
        if filter_threshold:
            fns["filtered"] = _step(_losses(block_size, filter_threshold)["xent"])
        t = median_times(fns, {name: (x, w, y) for name in fns}, repeats)
        row = dict(shape=f"{n}x{d}x{v}", **{k: s * 1e3 for k, s in t.items()})
        rows.append(row)
        line = (
            f"| {row['shape']} | {row['xent']:.0f} | {row['optax']:.0f} "
            f"| {t['xent'] / t['optax']:.2f} "
        )
        if filter_threshold:
            line += f"| {row['filtered']:.0f} | {t['filtered'] / t['optax']:.2f} "
        print(line + "|", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--block-size",
        default=None,
        help="vocab block, or token_block,vocab_block (default: the package's)",
    )
    parser.add_argument(
        "--filter-threshold",
        type=float,
        default=None,
        help="also time gradient filtering at this threshold",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    args = parser.parse_args()
    block_size = None
    if args.block_size:
        parts = tuple(int(b) for b in args.block_size.split(","))
        block_size = parts[0] if len(parts) == 1 else parts
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if not args.skip_memory:
        shapes = SMOKE_MEMORY_SHAPES if args.smoke else MEMORY_SHAPES
        memory_table(shapes, block_size)
    if not args.skip_time:
        shapes = SMOKE_TIME_SHAPES if args.smoke else TIME_SHAPES
        repeats = 2 if args.smoke else args.repeats
        time_table(shapes, block_size, args.filter_threshold, repeats)


if __name__ == "__main__":
    main()
