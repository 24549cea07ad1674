"""Fused distillation (xent_jax) against materialising both heads' logits:
value_and_grad of the mean loss w.r.t. the student's ``x`` and ``w`` (the
teacher frozen), forward KL at T = 2 with a hard-label term (alpha = 0.5).

Two tables:

* compiled temporary memory (``memory_analysis()``, compile only) at the
  issue's shape (N = 8192, D = 2304, V = 256000, student and teacher alike)
  and as V grows: flat for the fused loss, linear for materialising;
* median time of the compiled steps in one process, called in rotating order
  (``_timing.median_times``), with the ratio to materialising and to the
  matmuls alone (both heads' logits, then the student's ``dx`` and ``dW``:
  the four products materialising must do; the fused loss does six, both
  heads' logits forward and again backward, plus the student's gradients).

The materialised baseline: optax's ``kl_divergence`` of the student's
log-softmax against the teacher's softmax, times ``T**2``, plus optax's
integer-label cross-entropy.

Run: ``python benchmarks/bench_distillation.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import load_average, median_times, temp_mib  # benchmarks/_timing.py

from xent_jax import linear_distillation_loss

T, ALPHA = 2.0, 0.5


def fused(x, w, xt, wt, y):
    return linear_distillation_loss(x, w, xt, wt, y, temperature=T, alpha=ALPHA)


def materialised(x, w, xt, wt, y):
    zs = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    zt = jax.lax.stop_gradient(jnp.matmul(xt, wt, preferred_element_type=jnp.float32))
    kl = optax.losses.kl_divergence(jax.nn.log_softmax(zs / T), jax.nn.softmax(zt / T))
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(zs, y)
    return jnp.mean(ALPHA * ce + (1 - ALPHA) * T**2 * kl)


def floor(x, w, xt, wt, y):
    """The four products of the materialised step."""
    del y
    zs = jnp.matmul(x, w)
    zt = jnp.matmul(xt, wt)
    g = zs + zt
    return jnp.matmul(g, w.T), jnp.matmul(x.T, g)


LOSSES = {"xent": fused, "materialised": materialised}


def step(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def specs(n, d, v, dtype):
    f = jax.ShapeDtypeStruct
    return (
        f((n, d), dtype),
        f((d, v), dtype),
        f((n, d), dtype),
        f((d, v), dtype),
        f((n,), jnp.int32),
    )


def memory_table(shapes, dtype) -> None:
    print(f"\n### Compiled temp MiB, {jnp.dtype(dtype).name}")
    print("\n| N x D x V | materialised | xent | xent / materialised |")
    print("|---|---|---|---|")
    for n, d, v in shapes:
        args = specs(n, d, v, dtype)
        x, m = (temp_mib(step(f), args) for f in LOSSES.values())
        print(f"| {n}x{d}x{v} | {m:.0f} | {x:.1f} | {x / m:.4f} |")
        sys.stdout.flush()


def inputs(n, d, v, dtype, seed=0):
    rng = np.random.default_rng(seed)

    def arr(*shape, std=1.0):
        return jnp.asarray(std * rng.normal(size=shape), dtype)

    return (
        arr(n, d, std=d**-0.5),
        arr(d, v),
        arr(n, d, std=d**-0.5),
        arr(d, v),
        jnp.asarray(rng.integers(0, v, n), jnp.int32),
    )


def time_table(shapes, dtypes, repeats: int) -> None:
    load = load_average()
    print(f"\n### value_and_grad, median ms (rotating order), load average {load}")
    print(
        "\n| N x D x V | dtype | materialised | xent | 4-GEMM floor | "
        "xent / materialised | xent / floor |\n|---|---|---|---|---|---|---|"
    )
    for n, d, v in shapes:
        for dtype in dtypes:
            args = inputs(n, d, v, dtype)
            fns = {k: step(f) for k, f in LOSSES.items()}
            fns["floor"] = jax.jit(floor)
            t = median_times(fns, {k: args for k in fns}, repeats)
            x, m, f = (1e3 * t[k] for k in ("xent", "materialised", "floor"))
            print(
                f"| {n}x{d}x{v} | {jnp.dtype(dtype).name} | {m:.1f} | {x:.1f} | "
                f"{f:.1f} | {x / m:.2f} | {x / f:.2f} |"
            )
            sys.stdout.flush()
    print(f"\nload average after: {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if args.quick:
        memory_table([(256, 64, 4096)], jnp.float32)
        time_table([(256, 64, 4096)], [jnp.float32], args.repeats)
        return
    for dtype in (jnp.bfloat16, jnp.float32):
        memory_table(
            [(8192, 2304, 256000), (2048, 512, 32768), (2048, 512, 131072)], dtype
        )
    time_table(
        [(2048, 512, 32768), (1024, 256, 131072)],
        [jnp.float32, jnp.bfloat16],
        args.repeats,
    )


if __name__ == "__main__":
    main()
