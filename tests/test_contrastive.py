"""clip_loss and siglip_loss: blockwise kernels against float64 formulas.

The oracle is ``tests/reference.py`` (``clip_pairs``, ``siglip_pairs``: the
whole similarity matrix, explicit shifted log-softmaxes, plain autodiff); the
published formulas are checked through optax (open_clip's loss) and
big_vision's expression; the kernels' gradients also with ``check_grads``.
The multi-device ring is checked in ``tests/sharding_checks.py``
(``contrastive_ring``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from core_helpers import assert_close, value_and_vjps
from jax.test_util import check_grads
from tiers import slow

import xent_jax as xj
from xent_jax import _compat
from xent_jax._contrastive import xla as contrastive_xla

IMPLS = ("xla", "reference")
# (N, D, block_size): one pair; blocks that divide N; blocks that do not (the
# last one overlaps the one before); a block larger than N; the default.
SHAPES = [
    (1, 3, None),
    (5, 3, 2),
    (37, 6, 8),
    slow(16, 4, 16),
    slow(64, 4, None),
    slow(40, 5, 7),
]
F64 = pytest.mark.usefixtures("x64")


@pytest.fixture
def x64():
    with _compat.enable_x64():
        yield


def _unit(rng, n, d, dtype=np.float64):
    v = rng.normal(size=(n, d))
    return jnp.asarray(v / np.linalg.norm(v, axis=1, keepdims=True), dtype)


def _args(kind, n, d, seed=0, dtype=np.float64, scale=3.0, bias=-2.0):
    rng = np.random.default_rng(seed)
    a, b = _unit(rng, n, d, dtype), _unit(rng, n, d, dtype)
    a = a.at[0].set(b[0]) if n > 1 else a  # one perfect pair
    extra = (jnp.asarray(scale, dtype),)
    if kind == "siglip":
        extra += (jnp.asarray(bias, dtype),)
    return (a, b) + extra


def _loss(kind):
    return {"clip": xj.clip_loss, "siglip": xj.siglip_loss}[kind]


def ref_loss(kind):
    return {"clip": ref.clip_pairs, "siglip": ref.siglip_pairs}[kind]


def _oracle(kind):
    return {"clip": ref.clip_pairs, "siglip": ref.siglip_pairs}[kind]


# --- exactness ----------------------------------------------------------------


@F64
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("n, d, block", SHAPES)
def test_per_pair_values_and_every_gradient_match_float64(kind, impl, n, d, block):
    args = _args(kind, n, d)
    ct = jnp.linspace(-1.0, 2.0, n)

    def loss(*x):
        return _loss(kind)(*x, reduction="none", block_size=block, implementation=impl)

    got = value_and_vjps(jax.jit(loss), args, range(len(args)), ct, jit=False)
    want = value_and_vjps(_oracle(kind), args, range(len(args)), ct, jit=False)
    assert_close(got[0], want[0], rtol=1e-13, atol=1e-13, err_msg="loss")
    for name, g, w in zip("a b scale bias".split(), got[1], want[1], strict=False):
        assert g.dtype == jnp.float64 and g.shape == w.shape, name
        assert_close(g, w, rtol=1e-12, atol=1e-12, err_msg=name)


@F64
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(kind, reduction):
    args = _args(kind, 9, 4, seed=1)
    per_pair = _oracle(kind)(*args)
    want = {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": per_pair}
    got = _loss(kind)(*args, reduction=reduction, block_size=4)
    assert_close(got, want[reduction], rtol=1e-13, atol=1e-13, err_msg=reduction)
    g = jax.grad(lambda *x: jnp.sum(_loss(kind)(*x, reduction=reduction)))(*args)
    reduce = {"mean": jnp.mean, "sum": jnp.sum, "none": jnp.sum}[reduction]
    assert_close(
        g,
        jax.grad(lambda *x: reduce(_oracle(kind)(*x)))(*args),
        rtol=1e-12,
        atol=1e-12,
        err_msg="a",
    )


@F64
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_block_size_changes_nothing_beyond_round_off(kind):
    args = _args(kind, 33, 5, seed=2)
    ct = jnp.cos(jnp.arange(33.0))
    base = value_and_vjps(
        lambda *x: _loss(kind)(*x, reduction="none"),
        args,
        range(len(args)),
        ct,
        jit=False,
    )
    for block in (1, 3, 8, 32, 33, 100):
        got = value_and_vjps(
            lambda *x, bs=block: _loss(kind)(*x, reduction="none", block_size=bs),
            args,
            range(len(args)),
            ct,
            jit=False,
        )
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(base), strict=True):
            assert_close(g, w, rtol=1e-13, atol=1e-13, err_msg=f"block {block}")


@F64
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_check_grads(kind):
    args = _args(kind, 6, 3, seed=3, scale=1.5, bias=-0.5)

    def loss(*x):
        return jnp.sum(
            _loss(kind)(*x, reduction="none", block_size=4) * jnp.arange(6.0)
        )

    check_grads(loss, args, order=2, modes=["rev"], atol=1e-7, rtol=1e-7)


# --- hand-computed values and the published formulas ------------------------------


def test_hand_computed_values():
    eye = jnp.eye(2)
    # s = [[2, 0], [0, 2]]: every row and column is log(1 + e^-2).
    assert xj.clip_loss(eye, eye, 2.0) == pytest.approx(math.log1p(math.exp(-2)), 1e-6)
    # s = 10 I - 5: softplus(-5) on the pair, softplus(-5) off it.
    want = 2 * math.log1p(math.exp(-5))
    assert xj.siglip_loss(eye, eye, 10.0, -5.0) == pytest.approx(want, 1e-6)
    # scale 0: uniform softmaxes over N, log N; sigmoids of 0, N log 2 per pair.
    a = jnp.asarray(np.random.default_rng(0).normal(size=(7, 3)), jnp.float32)
    assert xj.clip_loss(a, a, 0.0) == pytest.approx(math.log(7), 1e-6)
    assert xj.siglip_loss(a, a, 0.0, 0.0) == pytest.approx(7 * math.log(2), 1e-6)


def test_clip_is_open_clips_loss_through_optax():
    a, b, scale = _args("clip", 12, 5, seed=4, dtype=np.float32)
    logits = scale * a @ b.T
    labels = jnp.arange(12)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels
    want = (ce(logits, labels).mean() + ce(logits.T, labels).mean()) / 2
    assert xj.clip_loss(a, b, scale) == pytest.approx(float(want), rel=1e-6)


def test_siglip_is_big_visions_loss():
    a, b, scale, bias = _args("siglip", 12, 5, seed=5, dtype=np.float32)
    logits = a @ b.T * scale + bias
    labels = 2 * jnp.eye(12) - 1
    want = -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))
    assert xj.siglip_loss(a, b, scale, bias) == pytest.approx(float(want), rel=1e-6)


# --- dtypes and value regimes -------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_16bit_inputs_are_computed_in_float32(kind, dtype):
    args = _args(kind, 19, 8, seed=6, dtype=dtype)
    ct = jnp.linspace(0.5, 1.5, 19)

    def loss(*x):
        return _loss(kind)(*x, reduction="none", block_size=8)

    got = value_and_vjps(loss, args, range(len(args)), ct, jit=False)
    assert got[0].dtype == jnp.float32
    with _compat.enable_x64():
        wide = tuple(jnp.asarray(np.asarray(v, np.float64)) for v in args)
        want = value_and_vjps(
            _oracle(kind), wide, range(len(wide)), ct.astype(np.float64), jit=False
        )
    assert_close(got[0], want[0], rtol=2e-6, atol=2e-6, err_msg="loss")
    for g, w, p in zip(got[1], want[1], args, strict=True):
        assert g.dtype == p.dtype
        # One rounding to the 16-bit dtype of a float32-accurate gradient.
        eps = float(jnp.finfo(dtype).eps)
        assert_close(
            g, w, rtol=eps, atol=eps * np.max(np.abs(np.asarray(w))), err_msg="gradient"
        )


@F64
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_huge_logits_stay_exact(kind):
    # scale 1e4: logits of +-1e4, every exp overflows without the shift.
    args = _args(kind, 11, 4, seed=7, scale=1e4, bias=-30.0)
    ct = jnp.ones(11)
    got = value_and_vjps(
        lambda *x: _loss(kind)(*x, reduction="none", block_size=4),
        args,
        range(len(args)),
        ct,
        jit=False,
    )
    want = value_and_vjps(_oracle(kind), args, range(len(args)), ct, jit=False)
    assert np.all(np.isfinite(np.asarray(got[0])))
    assert_close(got[0], want[0], rtol=1e-12, atol=1e-9, err_msg="loss")
    for g, w in zip(got[1], want[1], strict=True):
        assert_close(g, w, rtol=1e-10, atol=1e-7, err_msg="gradient")


def test_a_nan_embedding_makes_exactly_the_losses_it_enters_nan():
    a, b, scale, bias = _args("siglip", 6, 3, seed=8, dtype=np.float32)
    a = a.at[2, 1].set(jnp.nan)
    sig = xj.siglip_loss(a, b, scale, bias, reduction="none", block_size=4)
    assert np.isnan(sig[2]) and np.all(np.isfinite(np.delete(np.asarray(sig), 2)))
    # CLIP's columns are softmaxes over every row: row 2's NaN enters them all.
    clip = xj.clip_loss(a, b, scale, reduction="none", block_size=4)
    assert np.all(np.isnan(clip))


# --- transformations ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vmap_jit_checkpoint_and_export(kind):
    args = _args(kind, 10, 4, seed=9, dtype=np.float32)

    def loss(*x):
        return _loss(kind)(*x, block_size=4)

    grads = jax.grad(loss, argnums=(0, 1, 2))
    eager = grads(*args)
    for name, fn in [
        ("jit", jax.jit(grads)),
        ("checkpoint", jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2))),
    ]:
        for g, w in zip(fn(*args), eager, strict=True):
            assert_close(g, w, rtol=1e-6, atol=1e-7, err_msg=name)
    batch = tuple(jnp.stack([v, v * 0.5]) for v in args)
    batched = jax.vmap(loss)(*batch)
    assert_close(
        batched,
        [loss(*args), loss(*(v * 0.5 for v in args))],
        rtol=1e-6,
        atol=1e-7,
        err_msg="vmap",
    )
    # The row blocks are slices of a: a symbolic N needs N >= the block.
    n = jax.export.symbolic_shape("n", constraints=("n >= 4",))[0]
    specs = [jax.ShapeDtypeStruct((n, 4), jnp.float32)] * 2
    specs += [jax.ShapeDtypeStruct((), jnp.float32)] * (len(args) - 2)
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss)))(*specs)
    v, g = exported.call(*args)
    assert_close(v, loss(*args), rtol=1e-6, atol=1e-7, err_msg="export")
    assert_close(g, eager[0], rtol=1e-6, atol=1e-7, err_msg="export grad")


# --- memory -------------------------------------------------------------------


def _temp_mib(fn, n, d, extra):
    specs = [jax.ShapeDtypeStruct((n, d), jnp.float32)] * 2
    specs += [jax.ShapeDtypeStruct((), jnp.float32)] * extra
    step = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(2 + extra))))
    return step.lower(*specs).compile().memory_analysis().temp_size_in_bytes / 2**20


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_memory_is_blocks_plus_linear_in_n_never_n_squared(kind):
    extra = 1 if kind == "clip" else 2

    def blockwise(*x):
        return _loss(kind)(*x, block_size=64)

    def materialised(*x):
        return _loss(kind)(*x, implementation="reference")

    d = 32
    small, large = (_temp_mib(blockwise, n, d, extra) for n in (4096, 8192))
    full = _temp_mib(materialised, 8192, d, extra)
    tile = 64 * 8192 * 4 / 2**20  # one float32 block of 64 rows, 2 MiB
    accumulators = 2 * 8192 * d * 4 / 2**20  # float32 da, db
    assert large <= 4 * tile + accumulators + 1, (large, tile, accumulators)
    assert large <= full / 10, (large, full)
    assert large <= 2.2 * small, (small, large)  # linear, not quadratic, in N


@F64
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("impl", IMPLS)
def test_where_equals_slicing_the_pairs(kind, impl):
    # Padding pairs dropped by where: the loss of the kept pairs alone, 0
    # and exactly zero gradient for the dropped ones, the mean over the kept;
    # a NaN in a dropped pair (uninitialised padding) reaches nothing.
    args = _args(kind, 11, 4, seed=21)
    args = (args[0].at[1, 0].set(jnp.nan), args[1].at[4, 2].set(jnp.inf), *args[2:])
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], bool)
    f = _loss(kind)
    nums = tuple(range(len(args)))

    def masked(*a, reduction="mean"):
        return f(*a, where=keep, reduction=reduction, block_size=3, implementation=impl)

    def sliced(*a):
        return ref_loss(kind)(a[0][keep], a[1][keep], *a[2:]).mean()

    got = jax.value_and_grad(masked, argnums=nums)(*args)
    want = jax.value_and_grad(sliced, argnums=nums)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, rtol=1e-10, atol=1e-12)
    for grad in got[1][:2]:
        np.testing.assert_array_equal(np.asarray(grad)[~keep], 0)
    per = masked(*args, reduction="none")
    np.testing.assert_array_equal(np.asarray(per)[~keep], 0)
    assert_close(
        np.asarray(per)[keep], ref_loss(kind)(args[0][keep], args[1][keep], *args[2:])
    )
    # Nothing kept: loss 0, gradients exactly 0, no NaN.
    none = np.zeros(11, bool)
    value, grads = jax.value_and_grad(
        lambda *a: f(*a, where=none, implementation=impl), argnums=nums
    )(*args)
    assert float(value) == 0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0)


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bad_input_raises_naming_the_argument(kind):
    a, b, *extra = _args(kind, 4, 3, dtype=np.float32)
    f = _loss(kind)
    with pytest.raises(ValueError, match=r"\bb\b.*\(4, 3\).*\(4, 2\)"):
        f(a, b[:, :2], *extra)
    with pytest.raises(ValueError, match=r"\bb\b.*\(4, 3\).*\(3, 3\)"):
        f(a, b[:3], *extra)
    with pytest.raises(ValueError, match=r"\ba\b must be \[N, D\]"):
        f(a[None], b, *extra)
    with pytest.raises(TypeError, match=r"\ba\b must have a floating dtype; got int32"):
        f(jnp.ones((4, 3), jnp.int32), b, *extra)
    with pytest.raises(TypeError, match=r"one dtype; got float32 and bfloat16"):
        f(a, b.astype(jnp.bfloat16), *extra)
    with pytest.raises(ValueError, match=r"\bscale\b must have shape \(\)"):
        f(a, b, jnp.ones(2), *extra[1:])
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        f(a, b, *extra, reduction="mean_per_segment")
    with pytest.raises(ValueError, match=r"block_size must be at least 1; got 0"):
        f(a, b, *extra, block_size=0)
    with pytest.raises(TypeError, match=r"block_size must be a Python int"):
        f(a, b, *extra, block_size=2.0)
    with pytest.raises(ValueError, match=r"implementation must be one of"):
        f(a, b, *extra, implementation="pallas_tpu")
    with pytest.raises(ValueError, match=r"where must have shape \(4,\).*\(3,\)"):
        f(a, b, *extra, where=jnp.ones(3, bool))
    with pytest.raises(
        TypeError, match=r"where must be a boolean mask; got dtype int32"
    ):
        f(a, b, *extra, where=jnp.ones(4, jnp.int32))


def test_row_block_defaults():
    assert contrastive_xla.row_block(10, 10, None) == 10
    assert contrastive_xla.row_block(32768, 32768, None) == 128
    assert contrastive_xla.row_block(100, 100, 7) == 7
    assert contrastive_xla.row_block(100, 100, 500) == 100
