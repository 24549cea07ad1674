"""Contrastive losses: blockwise (xent_jax) against materialising the ``[N, N]``
similarity matrix, value_and_grad w.r.t. ``a``, ``b``, the scale (and bias).

Two tables:

* compiled temporary memory (``memory_analysis()``, compile only, nothing is
  allocated) at growing ``N``: materialising is quadratic in ``N``, the
  blockwise loss linear;
* median time of the compiled steps in one process, called in rotating order
  (``_timing.median_times``), with the ratio to materialising and to the
  matmuls alone (``a bᵀ``, then the two products of an ``[N, N]`` gradient
  with ``b`` and ``a``: three GEMMs, what materialising must do; the blockwise
  loss recomputes the first, four).

The materialised baselines: open_clip's ``ClipLoss`` (optax's integer-label
cross-entropy of the logits and of their transpose, averaged) and
big_vision's sigmoid loss (``-mean(sum(log_sigmoid(z * logits), -1))``).

Run: ``python benchmarks/bench_contrastive.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import load_average, median_times, temp_mib  # benchmarks/_timing.py

from xent_jax import clip_loss, siglip_loss


def materialised_clip(a, b, scale):
    logits = scale * jnp.dot(a, b.T, preferred_element_type=jnp.float32)
    labels = jnp.arange(a.shape[0])
    ce = optax.losses.softmax_cross_entropy_with_integer_labels
    return 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())


def materialised_siglip(a, b, scale, bias):
    logits = scale * jnp.dot(a, b.T, preferred_element_type=jnp.float32) + bias
    z = 2 * jnp.eye(a.shape[0]) - 1
    return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(z * logits), axis=-1))


def losses(name: str) -> dict:
    if name == "clip":
        return {"xent": clip_loss, "materialised": materialised_clip}
    return {"xent": siglip_loss, "materialised": materialised_siglip}


def floor(a, b, *_):
    """The three GEMMs of the materialised value_and_grad."""
    s = jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(a.dtype)
    return jnp.dot(s, b), jnp.dot(s.T, a)


def step(loss, name: str):
    nums = (0, 1, 2) if name == "clip" else (0, 1, 2, 3)
    return jax.jit(jax.value_and_grad(loss, argnums=nums))


def specs(name: str, n: int, d: int, dtype):
    emb = jax.ShapeDtypeStruct((n, d), dtype)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return (emb, emb, scalar) + ((scalar,) if name == "siglip" else ())


def inputs(name: str, n: int, d: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)

    def unit(shape):
        v = rng.normal(size=shape)
        return jnp.asarray(v / np.linalg.norm(v, axis=-1, keepdims=True), dtype)

    extra = (jnp.float32(10.0),) + ((jnp.float32(-10.0),) if name == "siglip" else ())
    return (unit((n, d)), unit((n, d))) + extra


def memory_table(ns, d: int, dtype) -> None:
    print(f"\n### Compiled temp MiB, D={d}, {jnp.dtype(dtype).name}")
    print("\n| loss | N | materialised | xent | xent / materialised |")
    print("|---|---|---|---|---|")
    for name in ("clip", "siglip"):
        for n in ns:
            args = specs(name, n, d, dtype)
            x, m = (temp_mib(step(f, name), args) for f in losses(name).values())
            print(f"| {name} | {n} | {m:.1f} | {x:.1f} | {x / m:.4f} |")
    sys.stdout.flush()


def time_table(shapes, dtypes, repeats: int) -> None:
    print(
        "\n### value_and_grad, median ms (rotating order), "
        "load average " + load_average()
    )
    print(
        "\n| loss | N x D | dtype | materialised | xent | 3-GEMM floor | "
        "xent / materialised | xent / floor |\n|---|---|---|---|---|---|---|---|"
    )
    for name in ("clip", "siglip"):
        for n, d in shapes:
            for dtype in dtypes:
                args = inputs(name, n, d, dtype)
                fns = {k: step(f, name) for k, f in losses(name).items()}
                fns["floor"] = jax.jit(floor)
                t = median_times(fns, {k: args for k in fns}, repeats)
                x, m, f = (1e3 * t[k] for k in ("xent", "materialised", "floor"))
                print(
                    f"| {name} | {n}x{d} | {jnp.dtype(dtype).name} | {m:.1f} | {x:.1f}"
                    f" | {f:.1f} | {x / m:.2f} | {x / f:.2f} |"
                )
                sys.stdout.flush()
    print("\nload average after: " + load_average())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if args.quick:
        memory_table([1024, 2048], 128, jnp.float32)
        time_table([(1024, 128)], [jnp.float32], args.repeats)
        return
    for dtype in (jnp.bfloat16, jnp.float32):
        memory_table([4096, 8192, 16384, 32768], 768, dtype)
    time_table([(4096, 256), (8192, 512)], [jnp.float32, jnp.bfloat16], args.repeats)


if __name__ == "__main__":
    main()
