"""Benchmark of the fused loss's implementations on a GPU or a TPU.

On the accelerator ``jax.default_backend()`` finds, for
``jax.jit(jax.value_and_grad(mean loss, argnums=(0, 1)))`` in bfloat16:

1. checks each implementation against ``implementation="reference"`` on a
   small ragged shape with every option (values and gradients);
2. prints, at language-model shapes, the median time (rotating order, see
   ``_timing.median_times``), the compiled temporary memory
   (``memory_analysis()``) and the device's peak memory
   (``memory_stats()``, where the backend has it; cumulative: the rows run in
   order of expected memory, smallest first) of materialised optax
   (``softmax_cross_entropy_with_integer_labels(x @ w, y).mean()``), the XLA
   blockwise loop and this platform's Pallas kernel, beside the peers'
   published numbers.

On a CPU it says that it needs an accelerator and exits 0. Without one,
``--aot v5e``, ``--aot v6e`` or ``--aot h100`` (with ``pip install
"jax[tpu,cuda12-local]==<jax's version>"``) compiles the same programs with
the real XLA:TPU (Mosaic) or XLA:GPU (Triton) compiler, deviceless
(``tests/deviceless.py``), for optax and every implementation in bfloat16 and
float32, and prints compile time, the compiled memory, the W-sized copies in
the optimised HLO and the compiler's cost (TPU only: the compile-only GPU
executable has none). Nothing runs, so nothing is timed.

    python benchmarks/bench_accelerator.py             # on a GPU or TPU host
    python benchmarks/bench_accelerator.py --smoke     # small shapes
    python benchmarks/bench_accelerator.py --aot v5e --aot v6e --aot h100
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import median_times  # benchmarks/_timing.py

from xent_jax import linear_cross_entropy

SHAPES = [(8192, 2304, 256000), (16384, 4096, 151936)]
SMOKE_SHAPES = [(1024, 512, 32768)]
CHECK_SHAPE = (300, 136, 5003)  # ragged for every tile table
KERNEL = {"gpu": "pallas_triton", "tpu": "pallas_tpu"}
PEERS = """Published numbers, for context (other hardware and code):
  Cut-Cross-Entropy paper: Gemma-2 2B's classifier, 8192 tokens x 2304 x V=256000
  Liger CuTe (SM90): 50 ms for 8192 tokens x 4096 x 131072 bf16 on an H100
  tokamax (H100, VJP, 16384 x 4096 x 151936 bf16): chunked XLA 168 ms,
    materialised 92 ms"""
CHECK_OPTIONS = dict(
    ignore_index=-100,
    label_smoothing=0.1,
    z_loss=1e-4,
    logit_softcap=30.0,
    temperature=0.8,
    num_classes=CHECK_SHAPE[2] - 3,
)
MiB = 2**20


def losses(kernel: str) -> dict:
    """The mean losses compared, in order of expected memory."""

    def fused(impl):
        return lambda x, w, y: linear_cross_entropy(x, w, y, implementation=impl)

    def optax_loss(x, w, y):
        logits = jnp.matmul(x, w, preferred_element_type=jnp.float32)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return {kernel: fused(kernel), "xla": fused("xla"), "optax": optax_loss}


def step(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def inputs(n: int, d: int, v: int, dtype=jnp.bfloat16, seed: int = 0):
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    return x, w, jax.random.randint(ky, (n,), 0, v - 3)


def check(kernel: str) -> bool:
    """Every implementation against the reference, every option, both dtypes."""
    ok = True
    for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)):
        x, w, y = inputs(*CHECK_SHAPE, dtype=dtype)
        y = y.at[::17].set(-100)
        b = jnp.linspace(-1, 1, CHECK_SHAPE[2], dtype=jnp.float32)
        results = {}
        for impl in ("reference", "xla", kernel):

            def loss(x, w, b, y, impl=impl):
                kw = dict(CHECK_OPTIONS, implementation=impl)
                return linear_cross_entropy(x, w, y, bias=b, **kw)

            f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            results[impl] = jax.tree.map(np.asarray, f(x, w, b, y))
        want = jax.tree.leaves(results["reference"])
        for impl in ("xla", kernel):
            errors = [
                float(np.max(np.abs(np.float64(a) - r)) / max(1.0, np.max(np.abs(r))))
                for a, r in zip(jax.tree.leaves(results[impl]), want, strict=True)
            ]
            good = max(errors) < tol
            ok &= good
            print(
                f"  check {impl:14s} {jnp.dtype(dtype).name:8s} max scaled error "
                f"{max(errors):.1e} (loss, dx, dw, db) {'ok' if good else 'MISMATCH'}"
            )
    return ok


def peak_bytes(device) -> float | None:
    stats = getattr(device, "memory_stats", lambda: None)()
    return None if not stats else stats.get("peak_bytes_in_use")


def table(kernel: str, shapes, repeats: int) -> None:
    print(
        "| N x D x V (bf16) | implementation | ms | vs optax | temp MiB "
        "| peak MiB (cumulative) |"
    )
    print("|---|---|---|---|---|---|")
    device = jax.devices()[0]
    for n, d, v in shapes:
        args = inputs(n, d, v)
        fns = {name: step(f) for name, f in losses(kernel).items()}
        temp, peak = {}, {}
        for name, f in fns.items():  # compile, warm up, read the memory
            compiled = f.lower(*args).compile()
            temp[name] = compiled.memory_analysis().temp_size_in_bytes / MiB
            jax.block_until_ready(f(*args))
            peak[name] = peak_bytes(device)
        times = median_times(fns, {name: args for name in fns}, repeats)
        for name in fns:
            p = "n/a" if peak[name] is None else f"{peak[name] / MiB:.0f}"
            print(
                f"| {n}x{d}x{v} | {name} | {times[name] * 1e3:.1f} "
                f"| {times[name] / times['optax']:.2f} | {temp[name]:.0f} | {p} |",
                flush=True,
            )


def aot(target: str, shapes, dtypes) -> None:
    """Deviceless compiles for ``target`` (``tests/deviceless.py``): memory,
    compile time and the compiler's cost of optax and every implementation."""
    import time

    from deviceless import KERNEL, MiB, compile_for, specs, w_copies

    from xent_jax import _registry

    other = {"pallas_tpu", "pallas_triton"} - {KERNEL[target]}
    impls = [n for n in _registry.names("linear") if n not in other]
    print(f"deviceless compile for {target}; value_and_grad (x, w) of the mean loss")
    print(
        "| N x D x V | dtype | variant | compile s | temp MiB | argument MiB "
        "| output MiB | W-sized copies | flops (compiler) | bytes accessed GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (n, d, v), dtype in itertools.product(shapes, dtypes):
        args = specs(target, ((n, d), dtype), ((d, v), dtype), ((n,), jnp.int32))
        variants = {"optax": losses(KERNEL[target])["optax"]}
        variants |= {i: functools.partial(_fused_loss, impl=i) for i in impls}
        variants["xla+skip_unscored"] = functools.partial(
            _fused_loss, impl="xla", skip_unscored=True
        )
        for name, loss in variants.items():
            start = time.perf_counter()
            compiled = compile_for(
                target, jax.value_and_grad(loss, argnums=(0, 1)), *args
            )
            seconds = time.perf_counter() - start
            mem = compiled.memory_analysis()
            copies = w_copies(compiled.as_text(), d * v, jnp.dtype(dtype).itemsize)
            cost = (compiled.cost_analysis() or {}) if target != "h100" else {}
            cost = cost[0] if isinstance(cost, list) else cost
            flops = cost.get("flops")
            accessed = cost.get("bytes accessed")
            print(
                f"| {n}x{d}x{v} | {jnp.dtype(dtype).name} | {name} | {seconds:.1f} "
                f"| {mem.temp_size_in_bytes / MiB:.0f} "
                f"| {mem.argument_size_in_bytes / MiB:.0f} "
                f"| {mem.output_size_in_bytes / MiB:.0f} | {len(copies)} "
                f"| {'n/a' if flops is None else f'{flops:.3g}'} "
                f"| {'n/a' if accessed is None else f'{accessed / 1e9:.2f}'} |",
                flush=True,
            )


def _fused_loss(x, w, y, impl, skip_unscored=False):
    return linear_cross_entropy(
        x, w, y, implementation=impl, skip_unscored=skip_unscored
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--aot",
        choices=("v5e", "v6e", "h100"),
        action="append",
        help="compile deviceless for this target (repeatable); nothing runs",
    )
    parser.add_argument("--dtypes", default="bfloat16,float32", help="with --aot")
    args = parser.parse_args()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.aot:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import deviceless

        if (why := deviceless.missing()) is not None:
            sys.exit(why)
        deviceless.setup()
        print(f"jax {jax.__version__}")
        for target in args.aot:
            aot(target, shapes, args.dtypes.split(","))
        return
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    backend = jax.default_backend()
    if backend not in KERNEL:
        print("bench_accelerator needs a GPU or a TPU; this is a CPU. Nothing run.")
        return
    kernel = KERNEL[backend]
    print(f"device: {jax.devices()[0].device_kind}; kernel: {kernel}")
    ok = check(kernel)
    print(PEERS)
    table(kernel, shapes, args.repeats)
    if not ok:
        sys.exit("an implementation disagrees with the reference (see above)")


if __name__ == "__main__":
    main()
