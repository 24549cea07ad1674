"""Benchmark of the fused linear cross-entropy against materialised baselines.

For ``jax.jit(jax.value_and_grad(mean loss, argnums=(0, 1)))`` over integer
labels, one run prints Markdown tables, under a line naming the jax version,
device, threads, load average and date:

* memory (float32, compile only, nothing runs): the compiled temporary memory
  (``memory_analysis()``) of ``xent_jax.linear_cross_entropy`` and of
  ``optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()``
  at N=8192, D=1024 for V in {32768, 131072, 262144}, with their ratio, the
  bytes of one float32 logits array for scale, and the fused loss on a tied
  embedding ``emb`` [V, D] passed as ``emb.T`` (W's size if it were copied);
* the GEMM floor, per shape and dtype: the median rate of matmuls in the dtype
  with float32 accumulation, ``[1024, D] @ [D, 1024]``, the full ``[N, D] @
  [D, V]`` (optax's forward product, so that the floor is never above
  optax's time) and the three products
  of one block of the fused loss (``x @ w``, ``g @ wᵀ``, ``xᵀ @ g`` at its
  ``[token_block, vocab_block]``), for 16-bit data also ``x @ w`` with the
  block converted to float32 first ("upcast"); the best rate R at the shape
  and dtype gives the floor ``6 N D V / R``: the three matmuls of autodiff at
  that rate (per dtype: XLA CPU runs some bfloat16 products 2-4x faster than
  float32 ones on CPUs with bfloat16 units, 740-935 GFLOP/s on this one);
* time, in float32 and bfloat16 at N=2048, D=512, V=32768 and N=1024, D=256,
  V=131072 (``--shapes``), timed together with the GEMMs: the median time of
  xent (default), xent with ``filter_threshold`` on the same random data,
  materialised optax and, where PyTorch is installed (the ``bench`` extra),
  ``torch.nn.functional.linear_cross_entropy(x, w.T, y)`` and materialised
  ``F.cross_entropy(x @ w, y)`` (backward by ``torch.autograd.grad``,
  PyTorch's default threads), each in the same dtype; with each row's rate
  ``6 N D V / time``, its time over optax's and over the floor, and the
  compiled temporary memory of the JAX rows. A PyTorch call estimated (from
  one call on N/8 rows) to take over ``--torch-max-seconds`` runs on N/k rows
  and its time is multiplied by k; the row says so ("(N/8, x8)");
* unscored rows (``skip_unscored=True``, issue 30), at the time shapes and
  dtypes: the step with 0, 25, 50, 75 and 90% of the rows ignored at random
  positions, and packed prompt-then-answer sequences (``--prompt-answer``:
  8 sequences of N/8 tokens, two segments each, ``shift=1``, the first half
  of each segment a prompt masked by ``where``; about 51% unscored with the
  segments' last tokens), each over the default loss with every row scored,
  timed together in the same rotation, with the compiled temporary memory;
* gradient filtering on a realistic distribution: logits ``x @ w`` with a
  Zipfian profile over frequency-ordered ids (id 0 the most frequent, as in
  BPE vocabularies) plus N(0, 1) noise per logit, scaled so that their mean
  entropy is a trained LM's (``--entropy``, 2.5 nats; the measured value is
  printed), labels drawn from their softmax. xent exact and with each
  ``--realistic-thresholds``: time, the share of the backward's tiles whose
  every probability is below the threshold (the tiles it skips), and the max
  abs difference of the loss, dx and dw from the exact result beside the
  bound: a skipped logit's gradient is ``p / N < threshold / N``, so
  ``|ddx[i, d]| <= threshold / N * sum_c |w[d, c]|`` and ``|ddw[d, c]| <=
  threshold / N * sum_i |x[i, d]|`` (summed over all columns or rows, not only
  the skipped ones). In bfloat16 the gradients' own rounding comes on top: the
  exact row shows, for scale, its difference from float32 on the same inputs.

    python benchmarks/bench_linear.py            # the tables of docs/performance.md
    python benchmarks/bench_linear.py --smoke    # tiny shapes, seconds (CI)
    python benchmarks/bench_linear.py --shapes "2048,512,32768" --dtypes float32
    python benchmarks/bench_linear.py --block-size 1024,2048   # tuning

The machines are shared and noisy: timings are interleaved in a rotating order,
repeated and reduced to medians (``_timing.median_times``); read the ratios.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import median_times  # benchmarks/_timing.py

from xent_jax import linear_cross_entropy
from xent_jax._linear import layout as _layout  # the block sizes of the loop

MEMORY_SHAPES = [(8192, 1024, 32768), (8192, 1024, 131072), (8192, 1024, 262144)]
TIME_SHAPES = [(2048, 512, 32768), (1024, 256, 131072)]
SMOKE_MEMORY_SHAPES = [(256, 64, 1024), (256, 64, 4096)]
SMOKE_TIME_SHAPES = [(128, 32, 2048)]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MiB = 2**20


def _torch():
    """PyTorch's module, or None where it (or its fused loss) is missing."""
    try:
        import torch
    except ImportError:
        return None
    return torch if hasattr(torch.nn.functional, "linear_cross_entropy") else None


def table(header: list[str], rows: list[list]) -> None:
    """Prints a Markdown table."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    sys.stdout.flush()


def machine_line(torch) -> str:
    cpu, today = jax.devices()[0], datetime.date.today().isoformat()
    load = ", ".join(f"{a:.1f}" for a in os.getloadavg())
    line = (
        f"jax {jax.__version__} on {cpu.platform} ({cpu.device_kind}), "
        f"{len(os.sched_getaffinity(0))} CPU threads, load average {load}, "
    )
    if torch is None:
        return line + f"no torch, {today}"
    return (
        line + f"torch {torch.__version__} ({torch.get_num_threads()} threads), {today}"
    )


# --- the losses ---------------------------------------------------------------


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


def compiled(loss, *args):
    """``(compiled step, its temporary memory in MiB)``."""
    c = _step(loss).lower(*args).compile()
    return c, c.memory_analysis().temp_size_in_bytes / MiB


@functools.cache
def jax_step(kind: str, block_size, threshold, shape, dtype):
    """``compiled(...)`` of ``_losses(block_size, threshold)[kind]`` on
    ``x`` [N, D], ``w`` [D, V] of ``dtype``, cached: the tables share them."""
    n, d, v = shape
    x, w = (jax.ShapeDtypeStruct(s, dtype) for s in ((n, d), (d, v)))
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    return compiled(_losses(block_size, threshold)[kind], x, w, y)


def torch_steps(torch, x, w, y, rows: int) -> dict:
    """PyTorch's fused and materialised steps, on copies of the first ``rows``
    rows of ``x, y`` and of ``w``, in ``x``'s dtype."""
    F = torch.nn.functional
    dtype = getattr(torch, str(x.dtype))

    def tensor(a):  # via float32: PyTorch reads no numpy bfloat16
        return torch.from_numpy(np.array(a, np.float32)).to(dtype).requires_grad_()

    tx, tw = tensor(np.asarray(x)[:rows]), tensor(w)
    ty = torch.from_numpy(np.array(y)[:rows]).long()
    tw_vd = tw.detach().T.contiguous().requires_grad_()

    def fused():
        loss = F.linear_cross_entropy(tx, tw_vd, ty)
        return loss, torch.autograd.grad(loss, (tx, tw_vd))

    def materialised():
        loss = F.cross_entropy(tx @ tw, ty)
        return loss, torch.autograd.grad(loss, (tx, tw))

    return {"torch fused": fused, "torch materialised": materialised}


def _share(step, factor: float, limit: float) -> int:
    """The smallest power of two ``k`` for which ``step`` (on ``1 / factor``
    of the rows) on ``1 / k`` of the rows should take under ``limit`` s."""
    start = time.perf_counter()
    step()
    estimate = (time.perf_counter() - start) * factor
    return 1 if estimate <= limit else 2 ** math.ceil(math.log2(estimate / limit))


def torch_rows(torch, x, w, y, limit: float) -> dict:
    """``name: (step, k)``: each PyTorch step on the first ``N / k`` rows, the
    largest share whose call should take under ``limit`` seconds (from one
    call on ``N / 8`` rows; PyTorch on a CPU without bfloat16 instructions
    takes minutes per bfloat16 call at the default shapes). The time of a
    step with ``k > 1`` is scaled by ``k``: an extrapolation, named so."""
    n = x.shape[0]
    probe = torch_steps(torch, x, w, y, max(1, n // 8))
    shares = {k: _share(f, n / max(1, n // 8), limit) for k, f in probe.items()}
    out = {}
    for name, k in shares.items():
        k = min(k, n)
        label = name if k == 1 else f"{name} (N/{k}, x{k})"
        out[label] = (torch_steps(torch, x, w, y, n // k)[name], k)
    return out


# --- data ---------------------------------------------------------------------
# Generated with numpy: every eager jax.random or cast op would be one more
# XLA compile, seconds of --smoke on a loaded machine.


def _normal(rng, shape, scale=1.0):
    return rng.standard_normal(shape, np.float32) * np.float32(scale)


def _device(a, dtype):
    return jnp.asarray(np.asarray(a).astype(dtype))  # numpy casts, no compile


def random_data(n: int, d: int, v: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, w = _normal(rng, (n, d)), _normal(rng, (d, v), d**-0.5)
    y = rng.integers(0, v, n).astype(np.int32)
    return _device(x, dtype), _device(w, dtype), jnp.asarray(y)


@jax.jit
def _entropy(z):
    logp = jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


@jax.jit
def _scaled_entropy(b, z):
    return _entropy(b * z)


def _zipf_scale(z, target: float) -> float:
    """The scale b for which ``b z`` has mean entropy ``target`` (bisection;
    the entropy falls as b grows)."""
    lo, hi = 0.01, 100.0
    for _ in range(20):
        b = (lo * hi) ** 0.5
        lo, hi = (b, hi) if _scaled_entropy(b, z) > target else (lo, b)
    return (lo * hi) ** 0.5


@jax.jit
def _sample(key, x, w):
    """Labels drawn from the softmax of ``x @ w``, and its mean entropy."""
    z = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    return jax.random.categorical(key, z).astype(jnp.int32), _entropy(z)


def zipf_data(n: int, d: int, v: int, dtype, entropy: float, seed: int = 0):
    """``x, w, y`` whose logits ``x @ w`` are ``b (-log(1 + id) + e)`` with e
    about N(0, 1) per logit (``x[:, 0] = 1``, ``w[0]`` the profile), ``b``
    such that their mean entropy is ``entropy``, labels drawn from their
    softmax; and the measured mean entropy."""
    rng = np.random.default_rng(seed)
    x, w = _normal(rng, (n, d)), _normal(rng, (d, v), (d - 1) ** -0.5)
    x[:, 0], w[0] = 1.0, -np.log1p(np.arange(v, dtype=np.float32))
    w *= np.float32(_zipf_scale(x[:256] @ w, entropy))
    x, w = _device(x, dtype), _device(w, dtype)
    y, measured = _sample(jax.random.PRNGKey(seed), x, w)
    return x, w, y, float(measured)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _tile_max(x, w, tb: int, groups: int, cs: int):
    (n, _), v = x.shape, w.shape[1]
    p = jax.nn.softmax(jnp.matmul(x, w, preferred_element_type=jnp.float32), -1)
    p = jnp.pad(p.reshape(n, groups, v // groups), ((0, -n % tb), (0, 0), (0, 0)))
    p = jnp.pad(p, ((0, 0), (0, 0), (0, -(v // groups) % cs)))
    p = p.reshape(p.shape[0] // tb, tb, groups, p.shape[2] // cs, cs)
    return jnp.max(p, axis=(1, 2, 4))


def tile_maxima(x, w, block_size) -> np.ndarray:
    """The largest probability of each ``[token_block, vocab_block]`` tile of
    the fused loss's backward (its vocabulary groups side by side)."""
    lay = _layout.choose(block_size, x.shape[0], w.shape[1], w.shape[0], False, False)
    return np.asarray(_tile_max(x, w, lay.token_block, lay.groups, lay.vocab_block))


MEMORY_HEADER = (
    "N x D x V | logits MiB | xent temp MiB | optax temp MiB | optax/xent | W MiB "
    "| xent on emb.T temp MiB"
).split(" | ")


def temp_mib(loss, n: int, d: int, v: int, tied=False) -> float:
    """Compiled temporary memory of value_and_grad(loss) w.r.t. (x, w), float32;
    with ``tied``, ``loss`` gets ``emb`` [V, D] in place of ``w``."""
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((v, d) if tied else (d, v), jnp.float32)
    return compiled(loss, x, w, jax.ShapeDtypeStruct((n,), jnp.int32))[1]


def memory_table(shapes, block_size) -> None:
    rows = []
    for n, d, v in shapes:
        losses = _losses(block_size)
        mem = {name: temp_mib(f, n, d, v) for name, f in losses.items()}
        tied = lambda x, e, y, f=losses["xent"]: f(x, e.T, y)  # noqa: E731
        mem["tied"] = temp_mib(tied, n, d, v, tied=True)
        row = [f"{n}x{d}x{v}", f"{n * v * 4 / MiB:.0f}", f"{mem['xent']:.1f}"]
        row += [f"{mem['optax']:.0f}", f"{mem['optax'] / mem['xent']:.0f}"]
        rows.append(row + [f"{d * v * 4 / MiB:.0f}", f"{mem['tied']:.1f}"])
    table(MEMORY_HEADER, rows)


# --- the GEMM floor -----------------------------------------------------------


def block_dims(block_size, n: int, v: int, d: int) -> tuple[int, int]:
    """``(token_block, vocab_block)`` of one matmul of the fused loss."""
    lay = _layout.choose(block_size, n, v, d, rows=False, padded=False)
    return lay.token_block, lay.vocab_block * lay.groups


def _matmul(dims, upcast: bool):
    def f(a, b):
        if upcast:
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        dn = (dims, ((), ()))
        return jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.float32)

    return jax.jit(f)


def gemms(n: int, d: int, v: int, dtype, block_size) -> dict:
    """``name: (jitted matmul, its operands, its flops)`` in ``dtype`` with
    float32 accumulation; for 16-bit ``dtype`` also ``x @ w`` with the
    operands converted to float32 first (in the same jitted call)."""
    tb, vb = block_dims(block_size, n, v, d)
    specs = {  # lhs shape, rhs shape, contracting dims
        "1024x1024": ((1024, d), (d, 1024), ((1,), (0,))),
        "full x@w": ((n, d), (d, v), ((1,), (0,))),  # optax's own product
        "x@w": ((tb, d), (d, vb), ((1,), (0,))),
        "g@wT": ((tb, vb), (d, vb), ((1,), (1,))),
        "xT@g": ((tb, d), (tb, vb), ((0,), (0,))),
    }
    if dtype != jnp.float32:
        specs["x@w upcast"] = specs["x@w"]
    out, rng = {}, np.random.default_rng(1)
    for name, (ls, rs, dims) in specs.items():
        a, b = _device(_normal(rng, ls), dtype), _device(_normal(rng, rs), dtype)
        flops = 2 * a.size * b.size // ls[dims[0][0]]  # 2 m k n
        out[f"gemm {name}"] = (_matmul(dims, "upcast" in name), (a, b), flops)
    return out


# --- measurements -------------------------------------------------------------


def measure(shape, dtype, opts, torch) -> dict:
    """Times, rates and temp memory of every row at one shape and dtype."""
    x, w, y = random_data(*shape, dtype)
    rows = {"xent": ("xent", None)}
    rows |= {f"xent filter {th:g}": ("xent", th) for th in opts.filter_thresholds}
    rows["optax"] = ("optax", None)
    fns, temp = {}, {}
    for name, (kind, th) in rows.items():
        fns[name], temp[name] = jax_step(kind, opts.block_size, th, shape, dtype)
    args, share = dict.fromkeys(fns, (x, w, y)), {}
    if torch is not None:
        for name, (f, k) in torch_rows(torch, x, w, y, opts.torch_max_seconds).items():
            fns[name], args[name], share[name] = f, (), k
    floor = gemms(*shape, dtype, opts.block_size)
    for name, (f, a, _) in floor.items():
        fns[name], args[name] = f, a
    t = median_times(fns, args, opts.repeats, opts.min_seconds)
    t = {k: s * share.get(k, 1) for k, s in t.items()}
    rates = {k: flops / t[k] / 1e9 for k, (_, _, flops) in floor.items()}
    return dict(times=t, temp=temp, gemm=rates)


UNSCORED = (0.0, 0.25, 0.5, 0.75, 0.9)


def _skipping(shape, dtype, **opts):
    n, d, v = shape
    x, w = (jax.ShapeDtypeStruct(s, dtype) for s in ((n, d), (d, v)))
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def loss(x, w, y):
        return linear_cross_entropy(x, w, y, ignore_index=-100, **opts)

    return compiled(loss, x, w, y)


def _packed(shape, dtype):
    """The step on 8 packed sequences of two segments, prompts masked."""
    n, d, v = shape
    seq = n // 8
    half = seq // 2
    pos = np.arange(seq) % half
    segments = np.repeat((np.arange(seq) // half + 1)[None], 8, 0)
    where = np.repeat((pos >= half // 2)[None], 8, 0)
    opts = dict(shift=1, segment_ids=segments, where=where, skip_unscored=True)

    def loss(x, w, y):
        x, y = x.reshape(8, seq, d), y.reshape(8, seq)
        return linear_cross_entropy(x, w, y, **opts)

    x, w = (jax.ShapeDtypeStruct(s, dtype) for s in ((n, d), (d, v)))
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    scored = where[:, :-1] & (segments[:, :-1] == segments[:, 1:])
    return compiled(loss, x, w, y), 1 - scored.sum() / where.size


def unscored(shape, dtype, opts) -> dict:
    """Times and temp memory of the skipping loss at each share of unscored
    rows, and of packed prompt-answer sequences, beside every row scored."""
    x, w, y = random_data(*shape, dtype)
    rng = np.random.default_rng(2)
    fns, temp, args = {}, {}, {}
    fns["all scored"], temp["all scored"] = _skipping(shape, dtype)
    args["all scored"] = (x, w, y)
    for share in UNSCORED:
        name = f"skip, {share:.0%} unscored"
        fns[name], temp[name] = _skipping(shape, dtype, skip_unscored=True)
        ignored = rng.permutation(shape[0])[: round(share * shape[0])]
        args[name] = (x, w, y.at[ignored].set(-100))
    (fns["packed"], temp["packed"]), packed_share = _packed(shape, dtype)
    args["packed"] = (x, w, y)
    t = median_times(fns, args, opts.repeats, opts.min_seconds)
    return dict(times=t, temp=temp, packed=packed_share)


def print_unscored(results: dict) -> None:
    rows = []
    for ((n, d, v), dt), r in results.items():
        t = r["times"]
        for name, s in t.items():
            label = name
            if name == "packed":
                label = f"skip, prompt-answer packed ({r['packed']:.0%} unscored)"
            ratio = f"{s / t['all scored']:.2f}"
            rows.append([f"{n}x{d}x{v}", dt, label, f"{s * 1e3:.0f}", ratio])
            rows[-1].append(f"{r['temp'][name]:.1f}")
    header = ["N x D x V", "dtype", "row", "ms", "/ all scored", "temp MiB"]
    table(header, rows)


def _numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def filtering(shape, dtype, opts) -> dict:
    """Times, skipped tiles and errors of filtered xent on Zipfian logits; for
    16-bit data also the exact loss in float32 on the same (upcast) inputs."""
    x, w, y, entropy = zipf_data(*shape, dtype, opts.entropy)
    step = functools.partial(jax_step, "xent", opts.block_size, shape=shape)
    fns = {"exact": step(None, dtype=dtype)[0]}
    fns |= {f"{th:g}": step(th, dtype=dtype)[0] for th in opts.realistic_thresholds}
    t = median_times(fns, dict.fromkeys(fns, (x, w, y)), opts.repeats, opts.min_seconds)
    results = {k: _numpy(f(x, w, y)) for k, f in fns.items()}
    x32, w32 = np.asarray(x, np.float32), np.asarray(w, np.float32)
    if dtype != jnp.float32:
        ref = step(None, dtype=jnp.float32)[0]
        results["float32"] = _numpy(ref(jnp.asarray(x32), jnp.asarray(w32), y))
    tiles = tile_maxima(x, w, opts.block_size)
    return dict(times=t, results=results, tiles=tiles, entropy=entropy, x=x32, w=w32)


# --- printing -----------------------------------------------------------------


GEMMS = ["1024x1024", "full x@w", "x@w", "g@wT", "xT@g", "x@w upcast"]


def share_floor(results: dict) -> dict:
    """Each row's ``R``: the best GEMM rate at its shape and dtype."""
    for r in results.values():
        r["R"] = max(r["gemm"].values())
    return results


def print_floor(results: dict) -> None:
    rows = []
    for ((n, d, v), dt), r in results.items():
        rates = [r["gemm"].get("gemm " + k) for k in GEMMS]
        rates = ["-" if g is None else f"{g:.0f}" for g in rates]
        floor_ms = 6 * n * d * v / r["R"] / 1e6
        rows.append([f"{n}x{d}x{v}", dt, *rates, f"{r['R']:.0f}", f"{floor_ms:.0f}"])
    header = [f"{k} GFLOP/s" for k in GEMMS]
    table(["N x D x V", "dtype", *header, "R GFLOP/s", "floor ms"], rows)


TIME_HEADER = "N x D x V | dtype | row | ms | GFLOP/s | / optax | / floor | temp MiB"


def print_times(results: dict) -> None:
    rows = []
    for ((n, d, v), dt), r in results.items():
        t, flops = r["times"], 6 * n * d * v
        floor = flops / (r["R"] * 1e9)
        for name, s in t.items():
            if name.startswith("gemm "):
                continue
            temp = r["temp"].get(name)
            row = [f"{n}x{d}x{v}", dt, name, f"{s * 1e3:.0f}", f"{flops / s / 1e9:.0f}"]
            row += [f"{s / t['optax']:.2f}", f"{s / floor:.2f}"]
            rows.append(row + ["-" if temp is None else f"{temp:.1f}"])
    table(TIME_HEADER.split(" | "), rows)


FILTER_HEADER = (
    "N x D x V | dtype | entropy nats | filter | ms | / exact | tiles skipped % "
    "| max abs dloss | max abs ddx | bound ddx | max abs ddw | bound ddw"
).split(" | ")


def error_cells(res, ref, th: float | None, x, w) -> list[str]:
    """Max abs differences of loss, dx, dw from ``ref``, with the filter's
    bounds ``th / N * max_d sum_c |w[d, c]|`` and ``... sum_i |x[i, d]|``."""
    leaves = zip(jax.tree.leaves(res), jax.tree.leaves(ref), strict=True)
    dloss, ddx, ddw = (f"{np.abs(a - b).max():.1e}" for a, b in leaves)
    bound_dx = bound_dw = "-"
    if th is not None:
        bound_dx = f"{th / x.shape[0] * np.abs(w).sum(axis=1).max():.1e}"
        bound_dw = f"{th / x.shape[0] * np.abs(x).sum(axis=0).max():.1e}"
    return [dloss, ddx, bound_dx, ddw, bound_dw]


def filter_cells(r: dict, name: str) -> list[str]:
    """Skipped tiles and errors of one row: a filtered one against the exact
    result, the exact one (16-bit) against float32 on the same inputs."""
    res = r["results"]
    if name != "exact":
        skipped = f"{100 * np.mean(r['tiles'] < float(name)):.0f}"
        errors = error_cells(res[name], res["exact"], float(name), r["x"], r["w"])
        return [skipped, *errors]
    if "float32" in res:
        return ["-", *error_cells(res["exact"], res["float32"], None, r["x"], r["w"])]
    return ["-"] * 6


def print_filtering(results: dict) -> None:
    rows = []
    for ((n, d, v), dt), r in results.items():
        t = r["times"]
        for name, s in t.items():
            row = [f"{n}x{d}x{v}", dt, f"{r['entropy']:.2f}", name]
            row += [f"{s * 1e3:.0f}", f"{s / t['exact']:.2f}"]
            rows.append(row + filter_cells(r, name))
    table(FILTER_HEADER, rows)


# --- main ---------------------------------------------------------------------


def _numbers(text: str, kind=float) -> tuple:
    return tuple(kind(t) for t in text.split(",") if t)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, seconds")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--block-size",
        default=None,
        help="vocab block, or token_block,vocab_block (default: the package's)",
    )
    p.add_argument("--shapes", default=None, help='"N,D,V;N,D,V" for the times')
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument(
        "--filter-threshold",
        type=float,
        default=1e-6,
        help="threshold of the filtered row of the time table",
    )
    p.add_argument("--realistic-thresholds", default="1e-6,1e-4")
    p.add_argument(
        "--entropy",
        type=float,
        default=2.5,
        help="mean entropy (nats) of the realistic distribution",
    )
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--skip-filtering", action="store_true")
    p.add_argument("--skip-unscored-table", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument(
        "--torch-max-seconds",
        type=float,
        default=30.0,
        help="time PyTorch calls estimated slower on fewer rows, scaled up",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: PyTorch's own)",
    )
    args = p.parse_args(argv)
    if args.block_size:
        parts = _numbers(args.block_size, int)
        args.block_size = parts[0] if len(parts) == 1 else parts
    args.filter_thresholds = (args.filter_threshold,)
    args.realistic_thresholds = _numbers(args.realistic_thresholds)
    args.dtypes = [t for t in args.dtypes.split(",") if t]
    default = SMOKE_TIME_SHAPES if args.smoke else TIME_SHAPES
    args.shapes = (
        [_numbers(s, int) for s in args.shapes.split(";") if s]
        if args.shapes
        else default
    )
    args.repeats = 2 if args.smoke else args.repeats
    args.min_seconds = 0.05 if args.smoke else 1.0  # of timing per row
    return args


def run(what: str, each, opts) -> dict:
    """``each(shape, dtype, opts)`` for every time shape and dtype."""
    out = {}
    for shape in opts.shapes:
        for dt in opts.dtypes:
            print(f"  {what} {shape} {dt} ...", file=sys.stderr, flush=True)
            out[shape, dt] = each(shape, DTYPES[dt], opts)
    return out


def main() -> None:
    opts = parse_args()
    torch = None if opts.skip_torch else _torch()
    if torch is not None and opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
    print(machine_line(torch))
    if not opts.skip_memory:
        shapes = SMOKE_MEMORY_SHAPES if opts.smoke else MEMORY_SHAPES
        memory_table(shapes, opts.block_size)
    if not opts.skip_time:
        results = run("time", lambda s, dt, o: measure(s, dt, o, torch), opts)
        share_floor(results)
        print_floor(results)
        print_times(results)
    if not opts.skip_unscored_table:
        print_unscored(run("unscored rows", unscored, opts))
    if not opts.skip_filtering:
        print_filtering(run("filtering", filtering, opts))


if __name__ == "__main__":
    main()
