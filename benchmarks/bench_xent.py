"""Benchmark of the core softmax cross-entropy against optax and a copy.

For ``jax.value_and_grad`` of the mean loss over integer labels it prints, per
shape and dtype, the median wall time of xent_jax, optax and a jitted
read+write pass over the logits (``logits * 2``, the memory-bound floor), their
ratios, and the compiled temporary memory (``memory_analysis()``) of both
losses in the setting ``loss(h @ w, y)``, where the logits are an
intermediate, relative to the logits' bytes; and, as the floor of that
setting, the temporary memory of a loss linear in the logits (whose gradient
needs no buffer of its own): what XLA keeps for the matmul itself (for 16-bit
inputs XLA CPU multiplies in float32, which alone exceeds the logits' bytes).

The same three timings are repeated with the logits donated
(``donate_argnums``, a fresh copy made untimed before each call), as when the
logits are an intermediate of a larger step: a function that can compute its
gradient in the logits' buffer then needs no new memory. On a CPU a fresh
output buffer is zero-filled by the kernel page by page (65,537 minor faults for
256 MiB), which is most of what "copy" measures without donation.

    python benchmarks/bench_xent.py            # the README's table
    python benchmarks/bench_xent.py --smoke    # tiny shapes, seconds (CI)

The machines are shared and noisy: the three timings are interleaved in a
rotating order, repeated and reduced to medians (see ``_timing.py``), and the
ratios are what to read.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from _timing import median_times  # benchmarks/_timing.py

import xent_jax

SHAPES = [(4096, 1024), (2048, 32768), (1024, 131072)]
SMOKE_SHAPES = [(64, 128), (32, 512)]
HIDDEN = 256  # D of the h @ w memory setting


def _losses():
    return {
        "xent": xent_jax.softmax_cross_entropy_with_integer_labels,
        "optax": optax.losses.softmax_cross_entropy_with_integer_labels,
    }


def _linear_loss(logits, labels):
    """A loss linear in the logits: the floor of the h @ w memory setting."""
    del labels
    return 1e-3 * jnp.sum(logits.astype(jnp.float32), axis=-1)


def temp_bytes(loss, n: int, c: int, dtype) -> int:
    """Compiled temporary memory of value_and_grad of loss(h @ w, y).mean()."""
    h = jax.ShapeDtypeStruct((n, HIDDEN), dtype)
    w = jax.ShapeDtypeStruct((HIDDEN, c), dtype)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def objective(h, w, y):
        return loss(h @ w, y).mean()

    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    return step.lower(h, w, y).compile().memory_analysis().temp_size_in_bytes


NAMES = ("xent", "optax", "copy")


def _timed(logits, labels):
    """``(fns, args, fresh)`` for ``median_times``: each function as is and,
    as "<name> donated", with the logits donated and copied anew per call."""
    bodies = {
        name: jax.value_and_grad(lambda x, y, f=f: f(x, y).mean())
        for name, f in _losses().items()
    }
    bodies["copy"] = lambda x, y: x * 2
    fns = {}
    for name, f in bodies.items():
        fns[name] = jax.jit(f)
        fns[f"{name} donated"] = jax.jit(f, donate_argnums=0)
    args = dict.fromkeys(fns, (logits, labels))
    fresh = {f"{name} donated": lambda: (logits.copy(), labels) for name in NAMES}
    return fns, args, fresh


def run(shapes, dtypes, repeats: int) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for n, c in shapes:
            key_x, key_y = jax.random.split(jax.random.PRNGKey(0))
            logits = jax.random.normal(key_x, (n, c), jnp.float32).astype(dtype)
            labels = jax.random.randint(key_y, (n,), 0, c)
            fns, args, fresh = _timed(logits, labels)
            t = median_times(fns, args, repeats, fresh=fresh)
            logits_bytes = n * c * jnp.dtype(dtype).itemsize
            mem = {
                name: temp_bytes(f, n, c, dtype) / logits_bytes
                for name, f in {**_losses(), "linear": _linear_loss}.items()
            }
            rows.append(
                dict(
                    shape=f"{n}x{c}",
                    dtype=jnp.dtype(dtype).name,
                    xent_ms=t["xent"] * 1e3,
                    optax_ms=t["optax"] * 1e3,
                    copy_ms=t["copy"] * 1e3,
                    xent_over_optax=t["xent"] / t["optax"],
                    xent_over_copy=t["xent"] / t["copy"],
                    optax_over_copy=t["optax"] / t["copy"],
                    **{f"{k}_donated_ms": t[f"{k} donated"] * 1e3 for k in NAMES},
                    donated_xent_over_optax=t["xent donated"] / t["optax donated"],
                    xent_temp=mem["xent"],
                    optax_temp=mem["optax"],
                    linear_temp=mem["linear"],
                )
            )
            print_row(rows[-1], header=len(rows) == 1)
    return rows


def print_row(r: dict, header: bool) -> None:
    if header:
        print(
            "| N x C | dtype | xent ms | optax ms | copy ms | xent/optax "
            "| xent/copy | optax/copy | temp xent (x logits) | temp optax "
            "| temp linear-loss floor | donated: xent ms | optax ms | copy ms "
            "| xent/optax |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['shape']} | {r['dtype']} | {r['xent_ms']:.1f} | {r['optax_ms']:.1f} "
        f"| {r['copy_ms']:.1f} | {r['xent_over_optax']:.2f} "
        f"| {r['xent_over_copy']:.2f} | {r['optax_over_copy']:.2f} "
        f"| {r['xent_temp']:.2f} | {r['optax_temp']:.2f} | {r['linear_temp']:.2f} "
        f"| {r['xent_donated_ms']:.1f} | {r['optax_donated_ms']:.1f} "
        f"| {r['copy_donated_ms']:.1f} | {r['donated_xent_over_optax']:.2f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated dtypes"
    )
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]
    run(shapes, dtypes, 2 if args.smoke else args.repeats)


if __name__ == "__main__":
    main()
