"""Tests of the Pallas kernels of the fused loss (``pallas_tpu``, ``pallas_triton``).

On CPU the kernels run in Pallas's interpreter, which is what this file
checks against ``implementation="reference"``: values (loss, lse, entropy,
argmax, NaN positions included) and gradients of x, w, bias and
class_weights under random cotangents on the loss, lse and entropy. The
tiles are made tiny (the smallest each backend allows: (8 or 16, 128) on TPU,
16 on Triton) so that shapes of 37 tokens, 24 features and 300 classes are
ragged in every tiled dimension. The export tests lower the compiled kernels
for TPU and CUDA (no execution), at the benchmark shapes too.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiers import slow

from xent_jax import _compat, _registry, linear_cross_entropy
from xent_jax._linear import tiles

IMPLS = ("pallas_tpu", "pallas_triton")
N, D, V = 37, 24, 300
IGNORE = -100
TINY = {"tpu": tiles.Tiles(8, 128), "triton": tiles.Tiles(16, 16, 16, programs=4)}
TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2}
TRITON_CHECK = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
DEFAULT_TILES = dict(tiles.TILES)


@pytest.fixture(autouse=True)
def tiny_tiles(monkeypatch):
    for platform, t in TINY.items():
        monkeypatch.setitem(tiles.TILES, platform, t)


def _data(dtype, rows: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, D)), dtype)
    w = rng.normal(size=(D, V)) * 0.6
    w = jnp.asarray(w.T if rows else w, dtype)
    b = jnp.asarray(rng.normal(size=(V,)), jnp.float32)
    y = rng.integers(0, V - 10, size=N)
    y[[1, 5]] = IGNORE
    y[-1], y[-2], y[0] = V - 11, 129, 0  # in the last real tile, a tile edge
    cw = jnp.asarray(rng.uniform(0.3, 2.0, size=(V,)), jnp.float32)
    cts = [jnp.asarray(rng.normal(size=(N,)), jnp.float32) for _ in range(3)]
    return x, w, b, jnp.asarray(y, jnp.int32), cw, cts


CASES = {
    "all_options": (
        jnp.float32,
        False,
        dict(
            label_smoothing=0.1,
            class_weights=True,
            z_loss=1e-2,
            logit_softcap=4.0,
            temperature=0.8,
            return_aux=True,
            num_classes=V - 10,
            masked=True,
        ),
    ),
    "bf16_rows": (
        jnp.bfloat16,
        True,
        dict(label_smoothing=0.2, class_weights=True, z_loss=1e-3, return_aux=True),
    ),
    "filter_exact_rows_no_bias": (
        jnp.float32,
        True,
        dict(
            filter_threshold=0.0,
            class_weights=True,
            logit_softcap=3.0,
            temperature=2.0,
            with_bias=False,
        ),
    ),
}


def _masked_columns(y):
    """Every 7th class and the classes 128-255, but no label."""
    j = np.arange(V)
    masked = (j % 7 == 3) | ((j >= 128) & (j < 256))
    masked[np.asarray(y)[np.asarray(y) >= 0]] = False
    return jnp.asarray(masked)


def _loss(impl, opts, y, cts, rows):
    """A scalar with random cotangents on the per-example loss, lse and
    entropy, and the per-example outputs (argmax too) beside it."""

    def fn(x, w, b, cw):
        o = dict(opts)
        if not o.pop("with_bias", True):
            b = None
        if o.pop("masked", False):  # -inf columns, a whole tile of them too
            b = jnp.where(_masked_columns(y), -jnp.inf, b)
        if o.get("class_weights"):
            o["class_weights"] = cw
        aux = o.get("return_aux", False)
        out = linear_cross_entropy(
            x,
            w,
            y,
            bias=b,
            ignore_index=IGNORE,
            reduction="none",
            implementation=impl,
            w_layout="vd" if rows else "dv",
            return_lse=not aux,
            **o,
        )
        loss, lse = out[0], out[1].lse if aux else out[1]
        total = jnp.sum(cts[0] * loss) + jnp.sum(cts[1] * lse)
        extra = (loss, lse)
        if aux:
            total = total + jnp.sum(cts[2] * out[1].entropy)
            extra += (out[1].entropy, out[1].argmax)
        return total, extra

    return fn


@functools.cache
def _run(impl, case):
    """Per-example outputs and gradients (numpy); for "all_options" also the
    outputs with a NaN row of x (NaN positions must match)."""
    dtype, rows, opts = CASES[case]
    x, w, b, y, cw, cts = _data(dtype, rows)
    fn = _loss(impl, opts, y, cts, rows)
    (_, outs), grads = jax.jit(jax.value_and_grad(fn, (0, 1, 2, 3), True))(x, w, b, cw)
    if case == "all_options":
        outs += jax.jit(fn)(x.at[4].set(jnp.nan), w, b, cw)[1]
    return dtype, jax.tree.map(np.asarray, (outs, grads))


def _close(a, b, dtype):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    t = TOL[jnp.dtype(dtype)]
    finite = np.isfinite(b)
    scale = max(1.0, float(np.max(np.abs(b[finite]), initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=t, atol=t * scale)


@pytest.mark.parametrize("case", [c if c == "all_options" else slow(c) for c in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, case):
    dtype, (outs, grads) = _run(impl, case)
    _, (outs_r, grads_r) = _run("reference", case)
    for a, r in zip(outs, outs_r, strict=True):
        if np.issubdtype(r.dtype, np.integer):  # the argmax
            same = a == r  # bf16 logits may tie where the reference's differ
            assert same.all() if dtype == jnp.float32 else same.mean() > 0.9
        else:
            _close(a, r, dtype)
    for g, g_r in zip(grads, grads_r, strict=True):
        assert g.dtype == g_r.dtype and g.shape == g_r.shape
        _close(g, g_r, dtype)


SPAN_CASES = {
    "bf16": (jnp.bfloat16, False, dict(z_loss=1e-3)),
    "bf16_rows_smoothing": (
        jnp.bfloat16,
        True,
        dict(label_smoothing=0.1, class_weights=True, return_aux=True),
    ),
    "f32_ragged": (jnp.float32, False, dict(logit_softcap=4.0)),
    "bf16_filter": (jnp.bfloat16, False, dict(filter_threshold=0.0)),
}


@pytest.mark.parametrize("case", SPAN_CASES)
def test_triton_backward_in_spans_is_one_pass_bit_for_bit(case, monkeypatch):
    """Issue 27: the Triton backward accumulates a 16-bit (or ragged) dw in
    float32 span by span of the vocabulary, and a large 16-bit dx token span
    by token span, each rounded once complete. The interpreter adds the tiles
    in the same order either way, so the gradients are the one pass's bits."""
    from xent_jax._linear import pallas_triton

    dtype, rows, opts = SPAN_CASES[case]
    x, w, b, y, cw, cts = _data(dtype, rows)

    def grads():
        fn = jax.value_and_grad(
            _loss("pallas_triton", opts, y, cts, rows), (0, 1, 2, 3), True
        )
        kernels = str(jax.make_jaxpr(fn)(x, w, b, cw)).count("pallas_call")
        return kernels, jax.tree.map(np.asarray, jax.jit(fn)(x, w, b, cw))

    kernels_one, one = grads()  # at these sizes one span covers everything
    # Spans of one tile (16 classes, 16 tokens at D padded to 32): a loop over
    # the whole spans and a rest, in both passes.
    monkeypatch.setattr(pallas_triton, "DW_SPAN_BYTES", 16 * 32 * 4)
    monkeypatch.setattr(pallas_triton, "DX_INLINE_BYTES", 0)
    kernels_spans, spans = grads()
    assert kernels_spans > kernels_one, (kernels_spans, kernels_one)
    for a, r in zip(jax.tree.leaves(spans), jax.tree.leaves(one), strict=True):
        assert a.dtype == r.dtype
        np.testing.assert_array_equal(a, r)


@pytest.mark.parametrize(
    "impl,argnums", [("pallas_tpu", (1,)), ("pallas_triton", (0, 2))], ids=str
)
@pytest.mark.slow
def test_partial_gradients_and_filter(impl, argnums):
    """Only the gradients asked for (dw alone: a frozen x; dx and dbias: a
    frozen head), with a filter that skips every tile: equal to the XLA
    loop's (the label term alone)."""
    x, w, b, y, _, _ = _data(jnp.float32, False, seed=1)

    def loss(impl):
        return lambda x, w, b: linear_cross_entropy(
            x,
            w,
            y,
            bias=b,
            ignore_index=IGNORE,
            implementation=impl,
            filter_threshold=1.0,
            z_loss=1e-2,
        )

    got = jax.jit(jax.grad(loss(impl), argnums))(x, w, b)
    want = jax.jit(jax.grad(loss("xla"), argnums))(x, w, b)
    for g, g_r in zip(got, want, strict=True):
        _close(g, g_r, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.slow
def test_grad_of_grad_is_refused_by_name(impl):
    """Differentiating the Pallas backward raised a bare AssertionError from
    inside JAX; now a NotImplementedError that names the way out. The first
    gradient is unaffected, and the default implementation differentiates its
    own backward (checked against the reference)."""
    x, w, _, y, _, _ = _data(jnp.float32, False, seed=2)
    f = functools.partial(
        linear_cross_entropy, ignore_index=IGNORE, implementation=impl
    )
    g = jax.grad(lambda x: f(x, w, y))(x)
    assert np.all(np.isfinite(g))
    with pytest.raises(NotImplementedError, match="implementation='xla'"):
        jax.grad(lambda x: jnp.sum(jax.grad(lambda x: f(x, w, y))(x) ** 2))(x)

    def gg(impl):
        f = functools.partial(
            linear_cross_entropy, ignore_index=IGNORE, implementation=impl
        )
        return jax.grad(lambda x: jnp.sum(jax.grad(lambda x: f(x, w, y))(x) ** 2))(x)

    _close(gg("xla"), gg("reference"), jnp.float32)


def test_registered_not_default():
    assert set(IMPLS) <= set(_registry.names("linear"))
    assert _registry.canonical("linear", None) == "xla"


@pytest.mark.parametrize("impl", IMPLS)
def test_every_pallas_call_carries_a_cost_estimate(impl):
    # Without cost_estimate= XLA counts a Pallas kernel as free (issue 27):
    # value_and_grad's kernels together must declare at least the forward's,
    # dx's and dW's matmuls, 3 x 2NDV (over whole tiles: more), plus the
    # recomputed logits of the backward pass (4 x 2NDV on TPU).
    x, w, b, y, _, _ = _data(jnp.float32, rows=False)

    def loss(x, w):
        kw = dict(bias=b, ignore_index=IGNORE, implementation=impl)
        return linear_cross_entropy(x, w, y, **kw)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    calls = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
    assert calls, jaxpr
    estimates = [e.params.get("cost_estimate") for e in calls]
    assert all(c is not None for c in estimates), [e.params["name"] for e in calls]
    flops = sum(c.flops for c in estimates)
    assert flops >= (4 if impl == "pallas_tpu" else 3) * 2 * N * D * V, flops
    assert all(c.transcendentals > 0 and c.bytes_accessed > 0 for c in estimates)


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    """Found by the differential fuzzer (issue 9): no tokens raised
    ZeroDivisionError from the grid's size; the value and the (zero) gradients
    are the XLA kernel's."""
    x, w, b, y, _, _ = _data(jnp.float32, False)

    def step(x, w, b, impl, reduction):
        def loss(x, w, b):
            kw = dict(bias=b, reduction=reduction, implementation=impl)
            return jnp.sum(linear_cross_entropy(x, w, y[:0], **kw))

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)

    for reduction in ("none", "sum"):
        got = step(x[:0], w, b, impl, reduction)
        want = step(x[:0], w, b, "xla", reduction)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.slow
def test_float32_under_x64(impl):
    """Found by the differential fuzzer (issue 9): with x64 on, the Triton
    kernel's D loop counted in int64 and the interpreter's atomic add refused
    its mixed int32/int64 indices (TypeError in every gradient)."""
    x, w, b, y, cw, _ = _data(jnp.float32, False)

    def step(impl):
        def loss(x, w, b, cw):
            kw = dict(
                bias=b, class_weights=cw, label_smoothing=0.1, ignore_index=IGNORE
            )
            return linear_cross_entropy(x, w, y, implementation=impl, **kw)

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, w, b, cw)

    with jax.enable_x64(True):
        got, want = step(impl), step("reference")
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_symbolic_shapes_are_refused(impl):
    n = jax.export.symbolic_shape("n")[0]
    f = jax.jit(lambda x, w, y: linear_cross_entropy(x, w, y, implementation=impl))
    args = (
        jax.ShapeDtypeStruct((n, D), jnp.float32),
        jax.ShapeDtypeStruct((D, V), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    with pytest.raises(NotImplementedError, match="static shapes"):
        jax.export.export(f, platforms=["cpu"])(*args)


# --- vocabulary parallelism ---------------------------------------------------

SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from xent_jax import linear_cross_entropy as lce
from xent_jax._linear import tiles
tiles.TILES["tpu"] = tiles.Tiles(8, 128)
tiles.TILES["triton"] = tiles.Tiles(16, 16, 16, programs=4)
from xent_jax._linear import pallas_triton
pallas_triton.DW_SPAN_BYTES = 16 * 16 * 4  # dw in spans of one tile: the loop
auto = (jax.sharding.AxisType.Auto,) * 2
mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=auto)
rng = np.random.default_rng(0)
n, d, v, real = 26, 16, 300, 290  # 150 classes a shard, the last 10 padding
x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
w = jnp.asarray(rng.normal(size=(d, v)) * 0.6, jnp.float32)
b = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
cw = jnp.asarray(rng.uniform(0.5, 2.0, v), jnp.float32)
y = rng.integers(0, real, n)
y[3], y[-1] = -100, real - 1
y = jnp.asarray(y, jnp.int32)
cts = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
ALL = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0, temperature=0.9)
VARIANTS = {  # implementation: options, w as [V, D], check_vma
    "pallas_triton": (ALL, False, True),
    "pallas_tpu": (dict(filter_threshold=0.0, logit_softcap=3.0), True, False),
}


def objective(x, w, b, cw, y, cts, impl, opts, rows, axis_name=None):
    loss, aux = lce(x, w.T if rows else w, y, bias=b, class_weights=cw,
                    ignore_index=-100, num_classes=real, reduction="none",
                    implementation=impl, axis_name=axis_name, return_aux=True,
                    w_layout="vd" if rows else "dv", **opts)
    total = jnp.sum(cts[0] * loss + cts[1] * aux.lse + cts[2] * aux.entropy)
    return total, (loss, aux.lse, aux.entropy, aux.argmax)


grad = jax.value_and_grad(objective, (0, 1, 2, 3), has_aux=True)
ws, vs, rs = P(None, "model"), P("model"), P("data")
for impl, (opts, rows, vma) in VARIANTS.items():
    want_outs, want_grads = grad(x, w, b, cw, y, cts, "reference", opts, rows)
    want_outs = want_outs[1]

    def step(x, w, b, cw, y, cts, opts=opts, rows=rows, vma=vma, impl=impl):
        (_, outs), grads = grad(x, w, b, cw, y, cts, impl, opts, rows, "model")
        if not vma:  # the caller sums the parts: dx over model, the rest over data
            grads = (jax.lax.psum(grads[0], "model"),) + jax.lax.psum(grads[1:], "data")
        return outs, grads

    f = jax.jit(jax.shard_map(
        step, mesh=mesh, check_vma=vma,
        in_specs=(rs, ws, vs, vs, rs, P(None, "data")),
        out_specs=((rs,) * 4, (rs, ws, vs, vs))))
    outs, grads = f(x, w, b, cw, y, cts)
    for a, r in zip(outs[:3] + grads, want_outs[:3] + want_grads):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4, err_msg=impl)
    assert (outs[3] == want_outs[3]).all(), impl
    assert (np.asarray(grads[1])[:, real:] == 0).all(), impl
print("ok")
"""


@pytest.mark.slow
def test_vocabulary_parallel_shard_map():
    """axis_name under shard_map (2 data x 2 model CPU devices, the last shard
    padded): Triton with check_vma on (every option, aux), TPU with it off
    (filter, row layout)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SHARDED)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# --- lowering for the accelerators --------------------------------------------

BENCHMARK_SHAPES = {"gemma2": (8192, 2304, 256000), "qwen": (16384, 4096, 151936)}
EXPORT_OPTIONS = {
    "all_options_bf16": (
        jnp.bfloat16,
        False,
        dict(
            ignore_index=IGNORE,
            label_smoothing=0.1,
            class_weights=True,
            z_loss=1e-4,
            logit_softcap=30.0,
            temperature=0.7,
            num_classes=4990,
        ),
    ),
    "aux_rows_f32": (jnp.float32, True, dict(return_aux=True, num_classes=4990)),
    # without a cap the temperature divides the x tile, in float32
    "temperature_bf16": (jnp.bfloat16, False, dict(temperature=0.7, z_loss=1e-4)),
    "filter_rows_bf16": (jnp.bfloat16, True, dict(filter_threshold=1e-5)),
}


def _export(impl, n, d, v, dtype, rows=False, opts=None):
    """The StableHLO of ``value_and_grad`` of the mean loss, lowered for the
    kernel's platform from this CPU host (nothing is allocated or run)."""
    opts = dict(opts or {})

    def loss(x, w, b, cw, y):
        o = dict(opts)
        if o.get("class_weights"):
            o["class_weights"] = cw
        out = linear_cross_entropy(
            x, w, y, bias=b, implementation=impl, w_layout="vd" if rows else "dv", **o
        )
        return out[0] + jnp.sum(out[1].entropy) if isinstance(out, tuple) else out

    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((v, d) if rows else (d, v), dtype),
        jax.ShapeDtypeStruct((v,), jnp.float32),
        jax.ShapeDtypeStruct((v,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    if impl == "pallas_tpu":
        return jax.export.export(f, platforms=["tpu"])(*args).mlir_module()
    with _compat.lowering_gpu():
        exported = jax.export.export(
            f, platforms=["cuda"], disabled_checks=[TRITON_CHECK]
        )(*args)
    return exported.mlir_module()


def _kernel_calls(impl, text) -> int:
    target = "tpu_custom_call" if impl == "pallas_tpu" else "__gpu$xla.gpu.triton"
    return text.count(f"stablehlo.custom_call @{target}(")


@pytest.mark.parametrize("shape", [slow(s, id=str(s)) for s in BENCHMARK_SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_export_benchmark_shapes(impl, shape, monkeypatch):
    """The benchmark shapes in bf16 lower to compiled kernels: forward, dx and
    dw on TPU; in Triton the forward, and the backward as loops over spans
    (dx by token spans, dw by vocabulary spans) and their rests."""
    for platform, t in DEFAULT_TILES.items():
        monkeypatch.setitem(tiles.TILES, platform, t)
    text = _export(impl, *BENCHMARK_SHAPES[shape], jnp.bfloat16)
    calls = _kernel_calls(impl, text)
    assert calls == 3 if impl == "pallas_tpu" else 2 <= calls <= 5, calls


@pytest.mark.parametrize("name", list(EXPORT_OPTIONS))
@pytest.mark.parametrize("impl", IMPLS)
def test_export_options(impl, name, monkeypatch):
    for platform, t in DEFAULT_TILES.items():
        monkeypatch.setitem(tiles.TILES, platform, t)
    dtype, rows, opts = EXPORT_OPTIONS[name]
    text = _export(impl, 1000, 300, 5000, dtype, rows, opts)
    assert _kernel_calls(impl, text) >= 2
