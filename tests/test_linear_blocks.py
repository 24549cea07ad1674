"""The blockwise kernel's phases, each tested alone on one or two blocks
against plain ``jnp`` (as Cut-Cross-Entropy tests its kernel phases).

``blocks.logits`` (one block's logits), ``blocks.forward_step`` (the online
log-sum-exp step, with the label logit, the smoothing sum, the entropy moment
and the argmax), ``blocks.logits_gradient`` and ``blocks.accumulate``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xent_jax import _stats
from xent_jax._linear import blocks
from xent_jax._options import SoftmaxOptions

NT, D, C = 5, 6, 7
OPTS = SoftmaxOptions(integer=True, num_classes=2 * C)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _data(seed=0, offset=0.0):
    r = _rng(seed)
    x = jnp.asarray(r.normal(size=(NT, D)), jnp.float32)
    w = jnp.asarray(r.normal(size=(D, 2 * C)), jnp.float32)
    b = jnp.asarray(r.normal(size=(2 * C,)) + offset, jnp.float32)
    return x, w, b


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("temperature, cap", [(None, None), (0.7, 3.0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logits_block(rows, temperature, cap, dtype):
    x, w, b = _data()
    x, w = x.astype(dtype), w.astype(dtype)
    opts = dataclasses.replace(OPTS, temperature=temperature, logit_softcap=cap)
    got = blocks.logits(x, w.T if rows else w, b, opts, rows, jnp.float32)
    want = x.astype(jnp.float32) @ w.astype(jnp.float32) + b
    if temperature:
        want = want / temperature
    if cap:
        want = cap * jnp.tanh(want / cap)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _fold(z, labels, u=None, aux=True):
    """Folds z [NT, 2C] in as two blocks of C columns."""
    ids = jnp.arange(2 * C)
    st = blocks.init(NT, jnp.float32, aux)
    u_seen = jnp.zeros(())
    for k in range(2):
        cols = slice(k * C, (k + 1) * C)
        held = (labels >= k * C) & (labels < (k + 1) * C)
        at = jnp.where(held, labels - k * C, C)
        ub = None if u is None else u[cols]
        st = blocks.forward_step(st, z[:, cols], ids[cols], at, ub, u_seen)
        if u is not None:
            u_seen = u_seen + jnp.sum(ub)
    return st


@pytest.mark.parametrize("offset", [0.0, 1e4, -1e4])
def test_forward_step_two_blocks_equal_the_whole_row(offset):
    """Two online steps give the statistics of the whole row, in shifted
    coordinates: exact for a large common offset too."""
    r = _rng(1)
    z = jnp.asarray(r.normal(size=(NT, 2 * C)) * 3 + offset, jnp.float32)
    z = z.at[0, :C].add(20.0)  # the max moves between blocks in some rows
    z = z.at[1, C:].add(20.0)
    labels = jnp.asarray(r.integers(0, 2 * C, NT))
    u = jnp.asarray(r.uniform(0.5, 2.0, 2 * C), jnp.float32)
    st = _fold(z, labels, u)
    z64 = np.asarray(z, np.float64)
    m = z64.max(1)
    shift = _stats.shift_of(st.online.row_max)
    np.testing.assert_array_equal(shift, m.astype(np.float32))
    se = np.exp(z64 - m[:, None]).sum(1)
    np.testing.assert_allclose(st.online.sum_exp, se, rtol=1e-6)
    np.testing.assert_array_equal(st.label_logit, z[np.arange(NT), labels])
    smooth = ((z64 - m[:, None]) * np.asarray(u, np.float64)).sum(1)
    # halved: _stats.half_shifted
    np.testing.assert_allclose(2 * st.smooth_xs, smooth, rtol=1e-5, atol=1e-5)
    p = np.exp(z64 - m[:, None]) / se[:, None]
    entropy = -(p * np.log(p)).sum(1)
    got = _stats.entropy(
        _stats.log_of_sum(st.online.sum_exp), st.sum_exs, st.online.sum_exp
    )
    np.testing.assert_allclose(got, entropy, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(st.best_id, np.argmax(z64, 1))


def test_forward_step_masked_nan_and_ties():
    z = np.zeros((NT, 2 * C), np.float32)
    z[0] = -np.inf  # no finite logit: shift 0, no mass
    z[1, :] = -np.inf
    z[1, C + 2] = 1.0  # the only finite logit is in the second block
    z[2, 3] = np.nan  # NaN poisons the row
    z[3, [1, C + 1]] = 5.0  # a tie across blocks: the first id wins
    z[4, C:] = np.inf  # +inf: shift 0, lse +inf
    labels = jnp.zeros(NT, jnp.int32)
    st = _fold(jnp.asarray(z), labels)
    shift = np.asarray(_stats.shift_of(st.online.row_max))
    se = np.asarray(st.online.sum_exp)
    assert shift[0] == 0 and se[0] == 0
    assert shift[1] == 1.0 and se[1] == 1.0
    assert np.isnan(shift[2]) and np.isnan(se[2])
    assert shift[4] == 0 and se[4] == np.inf
    assert list(np.asarray(st.best_id)[[0, 1, 2, 3]]) == [0, C + 2, 3, 1]
    assert np.asarray(st.best_id)[4] == np.argmax(z[4])


@pytest.mark.parametrize("cap, temperature", [(None, None), (2.5, 0.6)])
def test_logits_gradient_equals_autodiff(cap, temperature):
    """``logits_gradient`` is d/d(raw logits) of ``coef lse - onehot_coef z_y
    - smooth_coef sum u z + g_H H`` with ``lse`` held at its value (the
    softmax term is ``coef p``)."""
    r = _rng(2)
    raw = jnp.asarray(r.normal(size=(NT, C)) * 2, jnp.float32)
    labels = jnp.asarray(r.integers(0, C, NT))
    hit = jnp.arange(C) == labels[:, None]
    u = jnp.asarray(r.uniform(0.5, 2, C), jnp.float32)
    coef, onehot, smooth, g_h = (
        jnp.asarray(r.normal(size=NT), jnp.float32) for _ in range(4)
    )
    opts = dataclasses.replace(OPTS, logit_softcap=cap, temperature=temperature)

    def z_of(raw):
        z = raw if temperature is None else raw / temperature
        return z if cap is None else cap * jnp.tanh(z / cap)

    def objective(raw):
        z = z_of(raw)
        lse = jax.nn.logsumexp(z, axis=1)
        p = jax.nn.softmax(z, axis=1)
        entropy = lse - jnp.sum(p * z, axis=1)
        terms = coef * lse - onehot * jnp.sum(jnp.where(hit, z, 0), 1)
        terms = terms - smooth * jnp.sum(u * z, 1) + g_h * entropy
        return jnp.sum(terms)

    z = z_of(raw)
    shift = jnp.max(z, 1)
    zs = z - shift[:, None]
    log_se = jnp.log(jnp.sum(jnp.exp(zs), 1))
    p = jnp.exp(zs - log_se[:, None])
    entropy = log_se - jnp.sum(p * zs, 1)
    c = blocks.BlockCoefficients(coef, onehot, smooth, g_h, entropy)
    got = blocks.logits_gradient(z, zs, p, log_se, hit, c, u, opts)
    np.testing.assert_allclose(got, jax.grad(objective)(raw), rtol=1e-4, atol=1e-5)


def test_logits_gradient_zero_coefficients_ignore_nan():
    """A row whose coefficients are all 0 (unscored) gets exactly 0, even where
    its probabilities are NaN."""
    z = jnp.full((2, C), jnp.nan).at[0].set(0.0)
    p = jnp.exp(z - jnp.log(C))
    zero = jnp.zeros(2)
    c = blocks.BlockCoefficients(jnp.array([1.0, 0.0]), zero, None, zero, zero)
    hit = jnp.zeros((2, C), bool)
    got = np.asarray(
        blocks.logits_gradient(z, z, p, jnp.full(2, np.log(C)), hit, c, None, OPTS)
    )
    np.testing.assert_allclose(got[0], 1 / C, rtol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_accumulate(rows, dtype):
    r = _rng(3)
    x, w, _ = _data(3)
    x, w = x.astype(dtype), w.astype(dtype)
    dz = jnp.asarray(r.normal(size=(NT, 2 * C)), jnp.float32)
    dx0 = jnp.asarray(r.normal(size=(NT, D)), jnp.float32)
    dw0 = jnp.asarray(r.normal(size=(2 * C, D) if rows else (D, 2 * C)), jnp.float32)
    db0 = jnp.asarray(r.normal(size=(2 * C,)), jnp.float32)
    dx, dw, db = blocks.accumulate(
        dx0, dw0, db0, x, w.T if rows else w, dz, rows, jnp.float32
    )
    xf, wf, dzr = (a.astype(jnp.float32) for a in (x, w, dz.astype(dtype)))
    tol = (
        dict(rtol=2e-2, atol=2e-2)
        if dtype == jnp.bfloat16
        else dict(rtol=1e-5, atol=1e-5)
    )
    np.testing.assert_allclose(dx, dx0 + dzr @ wf.T, **tol)
    np.testing.assert_allclose(dw, dw0 + (dzr.T @ xf if rows else xf.T @ dzr), **tol)
    np.testing.assert_allclose(db, db0 + dz.sum(0), rtol=1e-6, atol=1e-6)
    # Gradients nobody asked for are skipped.
    assert blocks.accumulate(None, None, None, x, w, dz, False, jnp.float32) == (
        None,
        None,
        None,
    )


def test_combine_shards_equals_one_online_pass():
    """Statistics of two column halves, each with its own shift, combined as
    the shard combination does, equal those of the whole row."""
    r = _rng(4)
    z = jnp.asarray(r.normal(size=(NT, 2 * C)) * 4, jnp.float32)
    halves = [
        _stats.online_update(
            _stats.online_init((NT,), jnp.float32),
            jnp.max(zh, 1),
            lambda s, zh=zh: jnp.sum(jnp.exp(zh - s[:, None]), 1),
        )
        for zh in (z[:, :C], z[:, C:])
    ]
    row_max = jnp.maximum(halves[0].row_max, halves[1].row_max)
    total = sum(
        _stats.rescaled(h.sum_exp, _stats.shift_of(h.row_max), _stats.shift_of(row_max))
        for h in halves
    )
    np.testing.assert_allclose(
        _stats.shift_of(row_max) + jnp.log(total),
        jax.nn.logsumexp(z, 1),
        rtol=1e-6,
    )
