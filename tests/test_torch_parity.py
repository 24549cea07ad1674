"""Parity with PyTorch's fused op, ``torch.nn.functional.linear_cross_entropy``.

``linear_cross_entropy(x, w, y, ...)`` equals ``F.linear_cross_entropy(x,
w.T, y, linear_bias=..., weight=..., ignore_index=..., label_smoothing=...,
reduction=...)`` in value and in the gradients of x, w and bias, over every
option they share, in both weight layouts (``w_layout="vd"`` takes PyTorch's
``[V, D]`` weight as is). Skipped where PyTorch is not installed (it is an
optional ``bench`` extra, never a dependency of the package).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax as xj

torch = pytest.importorskip("torch")
F = torch.nn.functional
if not hasattr(F, "linear_cross_entropy"):  # pragma: no cover
    pytest.skip("this PyTorch has no F.linear_cross_entropy", allow_module_level=True)

N, D, V = 11, 6, 37
IGNORE = -100

OPTIONS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "ignore": dict(ignore_index=IGNORE),
    "smoothing": dict(ignore_index=IGNORE, label_smoothing=0.15),
    "weights": dict(ignore_index=IGNORE, class_weights=True),
    "all": dict(
        bias=True, ignore_index=IGNORE, label_smoothing=0.2, class_weights=True
    ),
}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    w_vd = (rng.normal(size=(V, D)) * 0.7).astype(np.float32)  # PyTorch's layout
    b = rng.normal(size=V).astype(np.float32)
    cw = rng.uniform(0.2, 2.0, V).astype(np.float32)
    y = rng.integers(0, V, N)
    y[[2, 7]] = IGNORE
    return x, w_vd, b, cw, y


def _torch(x, w_vd, b, cw, y, opts, reduction, ct):
    xt, wt = (torch.tensor(a, requires_grad=True) for a in (x, w_vd))
    bt = torch.tensor(b, requires_grad=True)
    kw = dict(reduction=reduction, label_smoothing=opts.get("label_smoothing", 0.0))
    if opts.get("bias"):
        kw["linear_bias"] = bt
    if opts.get("class_weights"):
        kw["weight"] = torch.tensor(cw)
    kw["ignore_index"] = opts.get("ignore_index", IGNORE)
    target = torch.tensor(np.where(y == IGNORE, kw["ignore_index"], y))
    loss = F.linear_cross_entropy(xt, wt, target, **kw)
    (loss * torch.tensor(ct)).sum().backward()
    grads = (
        xt.grad.numpy(),
        wt.grad.numpy(),
        bt.grad.numpy() if opts.get("bias") else None,
    )
    return loss.detach().numpy(), grads


def _ours(x, w_vd, b, cw, y, opts, reduction, ct, w_layout):
    kw = dict(reduction=reduction, block_size=(4, 8))
    if "ignore_index" in opts:
        kw["ignore_index"] = opts["ignore_index"]
    kw["label_smoothing"] = opts.get("label_smoothing", 0.0)
    if opts.get("class_weights"):
        kw["class_weights"] = cw
    if "ignore_index" not in opts:
        y = np.where(y == IGNORE, 0, y)

    def f(x, w, b):
        if opts.get("bias"):
            kw["bias"] = b
        out = xj.linear_cross_entropy(x, w, y, w_layout=w_layout, **kw)
        return jnp.sum(out * ct)

    w = w_vd if w_layout == "vd" else w_vd.T
    loss = xj.linear_cross_entropy(
        x, w, y, w_layout=w_layout, **dict(kw, bias=b if opts.get("bias") else None)
    )
    dx, dw, db = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, w, b)
    dw = dw if w_layout == "vd" else dw.T
    return np.asarray(loss), (np.asarray(dx), np.asarray(dw), np.asarray(db)), y


CASES = list(itertools.product(OPTIONS, ["none", "sum", "mean"], ["dv", "vd"]))


@pytest.mark.parametrize(
    "name,reduction,w_layout", CASES, ids=["-".join(c) for c in CASES]
)
def test_matches_torch_linear_cross_entropy(name, reduction, w_layout):
    x, w_vd, b, cw, y = _data()
    opts = OPTIONS[name]
    ct = (
        np.random.default_rng(5)
        .normal(size=N if reduction == "none" else ())
        .astype(np.float32)
    )
    loss, grads, y_used = _ours(x, w_vd, b, cw, y, opts, reduction, ct, w_layout)
    loss_t, grads_t = _torch(x, w_vd, b, cw, y_used, opts, reduction, ct)
    np.testing.assert_allclose(loss, loss_t, rtol=1e-5, atol=1e-6)
    for g, g_t in zip(grads, grads_t, strict=True):
        if g_t is not None:
            np.testing.assert_allclose(g, g_t, rtol=1e-4, atol=1e-6)


def test_matches_torch_chunked_path():
    """PyTorch's memory-saving chunked path (no label smoothing there) gives
    the same numbers too."""
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None:  # pragma: no cover
        pytest.skip("no torch.nn.LinearCrossEntropyOptions")
    x, w_vd, b, cw, y = _data(1)
    target = torch.tensor(y)
    loss_t = F.linear_cross_entropy(
        torch.tensor(x),
        torch.tensor(w_vd),
        target,
        linear_bias=torch.tensor(b),
        weight=torch.tensor(cw),
        options=options(),
    )
    loss = xj.linear_cross_entropy(
        x, w_vd, y, bias=b, class_weights=cw, ignore_index=IGNORE, w_layout="vd"
    )
    np.testing.assert_allclose(np.asarray(loss), loss_t.numpy(), rtol=1e-5)
