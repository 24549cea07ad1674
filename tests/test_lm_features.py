"""What LM trainers compute around the loss: metrics (``return_aux``),
``temperature``, the causal ``shift``, per-segment means and ``[V, D]``
classifiers, for the core losses and the fused loss, every implementation.

Each feature is checked against an independent formulation written here in
plain ``jax.numpy`` / NumPy (``shift`` equals slicing the arrays,
``temperature`` equals dividing the logits, ``mean_per_segment`` equals a loop
over the segments, the metrics equal ``jnp.argmax`` and ``-sum p log p``), in
values and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiers import slow

import xent_jax as xj
from xent_jax import _registry

B, S, D, V = 2, 9, 5, 23
IGNORE = -100
CORE_IMPLS = list(_registry.names("softmax"))
LINEAR_IMPLS = [n for n in _registry.names("linear") if not n.startswith("pallas")]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    y = rng.integers(0, V, (B, S))
    y[0, 4] = IGNORE
    cw = jnp.asarray(rng.uniform(0.3, 2.0, V), jnp.float32)
    return x, w, jnp.asarray(y), cw


def _core(impl):
    def loss(logits, y, **kw):
        return xj.softmax_cross_entropy_with_integer_labels(
            logits, y, implementation=impl, **kw
        )

    return loss


def _fused(impl):
    def loss(logits_or_x, y, w=None, **kw):
        kw.setdefault("reduction", "none")
        return xj.linear_cross_entropy(
            logits_or_x, w, y, implementation=impl, block_size=(4, 8), **kw
        )

    return loss


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# --- metrics ------------------------------------------------------------------


def _plain_metrics(z, y):
    """lse, argmax, correct, entropy of logits z [..., V], plainly."""
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jax.nn.softmax(z, axis=-1)
    entropy = -jnp.sum(p * jax.nn.log_softmax(z, axis=-1), axis=-1)
    argmax = jnp.argmax(z, axis=-1)
    correct = (argmax == y) & (y != IGNORE)
    return lse, argmax, correct, entropy


@pytest.mark.parametrize("impl", CORE_IMPLS)
@pytest.mark.slow
def test_core_aux_metrics(impl):
    x, w, y, _ = _data()
    z = (x @ w).at[1, 3, 7].set(100.0)  # one confident, maybe correct example
    y = y.at[1, 3].set(7)
    loss, aux = _core(impl)(z, y, ignore_index=IGNORE, return_aux=True)
    lse, argmax, correct, entropy = _plain_metrics(z, y)
    _close(aux.lse, lse)
    np.testing.assert_array_equal(aux.argmax, argmax)
    np.testing.assert_array_equal(aux.correct, correct)
    assert aux.correct[1, 3]
    _close(aux.entropy, entropy)
    np.testing.assert_array_equal(aux.scored, y != IGNORE)
    _close(loss, _core(impl)(z, y, ignore_index=IGNORE))


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("w_layout", ["dv", slow("vd")])
def test_fused_aux_metrics(impl, w_layout):
    x, w, y, _ = _data()
    w_in = w.T if w_layout == "vd" else w
    loss, aux = _fused(impl)(
        x, y, w_in, ignore_index=IGNORE, return_aux=True, w_layout=w_layout
    )
    lse, argmax, correct, entropy = _plain_metrics(x @ w, y)
    _close(aux.lse, lse)
    np.testing.assert_array_equal(aux.argmax, argmax)
    np.testing.assert_array_equal(aux.correct, correct)
    _close(aux.entropy, entropy)
    np.testing.assert_array_equal(aux.scored, y != IGNORE)


@pytest.mark.slow
def test_argmax_ties_and_nan_as_jnp_argmax():
    """Ties take the first class, across vocabulary blocks too; a NaN wins."""
    z = jnp.zeros((4, V)).at[0, [3, 17]].set(2.0).at[1].set(-1.0)
    z = z.at[2, 11].set(jnp.nan).at[2, 5].set(jnp.nan).at[3, [9, 20]].set(jnp.inf)
    y = jnp.zeros(4, jnp.int32)
    want = jnp.argmax(z, axis=-1)
    for impl in CORE_IMPLS:
        np.testing.assert_array_equal(
            _core(impl)(z, y, return_aux=True)[1].argmax, want
        )
    for impl in LINEAR_IMPLS:
        # The fused loss's logits are x @ eye + bias: ties through x (a NaN
        # row stays NaN everywhere), +inf through the bias.
        out = _fused(impl)(z[:3], y[:3], jnp.eye(V), return_aux=True)
        np.testing.assert_array_equal(out[1].argmax, jnp.argmax(z[:3] @ jnp.eye(V), -1))
        bias = jnp.zeros(V).at[jnp.array([9, 20])].set(jnp.inf)
        out = _fused(impl)(z[:1] * 0, y[:1], jnp.eye(V), return_aux=True, bias=bias)
        np.testing.assert_array_equal(out[1].argmax, [9])


@pytest.mark.parametrize(
    "impl", CORE_IMPLS + [slow(f"fused-{n}") for n in LINEAR_IMPLS]
)
@pytest.mark.slow
def test_entropy_gradient_is_true(impl):
    """An entropy bonus gets its true gradient; argmax/correct carry none."""
    x, w, y, _ = _data(1)

    def via_package(x):
        if impl.startswith("fused-"):
            out, aux = _fused(impl[6:])(x, y, w, ignore_index=IGNORE, return_aux=True)
        else:
            out, aux = _core(impl)(x @ w, y, ignore_index=IGNORE, return_aux=True)
        return jnp.sum(out) - 0.3 * jnp.sum(aux.entropy * jnp.arange(S))

    def plain(x):
        z = x @ w
        keep = y != IGNORE
        ce = jnp.where(
            keep,
            jax.nn.logsumexp(z, -1)
            - jnp.take_along_axis(z, jnp.where(keep, y, 0)[..., None], -1)[..., 0],
            0,
        )
        p = jax.nn.softmax(z, -1)
        entropy = -jnp.sum(p * jax.nn.log_softmax(z, -1), -1)
        entropy = jnp.where(keep, entropy, jax.lax.stop_gradient(entropy))
        return jnp.sum(ce) - 0.3 * jnp.sum(entropy * jnp.arange(S))

    _close(jax.grad(via_package)(x), jax.grad(plain)(x), 2e-5)


@pytest.mark.parametrize(
    "impl, soft",
    [(n, s) if s else slow(n, s) for n in CORE_IMPLS for s in (False, True)]
    + [
        (f"fused-{n}", False) if n == "reference" else slow(f"fused-{n}", False)
        for n in LINEAR_IMPLS
    ],
)
@pytest.mark.slow
def test_entropy_gradient_from_bfloat16_is_rounded_once(impl, soft):
    """Found by the differential fuzzer (issue 9): the entropy's gradient
    -p (log p + H) cancels where the softmax is flat, and the XLA kernel took
    log p from the softmax it saved in bfloat16: errors of ~1000 bfloat16
    ulps of the gradient (0.0293 instead of 0.0272). Each element must now be
    the float64 gradient of the same bfloat16 inputs, rounded once."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(0.3 * rng.normal(size=(16, 11)), jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, 11, 16))
    keep = jnp.asarray(rng.random(11) < 0.8).at[0].set(True)
    temperature = 0.7
    fused = impl.startswith("fused-")

    def entropy_sum(z):
        if fused:
            eye = jnp.eye(11, dtype=z.dtype)
            out = _fused(impl[6:])(z, y, eye, return_aux=True, temperature=temperature)
        else:
            loss = (
                xj.softmax_cross_entropy
                if soft
                else xj.softmax_cross_entropy_with_integer_labels
            )
            labels = jax.nn.one_hot(y, 11, dtype=z.dtype) if soft else y
            kw = dict(implementation=impl, return_aux=True, temperature=temperature)
            out = loss(z, labels, where=jnp.broadcast_to(keep, z.shape), **kw)
        return jnp.sum(out[1].entropy.astype(jnp.float32) * jnp.arange(16))

    kept = np.flatnonzero(np.asarray(keep) | fused)

    def plain(z):
        log_p = jax.nn.log_softmax(z[:, kept] / temperature, -1)
        entropy = -jnp.sum(jnp.exp(log_p) * log_p, -1)
        return jnp.sum(entropy * jnp.arange(16))

    got = np.asarray(jax.grad(entropy_sum)(z), np.float64)
    with jax.enable_x64(True):
        want = np.asarray(jax.grad(plain)(np.asarray(z, np.float64)))
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-30)


@pytest.mark.parametrize("impl", [slow(n) if n == "xla" else n for n in CORE_IMPLS])
@pytest.mark.slow
def test_all_cotangents_from_bfloat16_are_rounded_once(impl):
    """Found by the differential fuzzer (issue 9): with soft labels, 16-bit
    logits and return_aux, the XLA kernel took the softmax and target parts of
    the gradient from the softmax saved in bfloat16 and only the entropy's part
    from float32. The three parts cancel: 1.4375 - 1.4177 - 0.1112 gave
    -0.0874 instead of -0.0914. With the logits kept, the whole gradient now
    uses the float32 softmax, and each element is the float64 gradient of the
    same bfloat16 inputs, rounded once."""
    rng = np.random.default_rng(3)
    z = jnp.asarray(2.5 * rng.normal(size=(2, 4, 3)), jnp.bfloat16)
    t = rng.uniform(0, 1.4, size=(2, 4, 3)) * (rng.random((2, 4, 3)) < 0.7)
    t = jnp.asarray(t, jnp.bfloat16)
    c_lse = jnp.asarray([[-1.25, -1.75, 2.0], [1.75, 2.0, -2.0]])
    c_h = jnp.asarray([[1.25, 0.75, 2.0], [-0.5, 0.5, -1.75]])

    def objective(z, t, impl):
        kw = dict(axis=1, temperature=0.7, return_aux=True, reduction="sum")
        loss, aux = xj.softmax_cross_entropy(z, t, implementation=impl, **kw)
        return -1.75 * loss + jnp.sum(c_lse * aux.lse) + jnp.sum(c_h * aux.entropy)

    got = np.asarray(jax.grad(objective)(z, t, impl), np.float64)
    with jax.enable_x64(True):
        z64, t64 = (np.asarray(a, np.float64) for a in (z, t))
        want = np.asarray(jax.grad(objective)(z64, t64, "reference"))
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-30)


# --- temperature ----------------------------------------------------------------


@pytest.mark.parametrize("impl", CORE_IMPLS)
def test_core_temperature_equals_dividing_the_logits(impl):
    x, w, y, cw = _data(2)
    kw = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-2, reduction="mean")
    kw["class_weights"] = cw
    kw["normalizer"] = (3.0, 5.0)
    t = 0.6

    def ours(z):
        return _core(impl)(z, y, temperature=t, **kw)

    def divided(z):
        return _core(impl)(z / t, y, **kw)

    z = x @ w
    _close(ours(z), divided(z))
    _close(jax.grad(ours)(z), jax.grad(divided)(z))


@pytest.mark.parametrize("impl", [slow(n) if n == "xla" else n for n in LINEAR_IMPLS])
@pytest.mark.slow
def test_fused_temperature_then_softcap(impl):
    """z = cap((x @ w + b) / T): the documented order."""
    x, w, y, _ = _data(3)
    b = jnp.linspace(-1, 1, V)
    t, cap = 0.5, 3.0

    def ours(x, w, b):
        return _fused(impl)(
            x, y, w, bias=b, temperature=t, logit_softcap=cap, ignore_index=IGNORE
        ).sum()

    def plain(x, w, b):
        z = cap * jnp.tanh((x @ w + b) / t / cap)
        return xj.softmax_cross_entropy_with_integer_labels(
            z, y, ignore_index=IGNORE, implementation="reference"
        ).sum()

    _close(ours(x, w, b), plain(x, w, b))
    for g, g_r in zip(
        jax.grad(ours, argnums=(0, 1, 2))(x, w, b),
        jax.grad(plain, argnums=(0, 1, 2))(x, w, b),
        strict=True,
    ):
        _close(g, g_r, 5e-5)


# --- causal shift ---------------------------------------------------------------


def _shift_by_slicing(z_or_x, y, k):
    """Position t against label t + k: the arrays sliced (what shift avoids)."""
    return z_or_x[:, :-k], y[:, k:]


@pytest.mark.parametrize("k", [1, slow(2)])
@pytest.mark.parametrize(
    "impl",
    [slow(n) if n != "xla" else n for n in CORE_IMPLS]
    + [slow(f"fused-{n}") for n in LINEAR_IMPLS],
)
def test_shift_equals_slicing(impl, k):
    x, w, y, cw = _data(4)
    kw = dict(ignore_index=IGNORE, class_weights=cw, z_loss=1e-3, label_smoothing=0.05)
    kw["normalizer"] = (6.0, 7.0)

    def run(x, y, **extra):
        if impl.startswith("fused-"):
            return _fused(impl[6:])(x, y, w, reduction="mean", **kw, **extra)
        return _core(impl)(x @ w, y, reduction="mean", **kw, **extra)

    def sliced(x):
        xs, ys = _shift_by_slicing(x, y, k)
        return run(xs, ys)

    def shifted(x):
        return run(x, y, shift=k)

    _close(shifted(x), sliced(x))
    _close(jax.grad(shifted)(x), jax.grad(sliced)(x))
    # Per example: the last k positions score nothing.
    per = (
        _fused(impl[6:])(x, y, w, shift=k, ignore_index=IGNORE)
        if impl.startswith("fused-")
        else _core(impl)(x @ w, y, shift=k, ignore_index=IGNORE)
    )
    np.testing.assert_array_equal(per[:, -k:], 0.0)


@pytest.mark.slow
def test_shift_checks_only_target_labels():
    """The first k labels are inputs, never targets: out of range there is
    fine; out of range in a target position raises."""
    z = jnp.zeros((1, 4, V))
    y = jnp.array([[V + 5, 1, 2, 3]])
    xj.softmax_cross_entropy_with_integer_labels(z, y, shift=1)
    with pytest.raises(ValueError, match="out of range"):
        xj.softmax_cross_entropy_with_integer_labels(z, y.at[0, 2].set(V), shift=1)


def test_shift_is_for_integer_labels():
    """Soft targets at position t are already the next token's distribution:
    softmax_cross_entropy has no shift (a TypeError names the argument)."""
    with pytest.raises(TypeError, match="shift"):
        xj.softmax_cross_entropy(jnp.zeros((2, V)), jnp.ones((2, V)) / V, shift=1)


def test_shift_copies_no_logits():
    """The compiled temp memory with shift equals that without (labels move,
    the logits do not)."""
    n, c = 2048, 4096
    y = jax.ShapeDtypeStruct((1, n), jnp.int32)
    z = jax.ShapeDtypeStruct((1, n, c), jnp.float32)

    def temp(**kw):
        def f(z, y):
            return xj.softmax_cross_entropy_with_integer_labels(
                z, y, reduction="mean", **kw
            )

        step = jax.jit(jax.value_and_grad(f))
        return step.lower(z, y).compile().memory_analysis().temp_size_in_bytes

    assert temp(shift=1) <= temp() + 64 * n


# --- per-segment means ------------------------------------------------------------


def _segments_loop(per_example, weights, segment_ids, scored):
    """Mean within each segment (run of equal ids per row), then over segments."""
    means = []
    for b in range(per_example.shape[0]):
        runs = {}
        start = 0
        for t in range(1, per_example.shape[1] + 1):
            if t == per_example.shape[1] or segment_ids[b, t] != segment_ids[b, start]:
                runs[(b, start)] = range(start, t)
                start = t
        for positions in runs.values():
            idx = [t for t in positions if scored[b, t]]
            if idx:
                den = sum(weights[b, t] for t in idx)
                means.append(sum(per_example[b, t] for t in idx) / den)
    return np.mean(means)


@pytest.mark.parametrize("impl", CORE_IMPLS + [f"fused-{n}" for n in LINEAR_IMPLS])
@pytest.mark.parametrize("weighted", [False, slow(True)])
def test_mean_per_segment_equals_a_loop_over_segments(impl, weighted):
    x, w, y, cw = _data(5)
    seg = jnp.asarray([[3, 3, 3, 3, 7, 7, -1, 3, 3], [0, 0, 1, 1, 1, 1, 1, 2, 2]])
    kw = dict(ignore_index=IGNORE, class_weights=cw if weighted else None)

    def run(**extra):
        if impl.startswith("fused-"):
            return _fused(impl[6:])(x, y, w, **kw, **extra)
        return _core(impl)(x @ w, y, **kw, **extra)

    per = np.asarray(run(reduction="none"))
    scored = (np.asarray(y) != IGNORE) & (np.asarray(seg) >= 0)
    wy = np.asarray(cw)[np.where(np.asarray(y) >= 0, np.asarray(y), 0)]
    weights = wy if weighted else np.ones_like(per)
    want = _segments_loop(per, weights, np.asarray(seg), scored)
    got = run(reduction="mean_per_segment", segment_ids=seg)
    _close(got, want)
    # Without segment_ids every row is one segment.
    rows = run(reduction="mean_per_segment")
    want_rows = _segments_loop(
        per, weights, np.zeros_like(np.asarray(seg)), np.asarray(y) != IGNORE
    )
    _close(rows, want_rows)


@pytest.mark.parametrize("impl", CORE_IMPLS)
def test_shift_with_segments_does_not_cross_sequences(impl):
    """A packed sequence's last token does not predict the next one's first."""
    x, w, y, _ = _data(6)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3]] * B)
    per = _core(impl)(x @ w, y, shift=1, segment_ids=seg, ignore_index=IGNORE)
    np.testing.assert_array_equal(per[:, [2, 6, 8]], 0.0)
    assert np.all(np.asarray(per[1, [0, 1, 3, 4, 5, 7]]) > 0)


def test_mean_per_segment_normalizer_and_z_loss():
    """normalizer replaces the number of segments; the z-loss is averaged per
    segment over the segment's count."""
    x, w, y, _ = _data(7)
    z = x @ w
    y = jnp.where(y == IGNORE, 0, y)
    seg = jnp.asarray([[0] * 4 + [1] * 5, [2] * 9])
    kw = dict(segment_ids=seg, reduction="mean_per_segment", z_loss=0.01)
    base = xj.softmax_cross_entropy_with_integer_labels(z, y, **kw)
    halved = xj.softmax_cross_entropy_with_integer_labels(z, y, normalizer=6.0, **kw)
    _close(halved, base * 3 / 6)
    lse = np.asarray(jax.nn.logsumexp(z, -1))
    ce = np.asarray(xj.softmax_cross_entropy_with_integer_labels(z, y))
    per = ce + 0.01 * lse**2
    _close(base, (per[0, :4].mean() + per[0, 4:].mean() + per[1].mean()) / 3)


# --- [V, D] classifiers -------------------------------------------------------------


@pytest.mark.parametrize("impl", [slow(n) if n == "xla" else n for n in LINEAR_IMPLS])
@pytest.mark.slow
def test_w_layout_vd_equals_dv(impl):
    x, w, y, cw = _data(8)
    kw = dict(ignore_index=IGNORE, class_weights=cw, label_smoothing=0.1)

    def dv(x, w):
        return _fused(impl)(x, y, w, **kw).sum()

    def vd(x, w_vd):
        return _fused(impl)(x, y, w_vd, w_layout="vd", **kw).sum()

    _close(vd(x, w.T), dv(x, w))
    gx, gw = jax.grad(vd, argnums=(0, 1))(x, w.T)
    gx_r, gw_r = jax.grad(dv, argnums=(0, 1))(x, w)
    _close(gx, gx_r)
    _close(gw, gw_r.T)


def test_w_layout_is_validated():
    x, w, y, _ = _data()
    with pytest.raises(ValueError, match="w_layout"):
        xj.linear_cross_entropy(x, w, y, w_layout="DV")
    with pytest.raises(ValueError, match="V, D"):
        xj.linear_cross_entropy(x, w[None], y, w_layout="vd")
