"""linear_distillation_loss: the blockwise kernel against float64 formulas.

The oracle is ``tests/reference.py``'s ``distillation`` (both heads'
logits materialised, explicit log-softmaxes, plain autodiff); Hinton's
knowledge-distillation loss is checked through optax's ``kl_divergence``;
the kernel's gradients also with ``check_grads``. Vocabulary parallelism is
checked in ``tests/sharding_checks.py`` (``distillation_vocab_parallel``).
"""

from __future__ import annotations

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

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
IGNORE = -100


@pytest.fixture
def x64():
    with _compat.enable_x64():
        yield


def _data(n=13, d=5, dt=4, v=300, seed=0, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(seed)

    def arr(*shape, std=1.0):
        return jnp.asarray(scale * std * rng.normal(size=shape), dtype)

    labels = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
    return (
        arr(n, d, std=d**-0.5),
        arr(d, v),
        arr(n, dt, std=dt**-0.5),
        arr(dt, v),
        labels,
    )


# (alpha, temperature, teacher_grad, w_layout, block_size): the plain soft
# loss; hard labels at T = 2 with the teacher differentiated; [V, D] heads at
# T = 0.7 with a block that does not divide V; one block larger than V.
OPTIONS = [
    (0.0, 1.0, False, "dv", 128),
    (0.3, 2.0, True, "dv", 128),
    slow(0.5, 0.7, True, "vd", 96),
    slow(1.0, 1.0, False, "dv", 1000),
]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha, temperature, teacher_grad, layout, block", OPTIONS)
def test_values_and_every_gradient_match_float64(
    divergence, impl, alpha, temperature, teacher_grad, layout, block
):
    x, w, xt, wt, y = _data()
    y = y.at[3].set(IGNORE)
    scored = y != IGNORE
    ct = jnp.linspace(0.5, 2.0, 13)
    heads = (w.T, wt.T) if layout == "vd" else (w, wt)

    def loss(x, w, xt, wt):
        return xj.linear_distillation_loss(
            x,
            w,
            xt,
            wt,
            y,
            divergence=divergence,
            temperature=temperature,
            alpha=alpha,
            ignore_index=IGNORE,
            teacher_grad=teacher_grad,
            w_layout=layout,
            block_size=block,
            reduction="none",
            implementation=impl,
        )

    def oracle(x, w, xt, wt):
        if layout == "vd":
            w, wt = w.T, wt.T
        if not teacher_grad:
            xt, wt = jax.lax.stop_gradient(xt), jax.lax.stop_gradient(wt)
        return ref.distillation(
            x, w, xt, wt, y, divergence, 0.5, temperature, alpha, scored
        )

    args = (x, heads[0], xt, heads[1])
    got = value_and_vjps(jax.jit(loss), args, range(4), ct, jit=False)
    want = value_and_vjps(oracle, args, range(4), ct, jit=False)
    assert_close(got[0], want[0], rtol=1e-12, atol=1e-13, err_msg="loss")
    assert got[0][3] == 0
    for name, g, wg in zip(
        ("x", "w", "teacher_x", "teacher_w"), got[1], want[1], strict=True
    ):
        assert g.shape == wg.shape and g.dtype == wg.dtype, name
        assert_close(g, wg, rtol=1e-11, atol=1e-12, err_msg=name)
        if name.startswith("teacher") and not teacher_grad:
            assert not np.any(np.asarray(g)), name


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta(beta):
    x, w, xt, wt, _ = _data(seed=1)
    args = (x, w, xt, wt)

    def loss(*a):
        return xj.linear_distillation_loss(
            *a, divergence="jsd", beta=beta, teacher_grad=True, block_size=128
        )

    got = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)
    want = jax.value_and_grad(
        lambda *a: ref.distillation(*a, None, "jsd", beta).mean(), argnums=(0, 1, 2, 3)
    )(*args)
    for g, wg in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, wg, rtol=1e-11, atol=1e-13, err_msg=f"beta {beta}")


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_check_grads(divergence):
    x, w, xt, wt, y = _data(n=4, d=3, dt=2, v=10, seed=2)

    def loss(*a):
        return xj.linear_distillation_loss(
            *a,
            y,
            divergence=divergence,
            alpha=0.25,
            temperature=1.5,
            teacher_grad=True,
            block_size=4,
        )

    check_grads(loss, (x, w, xt, wt), order=1, modes=["rev"], atol=1e-7, rtol=1e-7)


# --- hand values and the published formulas ---------------------------------------


def test_hand_computed_value():
    x = jnp.eye(2)
    teacher_w = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
    want = (0.9 * np.log(1.8) + 0.1 * np.log(0.2)) / 2  # KL(P || uniform)
    loss = xj.linear_distillation_loss(x, jnp.zeros((2, 2)), x, teacher_w)
    assert float(loss) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_student_equal_to_its_teacher_has_loss_and_gradient_zero(divergence):
    x, w, *_ = _data(dtype=np.float32, seed=3)
    loss, g = jax.value_and_grad(
        lambda x, w: xj.linear_distillation_loss(x, w, x, w, divergence=divergence),
        argnums=(0, 1),
    )(x, w)
    assert abs(float(loss)) < 1e-6
    assert max(float(jnp.max(jnp.abs(v))) for v in g) < 1e-6


def test_forward_kl_is_hintons_loss_through_optax():
    x, w, xt, wt, _ = _data(dtype=np.float32, seed=4)
    t = 3.0
    log_q = jax.nn.log_softmax(x @ w / t)
    p = jax.nn.softmax(xt @ wt / t)
    want = t**2 * optax.losses.kl_divergence(log_q, p).mean()
    got = xj.linear_distillation_loss(x, w, xt, wt, temperature=t)
    # optax's float32 sum of p log p - p log q cancels to 1e-2: absolute
    assert float(got) == pytest.approx(float(want), abs=5e-6)


def test_alpha_one_is_the_fused_cross_entropy():
    x, w, xt, wt, y = _data(dtype=np.float32, seed=5)
    got = xj.linear_distillation_loss(x, w, xt, wt, y, alpha=1.0, temperature=4.0)
    assert float(got) == pytest.approx(
        float(xj.linear_cross_entropy(x, w, y)), rel=1e-6
    )


# --- which positions are scored ---------------------------------------------------


def test_shift_segments_where_and_the_means_over_scored_positions_and_sequences():
    x, w, xt, wt, _ = _data(n=12, dtype=np.float32, seed=6)
    x, xt = x.reshape(2, 6, -1), xt.reshape(2, 6, -1)
    segments = jnp.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, -1, -1]])
    where = jnp.ones((2, 6), bool).at[0, 1].set(False)
    per = xj.linear_distillation_loss(
        x, w, xt, wt, shift=1, segment_ids=segments, where=where, reduction="none"
    )
    # Scored: not the last position, not the last of a segment, not padding,
    # not where-masked.
    scored = np.array([[1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 0, 0]], bool)
    full = ref.distillation(x.reshape(12, -1), w, xt.reshape(12, -1), wt).reshape(2, 6)
    assert_close(
        per, np.where(scored, full, 0), rtol=1e-5, atol=1e-6, err_msg="per position"
    )
    mean = xj.linear_distillation_loss(
        x, w, xt, wt, shift=1, segment_ids=segments, where=where
    )
    assert_close(mean, full[scored].mean(), rtol=1e-5, atol=1e-6, err_msg="mean")
    # Per packed sequence: row 0's segments score {0} and {3, 4}, row 1's
    # {0} and {2}; its padding segment scores nothing and is not counted.
    per_segment = xj.linear_distillation_loss(
        x,
        w,
        xt,
        wt,
        shift=1,
        segment_ids=segments,
        where=where,
        reduction="mean_per_segment",
    )
    f = np.asarray(full)
    want = (f[0, 0] + (f[0, 3] + f[0, 4]) / 2 + f[1, 0] + f[1, 2]) / 4
    assert_close(per_segment, want, rtol=1e-5, atol=1e-6, err_msg="per segment")
    # Without segment_ids every row is one sequence.
    per_row = xj.linear_distillation_loss(
        x, w, xt, wt, shift=1, where=where, reduction="mean_per_segment"
    )
    rows = np.array([[1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], bool)
    want = np.mean([f[r][rows[r]].mean() for r in range(2)])
    assert_close(per_row, want, rtol=1e-5, atol=1e-6, err_msg="per row")
    for reduction in ("mean", "mean_per_segment"):
        grads = jax.grad(
            lambda x, r=reduction: xj.linear_distillation_loss(
                x, w, xt, wt, shift=1, segment_ids=segments, where=where, reduction=r
            )
        )(x)
        assert not np.any(np.asarray(grads)[~scored]), reduction
        assert np.all(np.any(np.asarray(grads)[scored] != 0, axis=-1)), reduction


def test_out_of_range_labels_raise_or_give_nan_with_no_gradient():
    x, w, xt, wt, y = _data(dtype=np.float32, seed=7)
    bad = y.at[2].set(300)
    with pytest.raises(ValueError, match=r"labels\[2\] = 300"):
        xj.linear_distillation_loss(x, w, xt, wt, bad, alpha=0.5)

    @jax.jit
    def per(x, labels):
        return xj.linear_distillation_loss(
            x, w, xt, wt, labels, alpha=0.5, reduction="none"
        )

    out = per(x, bad)
    assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(np.asarray(out), 2)))
    g = jax.grad(lambda x: jnp.nansum(per(x, bad)))(x)
    assert not np.any(np.asarray(g[2]))


# --- dtypes, value regimes, transformations ---------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_heads_are_computed_in_float32(dtype):
    x, w, xt, wt, y = _data(dtype=dtype, seed=8)
    ct = jnp.ones(13)

    def loss(*a):
        return xj.linear_distillation_loss(
            *a,
            y,
            alpha=0.5,
            divergence="jsd",
            teacher_grad=True,
            block_size=128,
            reduction="none",
        )

    got = value_and_vjps(loss, (x, w, xt, wt), range(4), ct, jit=False)
    assert got[0].dtype == jnp.float32
    with _compat.enable_x64():
        wide = [jnp.asarray(np.asarray(v, np.float64)) for v in (x, w, xt, wt)]
        want = value_and_vjps(
            lambda *a: ref.distillation(*a, y, "jsd", 0.5, 1.0, 0.5),
            wide,
            range(4),
            ct.astype(np.float64),
            jit=False,
        )
        want = jax.tree.map(np.asarray, want)
    assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, err_msg="loss")
    eps = float(jnp.finfo(dtype).eps)
    for g, wg, p in zip(got[1], want[1], (x, w, xt, wt), strict=True):
        assert g.dtype == p.dtype
        assert_close(
            g, wg, rtol=2 * eps, atol=2 * eps * np.max(np.abs(wg)), err_msg="gradient"
        )


def test_mixed_dtypes_never_round_the_wider_operand():
    # bfloat16 activations against float32 (master) weights: the products
    # run in float32, as the materialised loss would compute them.
    x, w, xt, wt, y = _data(seed=11, dtype=np.float32)
    x, xt = x.astype(jnp.bfloat16), xt.astype(jnp.bfloat16)

    def loss(impl):
        return jax.value_and_grad(
            lambda x, w: xj.linear_distillation_loss(
                x, w, xt, wt, y, alpha=0.5, block_size=128, implementation=impl
            ),
            argnums=(0, 1),
        )(x, w)

    got, want = loss("xla"), loss("reference")
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.float32
    assert_close(got[0], want[0], rtol=1e-6, atol=1e-7, err_msg="loss")
    assert_close(got[1][1], want[1][1], rtol=1e-5, atol=1e-7, err_msg="dw")


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_huge_logits_stay_exact(divergence):
    # Logits near 1e4: every exponential overflows without the shifts.
    x, w, xt, wt, y = _data(seed=9, scale=3e3)
    args = (x, w, xt, wt)

    def loss(*a):
        return xj.linear_distillation_loss(
            *a, y, divergence=divergence, alpha=0.5, teacher_grad=True, block_size=128
        )

    got = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)
    want = jax.value_and_grad(
        lambda *a: ref.distillation(*a, y, divergence, 0.5, 1.0, 0.5).mean(),
        argnums=(0, 1, 2, 3),
    )(*args)
    assert np.isfinite(float(got[0]))
    for g, wg in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(
            g,
            wg,
            rtol=1e-9,
            atol=1e-9 * np.max(np.abs(np.asarray(wg))),
            err_msg=divergence,
        )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_class_heads_give_exactly_zero_loss_and_gradient(divergence):
    # Found by the fuzzer: with D = 1 XLA turns each logit's product into a
    # multiply and contracts it with the subtraction of the log-sum-exp into
    # an FMA, so z - lse was the product's rounding error (1e-6), not 0, and
    # one class's probability 1 - 1e-6: dW = -3.7e-4 where every gradient is
    # 0 (a single class is certain for both heads).
    x = np.array([[103.67525482], [246.48544312]], np.float32)
    w = np.array([[0.33043706]], np.float32)
    xt = np.array([[-390.94717407], [271.60675049]], np.float32)
    wt = np.array([[0.44637457]], np.float32)
    y = jnp.zeros(2, jnp.int32)

    def loss(x, w, xt, wt):
        return xj.linear_distillation_loss(
            x, w, xt, wt, y, divergence=divergence, alpha=0.5, teacher_grad=True
        )

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, w, xt, wt)
    assert float(value) == 0
    for g in grads:
        np.testing.assert_array_equal(g, 0)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_a_tiny_kl_between_offset_heads_keeps_float32_accuracy(divergence):
    # A student 1e-3 away from its teacher (KL ~1e-6), its logits offset by
    # 300. Differences of exact log-probabilities, (z_t - lse_t) - (z_s -
    # lse_s), lose ~eps * 300 to the rounded log-sum-exps (1.6e-5 here, more
    # than the KL; the two-pass kernel did); the kernel's shifted differences
    # (z_t - s_t) - (z_s - s_s) keep it to float32 rounding of O(1) values.
    rng = np.random.default_rng(12)
    n, d, v = 16, 8, 4000
    x = np.concatenate([rng.normal(size=(n, d)), np.ones((n, 1))], 1)
    w = rng.normal(size=(d, v))
    wt = np.concatenate([w + 1e-3 * rng.normal(size=(d, v)), np.zeros((1, v))])
    w = np.concatenate([w, np.full((1, v), 300.0)])
    x, w, wt = (a.astype(np.float32) for a in (x, w, wt))
    got = xj.linear_distillation_loss(
        x, w, x, wt, divergence=divergence, reduction="none"
    )
    with _compat.enable_x64():
        want = ref.distillation(
            *(np.float64(a) for a in (x, w, x, wt)), divergence=divergence
        )
    assert float(np.min(want)) > 1e-7
    assert_close(got, want, rtol=0, atol=5e-7, err_msg=divergence)


def test_vmap_checkpoint_and_export():
    x, w, xt, wt, y = _data(n=8, dtype=np.float32, seed=10)

    def loss(x, xt, y):
        return xj.linear_distillation_loss(
            x, w, xt, wt, y, alpha=0.5, divergence="jsd", block_size=128
        )

    grad = jax.grad(loss)
    eager = grad(x, xt, y)
    assert_close(
        jax.jit(jax.grad(jax.checkpoint(loss)))(x, xt, y),
        eager,
        rtol=1e-6,
        atol=1e-7,
        err_msg="ckpt",
    )
    stacked = jax.vmap(loss)(jnp.stack([x, -x]), jnp.stack([xt, xt]), jnp.stack([y, y]))
    assert_close(
        stacked, [loss(x, xt, y), loss(-x, xt, y)], rtol=1e-6, atol=1e-7, err_msg="vmap"
    )
    n = jax.export.symbolic_shape("n")[0]
    specs = (
        jax.ShapeDtypeStruct((n, x.shape[1]), x.dtype),
        jax.ShapeDtypeStruct((n, xt.shape[1]), xt.dtype),
        jax.ShapeDtypeStruct((n,), y.dtype),
    )
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss)))(*specs)
    value, g = exported.call(x, xt, y)
    assert_close(value, loss(x, xt, y), rtol=1e-6, atol=1e-7, err_msg="export")
    assert_close(g, eager, rtol=1e-6, atol=1e-7, err_msg="export grad")


# --- memory ---------------------------------------------------------------------------


def _temp_mib(impl, n, d, v):
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, d), (d, v))] * 2

    def loss(x, w, xt, wt):
        return xj.linear_distillation_loss(
            x, w, xt, wt, implementation=impl, block_size=256
        )

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*specs).compile().memory_analysis().temp_size_in_bytes / 2**20


def test_memory_is_flat_in_the_vocabulary_and_a_tenth_of_materialising():
    n, d = 1024, 64
    small, large = _temp_mib("xla", n, d, 8192), _temp_mib("xla", n, d, 65536)
    full = _temp_mib("reference", n, d, 65536)
    blocks = 8 * n * 256 * 4 / 2**20  # a few float32 [N, 256] blocks
    assert large <= small + 1 and large <= blocks + n * d * 4 * 2 / 2**20 + 1, (
        small,
        large,
    )
    assert large <= full / 10, (large, full)


# --- bad input -----------------------------------------------------------------------


def test_any_number_of_leading_axes():
    # Positions [2, 1, 3, 2]: the per-position losses are the flat ones.
    x, w, xt, wt, y = _data(n=12, dtype=np.float32, seed=13)
    lead = (2, 1, 3, 2)
    f = xj.linear_distillation_loss
    got = f(
        x.reshape(lead + (-1,)),
        w,
        xt.reshape(lead + (-1,)),
        wt,
        y.reshape(lead),
        alpha=0.5,
        reduction="none",
    )
    want = f(x, w, xt, wt, y, alpha=0.5, reduction="none")
    assert got.shape == lead
    assert_close(got.reshape(-1), want, rtol=1e-6, atol=1e-7, err_msg="5-D")


def test_bad_input_raises_naming_the_argument():
    x, w, xt, wt, y = _data(dtype=np.float32)
    f = xj.linear_distillation_loss
    with pytest.raises(
        ValueError, match=r"teacher_w must have the student's vocabulary"
    ):
        f(x, w, xt, wt[:, :-1])
    with pytest.raises(ValueError, match=r"\bx\b must have shape"):
        f(x[:, :-1], w, xt, wt)
    with pytest.raises(ValueError, match=r"teacher_x must be \[..., D\]; got a scalar"):
        f(x, w, xt[0, 0], wt)
    with pytest.raises(ValueError, match=r"teacher_x must have shape"):
        f(x, w, xt[:-1], wt)
    with pytest.raises(TypeError, match=r"teacher_w must have a floating dtype"):
        f(x, w, xt, wt.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"alpha > 0 .* pass labels"):
        f(x, w, xt, wt, alpha=0.5)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0.0, 1.0\]; got 1.5"):
        f(x, w, xt, wt, y, alpha=1.5)
    with pytest.raises(ValueError, match=r'beta is for divergence="jsd"'):
        f(x, w, xt, wt, beta=0.3)
    with pytest.raises(ValueError, match=r"beta must lie in \(0, 1\); got 1.0"):
        f(x, w, xt, wt, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match=r"divergence must be one of"):
        f(x, w, xt, wt, divergence="kl")
    with pytest.raises(ValueError, match=r"temperature must lie in \(0.0"):
        f(x, w, xt, wt, temperature=0.0)
    with pytest.raises(TypeError, match=r"teacher_grad must be a Python bool"):
        f(x, w, xt, wt, teacher_grad="True")
    with pytest.raises(ValueError, match=r"ignore_index needs labels"):
        f(x, w, xt, wt, ignore_index=-100)
    with pytest.raises(ValueError, match=r"labels must have shape"):
        f(x, w, xt, wt, y[:-1])
