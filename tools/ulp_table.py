"""The 16-bit gradient accuracy table of ``docs/semantics.md``.

Each gradient element of a bfloat16 / float16 loss against the float64
gradient of the same loss (``implementation="reference"``): the core losses in
ulps of the float64 value; the fused loss in units of the bound that one
rounding of the logits' gradient and one of the product allow,
``u (sum_k |a_k| |dl_k| + |g|)`` with ``u`` the unit roundoff. Run:
``python tools/ulp_table.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import xent_jax as xj

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from core_helpers import ulps  # noqa: E402  (the tests' own measure)

jax.config.update("jax_enable_x64", True)
ICE = xj.softmax_cross_entropy_with_integer_labels
N, C, D = 60, 96, 32


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float64))


def _grads(loss, args, argnums, cotangent):
    def total(*a, reference=False):
        out = loss(*a, implementation="reference" if reference else None)
        return jnp.sum(out if cotangent is None else out * cotangent)

    got = jax.grad(total, argnums)(*args)
    wide = [a.astype(jnp.float64) if i in argnums else a for i, a in enumerate(args)]
    want = jax.grad(lambda *a: total(*a, reference=True), argnums)(*wide)
    return got, want, wide


def core_errors(loss, x, labels, cotangent=None, **opts):
    def f(v, lab, implementation):
        # softmax_focal_loss has one implementation: its float64 run is the
        # reference.
        kw = dict(opts)
        if implementation is not None and loss is not xj.softmax_focal_loss:
            kw["implementation"] = implementation
        return loss(v, lab, **kw)

    (got,), (want,), _ = _grads(f, (x, labels), (0,), cotangent)
    return ulps(_f64(got), _f64(want), x.dtype)


def fused_errors(h, w, labels, **opts):
    def f(a, b, lab, implementation):
        return xj.linear_cross_entropy(a, b, lab, implementation=implementation, **opts)

    got, want, (h64, w64, _) = _grads(f, (h, w, labels), (0, 1), None)
    dl = _f64(jax.grad(lambda z: jnp.sum(ICE(z, labels, **opts)))(h64 @ w64))
    scales = (np.abs(dl) @ np.abs(_f64(w64)).T, np.abs(_f64(h64)).T @ np.abs(dl))
    u = 2.0 ** -(jnp.finfo(h.dtype).nmant + 1)
    errors = [
        np.abs(_f64(g) - _f64(g64)) / (u * (s + np.abs(_f64(g64))))
        for g, g64, s in zip(got, want, scales, strict=True)
    ]
    return np.concatenate([e.ravel() for e in errors])


def _row(*cells):
    print("| " + " | ".join(cells) + " |", flush=True)


def _stats(e):
    return f"{e.max():.2f}", f"{100 * (e > 0.5).mean():.1f}"


def main():
    rng = np.random.default_rng(0)
    data = {}
    for dtype in (jnp.bfloat16, jnp.float16):
        data[dtype] = dict(
            x=jnp.asarray(rng.normal(size=(N, C)) * 3, dtype),
            h=jnp.asarray(rng.normal(size=(N, D)), dtype),
            w=jnp.asarray(rng.normal(size=(D, C)) * 0.5, dtype),
            y=jnp.asarray(rng.integers(0, C, N), jnp.int32),
            soft=jax.nn.softmax(jnp.asarray(rng.normal(size=(N, C)), jnp.float32)),
            cw=jnp.asarray(rng.uniform(0.5, 2, C), jnp.float32),
            cot=jnp.asarray(rng.uniform(0.1, 3, N), jnp.float32),
            scale=jnp.float32(0.3),
        )
    _row(
        "dtype",
        "reduction",
        "class weights",
        "core max ulp",
        "core % > 0.5",
        "fused max (bound units)",
        "fused % > 0.5",
    )
    _row(*["---"] * 7)
    for dtype, d in data.items():
        for reduction in ("none", "mean", "sum"):
            for weighted in (False, True):
                opts = dict(reduction=reduction)
                opts["class_weights"] = d["cw"] if weighted else None
                core = core_errors(ICE, d["x"], d["y"], **opts)
                fused = fused_errors(d["h"], d["w"], d["y"], **opts)
                name = jnp.dtype(dtype).name
                _row(name, reduction, str(weighted), *_stats(core), *_stats(fused))
    print()
    _row("dtype", "core loss, options", "max ulp", "% > 0.5")
    _row(*["---"] * 4)
    for dtype, d in data.items():
        cases = {
            "mean, label_smoothing=0.1": (ICE, "y", None, dict(label_smoothing=0.1)),
            "mean, z_loss=1e-2": (ICE, "y", None, dict(z_loss=1e-2)),
            "mean, z-loss, weights, smoothing": (
                ICE,
                "y",
                None,
                dict(z_loss=1e-2, class_weights=d["cw"], label_smoothing=0.1),
            ),
            "mean, temperature=0.7": (ICE, "y", None, dict(temperature=0.7)),
            "soft labels, mean": (xj.softmax_cross_entropy, "soft", None, {}),
            "none, per-example cotangent in [0.1, 3]": (ICE, "y", "cot", None),
            "soft labels, none, per-example cotangent": (
                xj.softmax_cross_entropy,
                "soft",
                "cot",
                None,
            ),
            "softmax_focal_loss, mean": (xj.softmax_focal_loss, "y", None, {}),
            # The one case left rounded twice: a cotangent the reduction did
            # not announce.
            "mean, scaled by 0.3 afterwards": (ICE, "y", "scale", {}),
        }
        for name, (loss, labels, cot, opts) in cases.items():
            opts = (
                dict(reduction="none") if opts is None else dict(opts, reduction="mean")
            )
            cotangent = None if cot is None else d[cot]
            e = core_errors(loss, d["x"], d[labels], cotangent, **opts)
            _row(jnp.dtype(dtype).name, name, *_stats(e))


if __name__ == "__main__":
    main()
