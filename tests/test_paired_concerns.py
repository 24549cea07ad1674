"""The concern tests of ``tests/ops.py``, for the losses on two inputs'
products: ``clip_loss``, ``siglip_loss`` and ``linear_distillation_loss``.

``tests/ops.py`` drives its checks through logits and labels; these losses
take embeddings or hidden states and heads, so their entries live here, one
:class:`Paired` per op and implementation (every one the registry has, as
there). The concerns: contracts (trace-time errors, the same when lowered
for TPU and GPU, with chex's asserts disabled, output shapes and dtypes,
options as Python or NumPy scalars), transformations (grad of jit, jit of
grad, scan, remat, vmap, no tracer leaks, Hessian-vector products against
the reference's) and invariances (pairs or classes permuted). Values against
float64 formulas are in ``test_contrastive.py`` and ``test_distillation.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import assert_close
from jax import export

import xent_jax as xj
from xent_jax import _compat, _registry

N, D, V = 6, 3, 11
REGISTRY = {"clip": "clip", "siglip": "siglip", "distillation": "distillation"}


@dataclasses.dataclass(frozen=True)
class Paired:
    kind: str  # "clip", "siglip" or "distillation"
    impl: str

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.impl}"

    @property
    def reductions(self) -> tuple[str, ...]:
        extra = ("mean_per_segment",) if self.kind == "distillation" else ()
        return ("none", "sum", "mean") + extra

    def args(self, dtype=jnp.float32, seed: int = 0, lead=(N,)):
        """``(positional, keywords)``: the first two positional arguments are
        the differentiated ones."""
        rng = np.random.default_rng(seed)

        def normal(*shape, scale=1.0):
            return jnp.asarray(scale * rng.normal(size=shape), dtype)

        if self.kind == "distillation":
            x, xt = normal(*lead, D, scale=0.8), normal(*lead, D + 1, scale=0.8)
            w, wt = normal(D, V), normal(D + 1, V)
            y = jnp.asarray(rng.integers(0, V, size=lead), jnp.int32)
            kw = dict(alpha=0.3, temperature=1.5, teacher_grad=True, block_size=4)
            return (x, w, xt, wt, y), kw
        a, b = normal(*lead, D), normal(*lead, D)
        scalars = (jnp.asarray(2.0, dtype),)
        if self.kind == "siglip":
            scalars += (jnp.asarray(-1.0, dtype),)
        return (a, b, *scalars), dict(block_size=4)

    def __call__(self, *args, **kw):
        fn = {
            "clip": xj.clip_loss,
            "siglip": xj.siglip_loss,
            "distillation": xj.linear_distillation_loss,
        }[self.kind]
        return fn(*args, implementation=self.impl, **kw)


PAIRED = [
    Paired(kind, impl) for kind, op in REGISTRY.items() for impl in _registry.names(op)
]
every = pytest.mark.parametrize("op", PAIRED, ids=lambda p: p.id)


def test_the_registry_has_a_reference_and_an_xla_kernel_for_each():
    for op in REGISTRY.values():
        assert set(_registry.names(op)) == {"xla", "reference"}, op


# --- contracts ------------------------------------------------------------------


def _violation(op: Paired, args):
    """The op's arguments with the second one's last axis one too long."""
    bad = list(args)
    bad[1 if op.kind != "distillation" else 2] = jnp.pad(
        args[1 if op.kind != "distillation" else 2], ((0, 1), (0, 0))
    )
    return tuple(bad)


def _error(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


@every
@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_contracts_fire_at_trace_time_the_same_when_lowered_for_each_platform(
    op, platform
):
    args, kw = op.args()
    bad = _violation(op, args)
    eager = _error(lambda: op(*bad, **kw))
    assert eager[0] is ValueError and "must have shape" in eager[1], eager
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in bad]
    lowered = export.export(jax.jit(functools.partial(op, **kw)), platforms=[platform])
    assert _error(lambda: lowered(*specs)) == eager
    assert _error(lambda: jax.jit(functools.partial(op, **kw))(*bad)) == eager


@every
def test_contracts_hold_with_chex_asserts_disabled(op):
    args, kw = op.args()
    chex.disable_asserts()
    try:
        with pytest.raises(ValueError, match="must have shape"):
            op(*_violation(op, args), **kw)
    finally:
        chex.enable_asserts()


@every
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_output_shape_and_dtype_for_every_reduction(op, dtype):
    # 16-bit inputs give float32 losses; "none" the positions' shape.
    lead = (N,) if op.kind != "distillation" else (2, 3)
    args, kw = op.args(dtype, lead=lead)
    out = jax.eval_shape(
        lambda *a: {r: op(*a, reduction=r, **kw) for r in op.reductions}, *args
    )
    for r, value in out.items():
        assert value.shape == (lead if r == "none" else ()), (r, value.shape)
        assert value.dtype == jnp.float32, (r, value.dtype)


@every
def test_options_as_python_and_numpy_scalars(op):
    args, kw = op.args()
    want = op(*args, reduction="none", **kw)
    if op.kind == "distillation":
        variants = [
            dict(kw, temperature=np.float32(1.5), alpha=np.float64(0.3)),
            dict(kw, block_size=np.int64(4), temperature=1.5, alpha=0.3),
        ]
        calls = [(args, v) for v in variants]
    else:
        scalars = [[float(s) for s in args[2:]], [np.float32(s) for s in args[2:]]]
        calls = [((*args[:2], *s), dict(kw, block_size=np.int32(4))) for s in scalars]
    for a, k in calls:
        assert_close(op(*a, reduction="none", **k), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="block_size"):
        op(*args, reduction="none", **dict(kw, block_size=4.0))


# --- transformations -------------------------------------------------------------


def _close(got, want, **tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, **tol)


def _mean_loss(op: Paired, kw):
    def f(first, second, rest):
        return op(first, second, *rest, reduction="mean", **kw)

    return f


@every
def test_grad_of_jit_jit_of_grad_scan_remat_vmap_and_no_tracer_leaks(op):
    batches = [op.args(seed=s) for s in range(3)]
    kw = batches[0][1]
    f = _mean_loss(op, kw)
    grad = jax.grad(f, argnums=(0, 1))
    expected = [grad(a[0], a[1], a[2:]) for a, _ in batches]
    for i, (a, _) in enumerate(batches):
        for g in (jax.jit(grad), jax.grad(jax.jit(f), argnums=(0, 1))):
            _close(g(a[0], a[1], a[2:]), expected[i], rtol=1e-6, atol=1e-7)
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *[a for a, _ in batches])

    def body(total, a):
        return total + f(a[0], a[1], a[2:]), grad(a[0], a[1], a[2:])

    _, scanned = jax.lax.scan(body, 0.0, stacked)
    vmapped = jax.vmap(lambda a: grad(a[0], a[1], a[2:]))(stacked)
    remat = jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1)))
    for i, (a, _) in enumerate(batches):
        for got in (
            jax.tree.map(lambda v, i=i: v[i], scanned),
            remat(a[0], a[1], a[2:]),
        ):
            _close(got, expected[i], rtol=1e-6, atol=1e-7)
        _close(
            jax.tree.map(lambda v, i=i: v[i], vmapped),
            expected[i],
            rtol=1e-5,
            atol=1e-6,
        )
    with jax.checking_leaks():
        a = batches[0][0]
        jax.jit(grad)(a[0], a[1], a[2:])


@pytest.mark.parametrize("kind", list(REGISTRY))
def test_hessian_vector_products_match_the_reference(kind):
    # Second order through the custom_vjp: its backward pass is made of
    # differentiable operations.
    with _compat.enable_x64():
        xla, reference = Paired(kind, "xla"), Paired(kind, "reference")
        args, kw = xla.args(jnp.float64, seed=4)
        v = jax.tree.map(
            lambda a: jnp.cos(jnp.arange(a.size) + 1.0).reshape(a.shape), args[0]
        )

        def hvp(op):
            f = _mean_loss(op, kw)

            def g(first):
                return jnp.vdot(jax.grad(f)(first, args[1], args[2:]), v)

            return jax.jit(jax.grad(g))(args[0])

        _close(hvp(xla), hvp(reference), rtol=1e-9, atol=1e-11)


# --- invariances -------------------------------------------------------------------


@every
def test_permutations_permute_the_losses(op):
    # Contrastive: permuting the pairs permutes their losses. Distillation:
    # permuting both heads' classes (and the labels) changes nothing.
    args, kw = op.args(seed=7)
    want = op(*args, reduction="none", **kw)
    rng = np.random.default_rng(8)
    if op.kind == "distillation":
        perm = rng.permutation(V)
        x, w, xt, wt, y = args
        inverse = jnp.asarray(np.argsort(perm))
        got = op(x, w[:, perm], xt, wt[:, perm], inverse[y], reduction="none", **kw)
        assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    perm = rng.permutation(N)
    got = op(args[0][perm], args[1][perm], *args[2:], reduction="none", **kw)
    assert_close(got, want[perm], rtol=1e-5, atol=1e-6)
