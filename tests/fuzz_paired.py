"""Fuzz cases for the losses on two inputs' products: ``clip_loss``,
``siglip_loss`` (paired embeddings) and ``linear_distillation_loss`` (two
heads), drawn by ``tests/test_fuzz.py`` and compared with the float64
formulas of ``tests/reference.py``.

Axes: the dtype (float16, bfloat16, float32), sizes from one pair / one class
up, block sizes that divide, do not divide or exceed the rows (classes), the
value regime (ordinary, logits near 1e4, a zero or negative scale, NaN in one
row), the options (reduction; divergence, beta, temperature, alpha with
ignored labels, shift, packed ``segment_ids`` with padding and
``"mean_per_segment"``, ``where``, layout, ``teacher_grad``), inputs as NumPy
or jnp arrays, and a transformation (eager, ``jit``, ``grad`` w.r.t. every
differentiable input, ``jit(grad(checkpoint))``, ``vmap``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
from core_helpers import float64

import xent_jax as xj

DTYPES = ("float32", "bfloat16", "float16")
TRANSFORMS = ("eager", "jit", "grad", "jit_grad_checkpoint", "vmap")


@dataclasses.dataclass
class PairedCase:
    loss: str  # "clip", "siglip" or "distillation"
    arrays: dict[str, np.ndarray]  # float64 values, exact in ``dtype``
    dtype: str
    options: dict[str, Any]
    transform: str
    form: str  # "np" or "jnp"

    def describe(self) -> str:
        shapes = {k: v.shape for k, v in self.arrays.items()}
        return (
            f"{self.loss} dtype={self.dtype} shapes={shapes} options={self.options} "
            f"transform={self.transform} form={self.form}\narrays={self.arrays}"
        )


def _exact(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` and back: inputs both sides see."""
    return np.asarray(jnp.asarray(values, dtype), np.float64)


def draw_contrastive(draw, st) -> PairedCase:
    loss = draw(st.sampled_from(("clip", "siglip")))
    dtype = draw(st.sampled_from(DTYPES))
    n, d = draw(st.integers(1, 24)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    regime = draw(
        st.sampled_from(("ordinary", "huge", "zero_scale", "negative", "nan"))
    )
    scale = {"huge": 1e4, "zero_scale": 0.0, "negative": -3.0}.get(regime, 5.0)
    if regime == "nan":
        a[draw(st.integers(0, n - 1)), 0] = np.nan
    arrays = {"a": _exact(a, dtype), "b": _exact(b, dtype), "scale": np.float64(scale)}
    if loss == "siglip":
        arrays["bias"] = np.float64(draw(st.sampled_from((-10.0, 0.0, 3.0))))
    if draw(st.booleans()):  # padding pairs (the NaN one may be among them)
        arrays["where"] = rng.random(n) < 0.7
    block = draw(st.one_of(st.none(), st.integers(1, n + 3)))
    reduction = draw(st.sampled_from(("mean", "sum", "none")))
    options = {"block_size": block, "reduction": reduction}
    transform = draw(st.sampled_from(TRANSFORMS))
    form = draw(st.sampled_from(("np", "jnp")))
    return PairedCase(loss, arrays, dtype, options, transform, form)


def draw_distillation(draw, st) -> PairedCase:
    dtype = draw(st.sampled_from(DTYPES))
    n, v = draw(st.integers(1, 12)), draw(st.integers(1, 300))
    d, dt = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    big = draw(st.sampled_from((1.0, 1.0, 300.0)))  # logits near 1e3-1e4
    arrays = {
        "x": _exact(big * rng.normal(size=(n, d)) / np.sqrt(d), dtype),
        "w": _exact(rng.normal(size=(d, v)), dtype),
        "teacher_x": _exact(big * rng.normal(size=(n, dt)) / np.sqrt(dt), dtype),
        "teacher_w": _exact(rng.normal(size=(dt, v)), dtype),
    }
    divergence = draw(st.sampled_from(("forward_kl", "reverse_kl", "jsd")))
    alpha = draw(st.sampled_from((0.0, 0.0, 0.4, 1.0)))
    options: dict[str, Any] = {
        "divergence": divergence,
        "temperature": draw(st.sampled_from((1.0, 0.5, 2.0, 7.0))),
        "alpha": alpha,
        "block_size": draw(st.one_of(st.none(), st.integers(1, v + 5))),
        "reduction": draw(st.sampled_from(("mean", "sum", "none", "mean_per_segment"))),
        "teacher_grad": draw(st.booleans()),
        "w_layout": draw(st.sampled_from(("dv", "vd"))),
        "shift": draw(st.sampled_from((0, 0, 1))) if n > 1 else 0,
    }
    if divergence == "jsd":
        options["beta"] = draw(st.sampled_from((0.1, 0.5, 0.9)))
    if alpha or draw(st.booleans()):
        labels = rng.integers(0, v, size=n)
        labels[rng.random(n) < 0.3] = -100
        arrays["labels"] = labels
        options["ignore_index"] = -100
    if draw(st.booleans()):
        arrays["where"] = rng.random(n) < 0.7
    if draw(st.booleans()):  # packed sequences, maybe a padding tail
        segment_ids = np.sort(rng.integers(0, 3, size=n))
        segment_ids[n - draw(st.integers(0, n // 3)) :] = -1
        arrays["segment_ids"] = segment_ids
    transform = draw(st.sampled_from(TRANSFORMS))
    form = draw(st.sampled_from(("np", "jnp")))
    return PairedCase("distillation", arrays, dtype, options, transform, form)


def _diff_names(case: PairedCase) -> tuple[str, ...]:
    if case.loss == "clip":
        return ("a", "b", "scale")
    if case.loss == "siglip":
        return ("a", "b", "scale", "bias")
    names = ("x", "w")
    return names + (("teacher_x", "teacher_w") if case.options["teacher_grad"] else ())


def _package_loss(case: PairedCase):
    opts = case.options

    if case.loss in ("clip", "siglip"):
        fn = {"clip": xj.clip_loss, "siglip": xj.siglip_loss}[case.loss]

        def loss(arrays):
            scalars = [arrays["scale"]] + ([arrays["bias"]] if "bias" in arrays else [])
            kw = dict(opts, where=arrays.get("where"))
            return fn(arrays["a"], arrays["b"], *scalars, **kw)

        return loss

    def loss(arrays):
        kw = dict(opts)
        w, wt = arrays["w"], arrays["teacher_w"]
        if kw["w_layout"] == "vd":
            w, wt = w.T, wt.T
        return xj.linear_distillation_loss(
            arrays["x"],
            w,
            arrays["teacher_x"],
            wt,
            arrays.get("labels"),
            where=arrays.get("where"),
            segment_ids=arrays.get("segment_ids"),
            **kw,
        )

    return loss


def _scored(case: PairedCase) -> np.ndarray:
    n = case.arrays["x"].shape[0]
    scored = np.ones(n, bool)
    labels = case.arrays.get("labels")
    if labels is not None:
        target = labels
        if case.options["shift"]:
            target = np.concatenate([labels[1:], [-100]])
        scored &= target != -100
    elif case.options["shift"]:
        scored[-1] = False
    if "where" in case.arrays:
        scored &= case.arrays["where"]
    segment_ids = case.arrays.get("segment_ids")
    if segment_ids is not None:
        scored &= segment_ids >= 0  # padding
        if case.options["shift"]:  # the target in the same sequence
            scored[:-1] &= segment_ids[1:] == segment_ids[:-1]
    return scored


def _oracle_loss(case: PairedCase):
    opts = case.options

    def reduce(per, count, scored=None):
        if opts["reduction"] == "none":
            return per
        total = jnp.sum(per)
        if opts["reduction"] == "sum":
            return total
        if opts["reduction"] == "mean_per_segment":
            index = ref.segment_index(case.arrays.get("segment_ids"), per.shape)
            terms = ref.Terms(per, jnp.zeros_like(per), scored, scored)
            return ref.mean_per_segment(terms, index)
        return total / count if count else total * 0

    if case.loss in ("clip", "siglip"):
        n = case.arrays["a"].shape[0]
        kept = np.flatnonzero(case.arrays.get("where", np.ones(n, bool)))

        def pairs(a):  # the kept pairs alone, 0 elsewhere
            scalars = [a["scale"]] + ([a["bias"]] if "bias" in a else [])
            f = ref.clip_pairs if case.loss == "clip" else ref.siglip_pairs
            per = f(a["a"][kept], a["b"][kept], *scalars)
            return jnp.zeros(n, per.dtype).at[kept].set(per)

        return lambda a: reduce(pairs(a), kept.size)
    scored = _scored(case)
    labels = case.arrays.get("labels")
    if labels is not None and opts["shift"]:
        labels = np.concatenate([labels[1:], [0]])

    def loss(a):
        xt, wt = a["teacher_x"], a["teacher_w"]
        if not opts["teacher_grad"]:
            xt, wt = jax.lax.stop_gradient(xt), jax.lax.stop_gradient(wt)
        per = ref.distillation(
            a["x"],
            a["w"],
            xt,
            wt,
            labels,
            opts["divergence"],
            opts.get("beta", 0.5),
            opts["temperature"],
            opts["alpha"],
            scored,
        )
        return reduce(per, int(scored.sum()), scored)

    return loss


def _inputs(case: PairedCase, x64: bool):
    out = {}
    for k, v in case.arrays.items():
        if k in ("labels", "where", "segment_ids"):
            out[k] = v if k == "where" else v.astype(np.int32)
        elif x64:
            out[k] = jnp.asarray(v, jnp.float64)
        else:
            arr = np.asarray(v, np.float32) if np.ndim(v) == 0 else v
            out[k] = jnp.asarray(arr, case.dtype if np.ndim(v) else jnp.float32)
    if case.form == "np":
        out = {k: np.asarray(v) if np.ndim(v) else v for k, v in out.items()}
    return out


def _apply(case: PairedCase, fn, arrays):
    """The value (summed to a scalar for gradients) and the gradients w.r.t.
    the differentiable inputs, under the case's transformation."""
    names = _diff_names(case)

    def total(diff, rest):
        return jnp.sum(fn({**rest, **diff}))

    diff = {k: jnp.asarray(arrays[k]) for k in names}
    rest = {k: v for k, v in arrays.items() if k not in names}
    t = case.transform
    if t in ("grad", "jit_grad_checkpoint"):
        g = jax.grad(jax.checkpoint(total) if t != "grad" else total)
        g = jax.jit(g) if t != "grad" else g
        return fn(arrays), g(diff, rest)
    if t == "jit":
        return jax.jit(fn)(arrays), None
    if t == "vmap":
        stacked = {
            k: jnp.stack([jnp.asarray(v)] * 2) if k in names else v
            for k, v in arrays.items()
        }

        def one(diff):
            return fn({**stacked_rest, **diff})

        stacked_rest = {k: v for k, v in stacked.items() if k not in names}
        out = jax.vmap(one)({k: stacked[k] for k in names})
        return out[0], None
    return fn(arrays), None


def check_paired_case(case: PairedCase) -> None:
    got_value, got_grads = _apply(case, _package_loss(case), _inputs(case, False))
    with float64():
        want_value, want_grads = _apply(case, _oracle_loss(case), _inputs(case, True))
        want_value = np.asarray(want_value)
        want_grads = None if got_grads is None else jax.tree.map(np.asarray, want_grads)
    got_value = np.asarray(got_value, np.float64)
    assert got_value.shape == want_value.shape, (got_value.shape, want_value.shape)
    nan = np.isnan(want_value)
    np.testing.assert_array_equal(np.isnan(got_value), nan, err_msg="NaN positions")
    scale = max(1.0, float(np.max(np.abs(np.where(nan, 0, want_value)), initial=0)))
    np.testing.assert_allclose(
        np.where(nan, 0, got_value),
        np.where(nan, 0, want_value),
        rtol=2e-4,
        atol=2e-5 * scale,
        err_msg="value",
    )
    if got_grads is None or np.any(nan):
        return
    eps = float(jnp.finfo(case.dtype).eps)
    for k, g in got_grads.items():
        # Gradients come back in their input's dtype: a float64 value beyond
        # its range is +-inf there (float16 at logits of 1e4), so both sides
        # are compared clipped to that range.
        top = float(jnp.finfo(g.dtype).max)
        want = np.clip(want_grads[k], -top, top)
        g = np.clip(np.asarray(g, np.float64), -top, top)
        assert g.shape == want.shape, (k, g.shape, want.shape)
        tol = max(2 * eps, 2e-4) * max(1.0, float(np.max(np.abs(want), initial=0)))
        np.testing.assert_allclose(g, want, rtol=2e-4, atol=tol, err_msg=k)
