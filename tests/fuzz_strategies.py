"""Case generation, execution and comparison for the differential fuzzer.

``tests/test_fuzz.py`` draws a :class:`Case` for one public function with
:func:`draw_case`, runs it through one transformation on the package
(:func:`run_package`) and on the float64 reference (:func:`run_reference`),
and compares values and gradients with :func:`compare`.

Structure (shapes, dtypes, options, value regimes, transformation) is drawn by
hypothesis; the numbers themselves come from a NumPy generator seeded by a
drawn integer, and are then cast to the input dtype, so that the inputs are
exactly representable and the float64 reference sees exactly what the package
sees. ``Case.describe()`` prints every input in full (``repr`` round-trips).

Tolerances: the package computes 16-bit and 32-bit inputs in float32 and
float64 inputs in float64, so the error bound is ``K * eps(compute dtype)``
times the magnitude of what each quantity is computed from, in *shifted*
coordinates (the logits minus the row maximum): a large common offset must not
cost accuracy. 16-bit gradients add one rounding to their own dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
from core_helpers import float64, ulps
from hypothesis import strategies as st

import xent_jax as xj

# Multiple of eps in every tolerance: rounding errors of a few dozen operations.
K = 32.0

F16, BF16 = np.dtype(jnp.float16), np.dtype(jnp.bfloat16)
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
FLOATS_32 = (F32, F16, BF16)
LABELS_32 = tuple(np.dtype(d) for d in "int32 int8 int16 uint8 uint16 uint32".split())
LABELS_64 = (np.dtype(np.int64), np.dtype(np.uint64))

TRANSFORMS = ("eager", "jit", "vmap", "grad", "jit_grad", "checkpoint")
# Transformations under which the labels are concrete (out-of-range labels
# raise ValueError); under the others they are traced (their loss is NaN),
# unless they are a Python list (a constant closed over, always concrete).
CONCRETE_LABELS = ("eager", "grad")
GRAD_TRANSFORMS = ("grad", "jit_grad", "checkpoint")

# (logits shape, class axis) buckets: few distinct shapes, so few compilations.
SOFTMAX_SHAPES = (
    ((4, 5), -1),
    ((0, 5), -1),  # empty batch
    ((3, 1), -1),  # a single class
    ((2, 4, 3), 1),  # class axis not last
    ((2, 2, 3), (1, 2)),  # tuple of class axes
    ((3, 2, 2), (0, 2)),  # non-adjacent class axes
    ((1, 260), -1),  # more classes than int8 / uint8 labels can hold
)
# (batch shape of x, D, V)
LINEAR_SHAPES = (((4,), 3, 8), ((0,), 3, 8), ((2, 3), 4, 5), ((3,), 3, 1))
BCE_SHAPES = ((4, 3), (0, 3), (2, 2, 3), (5,))

ROW_CODES = (
    "ordinary",
    "neg_inf_some",
    "neg_inf_most",
    "neg_inf_all",
    "neg_inf_label",
    "pos_inf_away",
    "pos_inf_label",
    "nan_label",
    "nan_away",
    "nan_masked",
)
# Drawn per row when rows are mixed: NaN away from the label (the costliest
# to get right) twice as often as the others.
ROW_DRAWS = ROW_CODES + ("nan_away",)
LABEL_CODES = ("class", "ignored", "out_of_range")
WHERE_CODES = ("all", "random", "none")
IGNORE_INDEX = (None, -100, -1, 0, 2**40, "np.int32(-100)", 2**32 - 100)


# --- small utilities ------------------------------------------------------------


def eps(dtype) -> float:
    """Machine epsilon of the dtype the package computes ``dtype`` in."""
    return float(np.finfo(compute_dtype(dtype)).eps)


def ulp(dtype) -> float:
    """Relative rounding of a result returned in ``dtype`` (two roundings)."""
    return 2.0 * float(jnp.finfo(dtype).eps) if dtype in (F16, BF16) else 0.0


def x64_context(on: bool):
    return float64() if on else contextlib.nullcontext()


def to_f64(a):
    """Exact float64 copy of a float array (numbers, lists, jnp or numpy)."""
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(to_f64(v) for v in a)
    return np.asarray(np.asarray(a).astype(np.float64))


def classes_last(a, axes):
    """``a`` with its class axes moved last and flattened (as reference.py)."""
    batch = tuple(i for i in range(a.ndim) if i not in axes)
    n_classes = int(np.prod([a.shape[i] for i in axes]))
    a = np.transpose(a, batch + axes)
    return a.reshape(a.shape[: len(batch)] + (n_classes,))


def from_classes_last(a, shape, axes):
    """Inverse of :func:`classes_last` for a logits ``shape``."""
    batch = tuple(i for i in range(len(shape)) if i not in axes)
    order = batch + axes
    a = a.reshape(tuple(shape[i] for i in order))
    return np.transpose(a, np.argsort(order))


def canonical_axes(axis, ndim):
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axis))


def _fmt(v):
    if isinstance(v, np.ndarray):
        return f"np.array({v.tolist()!r}, dtype='{v.dtype}')"
    if isinstance(v, jax.Array):
        return f"jnp.array({np.asarray(v).tolist()!r}, dtype='{v.dtype}')"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(u) for u in v) + ",)"
    return repr(v)


# --- the case -------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One call of a public function, with exactly representable inputs.

    ``arrays`` maps argument names to their values as the package receives
    them, except that array forms are applied at call time (``forms``:
    ``"np"``, ``"jnp"`` or ``"list"``); ``static`` holds the other keyword
    options. ``batched``: argument names with a leading vmap axis.
    """

    kind: str
    transform: str
    x64: bool
    dtype: np.dtype
    arrays: dict[str, Any]
    forms: dict[str, str]
    static: dict[str, Any]
    per_example: tuple[str, ...] = ()
    diff: tuple[str, ...] = ()
    cotangent: Any = None
    lse_cotangent: Any = None
    entropy_cotangent: Any = None  # with return_aux (lse_cotangent: aux.lse)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        lines = [
            f"kind={self.kind!r} transform={self.transform!r} x64={self.x64} "
            f"dtype={self.dtype}",
            f"static options: {self.static!r}",
        ]
        for name, value in self.arrays.items():
            lines.append(f"{name} [{self.forms.get(name, 'np')}] = {_fmt(value)}")
        if self.diff:
            lines.append(f"differentiated: {self.diff}")
        if self.cotangent is not None:
            lines.append(f"cotangent = {_fmt(self.cotangent)}")
        if self.lse_cotangent is not None:
            lines.append(f"lse cotangent = {_fmt(self.lse_cotangent)}")
        if self.entropy_cotangent is not None:
            lines.append(f"entropy cotangent = {_fmt(self.entropy_cotangent)}")
        for k, v in self.notes.items():
            lines.append(f"{k}: {v!r}")
        return "\n".join(lines)


def _form(value, form):
    """The value as the package receives it: numpy, jnp or Python sequence."""
    if value is None or form == "np":
        return value
    if isinstance(value, tuple):
        return tuple(_form(v, form) for v in value)
    if form == "jnp":
        return jnp.asarray(value)
    if form == "list":
        return np.asarray(value).tolist()
    if form == "py":  # a Python scalar
        return np.asarray(value).item()
    raise AssertionError(form)


# --- drawing ----------------------------------------------------------------------


def _draw_dtypes(draw):
    x64 = draw(st.booleans(), label="x64")
    floats = FLOATS_32 + ((F64,) if x64 else ())
    dtype = draw(st.sampled_from(floats), label="dtype")
    labels = LABELS_32 + (LABELS_64 if x64 else ())
    label_dtype = draw(st.sampled_from(labels), label="label dtype")
    return x64, dtype, label_dtype


def _scale(draw, dtype):
    """``(scale, offset, regime)`` of the logits, within the dtype's range."""
    regime = draw(st.sampled_from(["unit", "large", "offset"]), label="value regime")
    if regime == "unit":
        return 2.0, 0.0, regime
    if regime == "large":
        if dtype == F16:
            return 1e4, 0.0, regime
        scales = [1e4, 1e10, 1e30]
        if dtype != F64:  # (the float64 oracle holds float32's range)
            # A third of the range: a row's logits span more than the range,
            # so that x_c - shift overflows (smoothing, soft labels; issue 28).
            scales.append(float(jnp.finfo(dtype).max) / 3)
        return draw(st.sampled_from(scales), label="scale"), 0.0, regime
    sign = draw(st.sampled_from([1.0, -1.0]), label="offset sign")
    big = [1e4] if dtype == F16 else [1e4, 3e5]
    return 1.0, sign * draw(st.sampled_from(big), label="offset"), regime


def _codes(draw, codes, n, label):
    """Per-row codes: all the first one, or each drawn."""
    if n == 0 or not draw(st.booleans(), label=f"{label}: mixed"):
        return [codes[0]] * n
    return draw(st.lists(st.sampled_from(codes), min_size=n, max_size=n), label=label)


def _ignore_index(draw):
    ii = draw(st.sampled_from(IGNORE_INDEX), label="ignore_index")
    return np.int32(-100) if ii == "np.int32(-100)" else ii


def _representable(value, dtype):
    info = np.iinfo(dtype)
    return info.min <= value <= info.max


def _out_of_range(rng, dtype, num_classes, ignore_index, label, extra=()):
    """A label value of ``dtype`` that is neither a class nor ignore_index,
    chosen among values that a narrowing or wrapping conversion would turn
    into a class id or into ignore_index."""
    info = np.iinfo(dtype)
    candidates = [
        -1,
        -2,
        -100,
        num_classes,
        num_classes + 1,
        127,
        255,
        256 + label,
        65535,
        65536 + label,
        2**31 - 1,
        2**32 - 100,
        2**32 + label,
        int(info.max),
        int(info.min),
        int(info.max) - 99,
        *extra,
    ]
    ii = None if ignore_index is None else int(ignore_index)
    good = [
        v
        for v in candidates
        if _representable(v, dtype) and not 0 <= v < num_classes and v != ii
    ]
    return good[rng.integers(len(good))] if good else None


def _labels(draw, rng, n, num_classes, label_dtype, ignore_index, extra_oor=()):
    """Integer labels ``[n]`` (exact, ``label_dtype``) and per-row codes."""
    codes = _codes(draw, LABEL_CODES, n, "label codes")
    top = min(num_classes, int(np.iinfo(label_dtype).max) + 1)
    anchors = rng.integers(0, top, size=n)
    values = []
    for code, anchor in zip(codes, anchors, strict=True):
        value = int(anchor)
        if code == "ignored" and ignore_index is not None:
            if _representable(int(ignore_index), label_dtype):
                value = int(ignore_index)
        elif code == "out_of_range":
            oor = _out_of_range(
                rng, label_dtype, num_classes, ignore_index, value, extra_oor
            )
            value = value if oor is None else oor  # uint8 < 300: all are classes
        values.append(value)
    labels = np.array(values, dtype=object).astype(label_dtype)
    ii = None if ignore_index is None else int(ignore_index)
    codes = [  # what each label turned out to be
        "ignored" if v == ii else "class" if 0 <= v < num_classes else "out_of_range"
        for v in values
    ]
    return labels, anchors, codes


def _poison(draw, rng, x, unscored):
    """Optionally puts NaN and +-inf into every unscored row of ``x`` [B, C]:
    whatever is there must not reach any gradient (or the loss)."""
    if not np.any(unscored) or not draw(st.booleans(), label="poison unscored"):
        return
    for i in np.flatnonzero(unscored):
        c = x.shape[1]
        x[i, rng.integers(c)] = np.nan
        x[i, rng.integers(c)] = rng.choice([np.inf, -np.inf])


def _apply_row_codes(rng, x, anchors, codes, keep):
    """Puts -inf / +inf / NaN into classes-last logits ``x`` [B, C] in place."""
    n, c = x.shape
    for i, code in enumerate(codes):
        a = int(anchors[i])
        others = [j for j in range(c) if j != a]
        if code == "neg_inf_some" and len(others) >= 2:
            k = rng.integers(1, len(others))
            x[i, rng.choice(others, size=k, replace=False)] = -np.inf
        elif code == "neg_inf_most":
            x[i, others] = -np.inf
        elif code == "neg_inf_all":
            x[i, :] = -np.inf
        elif code == "neg_inf_label":
            x[i, a] = -np.inf
        elif code == "pos_inf_away" and others:
            x[i, rng.choice(others)] = np.inf
        elif code == "pos_inf_label":
            x[i, a] = np.inf
        elif code == "nan_label":
            x[i, a] = np.nan
        elif code == "nan_away" and others:
            x[i, rng.choice(others)] = np.nan
        elif code == "nan_masked" and others:
            if keep is None:
                x[i, rng.choice(others)] = np.nan
            else:
                masked = [j for j in others if not keep[i, j]]
                j = rng.choice(masked) if masked else rng.choice(others)
                keep[i, j] = False
                x[i, j] = np.nan


def _clip_to(dtype, x):
    big = float(jnp.finfo(dtype).max) * 0.9
    return np.where(np.isfinite(x), np.clip(x, -big, big), x)


def _transform(draw, kind=None):
    # jax.export with a symbolic sequence length: the language-model losses
    # (shift and segment_ids under export, issue 28, item 2).
    lm = ("export",) if kind in ("integer", "soft", "linear") else ()
    return draw(st.sampled_from(TRANSFORMS + lm), label="transform")


# A boolean option as a bool, np.bool_ (accepted), a string or an int (a
# TypeError naming the option, never a truth value: issue 28, item 7).
BOOL_FORMS = ("bool", "bool", "np.bool_", "str", "int")


def _bool_option(draw, name, value=None):
    if value is None:
        value = draw(st.booleans(), label=name)
    form = draw(st.sampled_from(BOOL_FORMS), label=f"{name} form")
    return {"bool": value, "np.bool_": np.bool_(value), "str": str(value)}.get(
        form, int(value)
    )


def refused_bool_options(case) -> tuple[str, ...]:
    """The boolean options given as anything but a bool or np.bool_."""
    names = ("return_aux", "return_lse", "skip_unscored")
    return tuple(
        n
        for n in names
        if n in case.static and not isinstance(case.static[n], bool | np.bool_)
    )


def _reduction(draw, default=None, lm=False):
    options = ["none", "sum", "mean"] + ([default] if default else [])
    options += ["mean_per_segment"] if lm else []
    return draw(st.sampled_from(options), label="reduction")


def _normalizer(draw, reduction, pair_ok, x64):
    """``(value, form)`` of a normalizer (only with reduction="mean"); a pair
    ``(ce, z)`` only where there is a z-loss term to divide (``pair_ok``)."""
    if reduction not in ("mean", "default", "mean_per_segment"):
        return None, None
    pair_ok = pair_ok and reduction != "mean_per_segment"
    choices = ["none", "scalar", "zero"] + (["pair"] if pair_ok else [])
    what = draw(st.sampled_from(choices), label="normalizer")
    if what == "none":
        return None, None
    form = draw(st.sampled_from(["py", "np", "jnp"]), label="normalizer form")
    dt = np.float64 if x64 else np.float32
    if what == "scalar":
        return np.asarray(2.5, dt), form
    if what == "zero":
        return np.asarray(0.0, dt), form
    return (np.asarray(2.5, dt), np.asarray(4.0, dt)), form


def _zero_weight_class(rng, c, anchors):
    """A class for a zero class weight, away from the labels where possible:
    a row whose target has no mass at all (0 * inf on an infinite lse) is a
    corner the specification leaves open."""
    free = sorted(set(range(c)) - {int(a) for a in anchors})
    return [int(rng.choice(free))] if free else []


def _cotangent(rng, shape):
    """A cotangent of small dyadic numbers (exact in every dtype)."""
    return (rng.integers(-8, 9, size=shape) / 4.0).astype(np.float64)


TEMPERATURES = (None, None, 0.5, 2.0, 0.7, 3.0)
# log2 of the smallest normal of each compute dtype: temperatures 2**(+-e) and
# between are accepted, 2**(+-(e + 1)) refused (issue 28, item 5).
TEMPERATURE_EXPONENT = {F32: 126, F64: 1022}


def _temperature(draw, dtype):
    """A temperature: a usual one, one at or inside the ends of what the
    compute dtype holds with its reciprocal (powers of two: exact), or one
    just beyond them (a ValueError naming ``temperature``)."""
    where = draw(
        st.sampled_from(["usual", "usual", "usual", "extreme", "outside"]),
        label="temperature range",
    )
    if where == "usual":
        return draw(st.sampled_from(TEMPERATURES), label="temperature")
    e = TEMPERATURE_EXPONENT[compute_dtype(dtype)]
    exponents = [-e, -e // 2, e // 2, e] if where == "extreme" else [-e - 1, e + 1]
    return 2.0 ** draw(st.sampled_from(exponents), label="temperature exponent")


def compute_dtype(dtype) -> np.dtype:
    """The dtype the package computes ``dtype`` in."""
    return F64 if np.dtype(dtype) == F64 else F32


def temperature_refused(case) -> bool:
    """Whether the case's temperature is outside what its compute dtype holds
    as a normal number, with its reciprocal."""
    t = case.static.get("temperature")
    if t is None:
        return False
    tiny = float(np.finfo(compute_dtype(case.dtype)).tiny)
    return not tiny <= t <= 1.0 / tiny


SEGMENT_DTYPES = tuple(np.dtype(d) for d in "int32 uint8 int16".split())


def _segment_ids(draw, rng, batch_shape, ignore_index, x64):
    """Segment ids with the labels' shape: runs along the last axis, an id
    reused after another (a new segment), padding (negative, or
    ``ignore_index`` where the dtype holds it) at the end or anywhere."""
    dtypes = SEGMENT_DTYPES + ((np.dtype(np.int64),) if x64 else ())
    dtype = draw(st.sampled_from(dtypes), label="segment_ids dtype")
    n = int(np.prod(batch_shape))
    if n == 0:
        return np.zeros(batch_shape, dtype)
    length = batch_shape[-1]
    runs = np.cumsum(rng.random(n) < 0.4).reshape(-1, length)
    ids = rng.integers(0, 3, size=int(runs.max()) + 1)[runs]
    pads = [v for v in (-1, ignore_index) if v is not None]
    pads = [int(v) for v in pads if _representable(int(v), dtype)]
    where = draw(st.sampled_from(["none", "tail", "random"]), label="segment padding")
    if pads and n and where != "none":
        mask = np.zeros(ids.shape, bool)
        if where == "tail":
            mask[:, length - 1 - rng.integers(0, length) :] = True
        else:
            mask = rng.random(ids.shape) < 0.25
        ids = np.where(mask, rng.choice(pads, size=ids.shape), ids)
    return np.array(ids.reshape(batch_shape).tolist(), dtype=object).astype(dtype)


def _keep_shifted_labels(keep, anchors, label_codes, shift: int, batch_shape):
    """``keep`` with, in each row that keeps a class, the class of the label
    it is scored against under ``shift`` (the one at ``t + shift``): never a
    label on a masked class, where the reference (target masked: 0) and the
    package (as optax: lse over the kept classes - x_y) differ."""
    keep = keep.copy()
    ids = np.arange(len(anchors)).reshape(batch_shape)
    if ids.ndim == 0:
        return keep
    source = ids[..., shift:].reshape(-1)
    target = ids[..., : ids.shape[-1] - shift].reshape(-1)
    for t, src in zip(target, source, strict=True):
        if label_codes[src] == "class" and keep[t].any():
            keep[t, anchors[src]] = True
    return keep


def _lm_options(draw, rng, case_static, arrays, forms, batch_shape, kind, x64, dtype):
    """Temperature, shift (integer labels), segment ids and return_aux."""
    case_static["temperature"] = _temperature(draw, dtype)
    if kind in ("integer", "linear") and batch_shape:
        case_static["shift"] = draw(st.sampled_from([0, 0, 1, 2]), label="shift")
    if batch_shape and draw(st.booleans(), label="segment_ids"):
        ii = case_static.get("ignore_index")
        arrays["segment_ids"] = _segment_ids(draw, rng, batch_shape, ii, x64)
        forms["segment_ids"] = draw(
            st.sampled_from(["np", "jnp", "list"]), label="segment_ids form"
        )


def draw_softmax_case(draw, kind):
    """A case for the integer-label ("integer"), soft-label ("soft") or focal
    ("focal") softmax loss."""
    x64, dtype, label_dtype = _draw_dtypes(draw)
    shape, axis = draw(st.sampled_from(SOFTMAX_SHAPES), label="shape, axis")
    axes = canonical_axes(axis, len(shape))
    batch_shape = tuple(shape[i] for i in range(len(shape)) if i not in axes)
    n = int(np.prod(batch_shape))
    c = int(np.prod([shape[i] for i in axes]))
    seed = draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    scale, offset, regime = _scale(draw, dtype)

    ignore_index = None
    if kind in ("integer", "focal"):
        ignore_index = _ignore_index(draw)
        labels, anchors, label_codes = _labels(
            draw, rng, n, c, label_dtype, ignore_index
        )
    else:
        anchors = rng.integers(0, c, size=n)
        label_codes = ["class"] * n

    where_kind = draw(st.sampled_from([None, "class", "example"]), label="where")
    keep = None
    if where_kind is not None:
        where_codes = _codes(draw, WHERE_CODES, n, "where codes")
        keep = np.ones((n, c), bool)
        for i, code in enumerate(where_codes):
            if code == "random":
                keep[i] = rng.random(c) < 0.7
            elif code == "none":
                keep[i] = False
            if code != "none" and label_codes[i] == "class":
                keep[i, anchors[i]] = True  # never a label on a masked class
        if where_kind == "example":
            keep[:] = keep.any(axis=1, keepdims=True)

    xc = rng.standard_normal((n, c)) * scale + offset
    row_codes = _codes(draw, ROW_DRAWS, n, "row codes")
    if where_kind != "class" and "nan_masked" in row_codes:
        row_codes = ["nan_away" if r == "nan_masked" else r for r in row_codes]
    _apply_row_codes(rng, xc, anchors, row_codes, keep)
    unscored = np.array([code != "class" for code in label_codes], bool)
    if keep is not None:
        unscored = unscored | ~keep.any(axis=1)
    _poison(draw, rng, xc, unscored)
    xc = _clip_to(dtype, xc)
    logits = from_classes_last(xc, shape, axes).astype(dtype)

    arrays: dict[str, Any] = {"logits": logits}
    forms = {"logits": draw(st.sampled_from(["np", "jnp"]), label="logits form")}
    if kind == "soft":
        mode = draw(st.sampled_from(["one_hot", "dense", "sparse"]), label="targets")
        y = np.zeros((n, c))
        y[np.arange(n), anchors] = 1.0
        if mode == "dense":
            y = rng.random((n, c)) + y
            y /= y.sum(axis=1, keepdims=True)
        elif mode == "sparse":
            y = y + rng.random((n, c)) * (rng.random((n, c)) < 0.4)
        arrays["labels"] = from_classes_last(y, shape, axes).astype(dtype)
        forms["labels"] = draw(st.sampled_from(["np", "jnp"]), label="labels form")
    else:
        arrays["labels"] = labels.reshape(batch_shape)
        list_ok = label_dtype == np.dtype(np.int32)
        forms["labels"] = draw(
            st.sampled_from(["np", "jnp"] + (["list"] if list_ok else [])),
            label="labels form",
        )
    if where_kind == "class":
        arrays["where"] = from_classes_last(keep, shape, axes)
    elif where_kind == "example":
        arrays["where"] = keep[:, 0].reshape(batch_shape)
    if where_kind is not None:
        forms["where"] = draw(
            st.sampled_from(["np", "jnp", "list"]), label="where form"
        )

    static: dict[str, Any] = {"axis": axis}
    z_loss = 0.0
    if kind in ("integer", "soft"):
        static["label_smoothing"] = draw(
            st.sampled_from([0.0, 0.1, 1.0]), label="label_smoothing"
        )
        if regime != "large" or scale <= 1e4:
            z_loss = draw(st.sampled_from([0.0, 1e-3, 0.5]), label="z_loss")
        static["z_loss"] = z_loss
        cw = draw(st.sampled_from([None, "positive", "with_zero"]), label="weights")
        if cw is not None:
            w = np.round(rng.uniform(0.25, 2.0, size=c) * 64) / 64
            if cw == "with_zero":
                w[_zero_weight_class(rng, c, anchors)] = 0.0
            arrays["class_weights"] = w.astype(np.float64 if x64 else np.float32)
            forms["class_weights"] = draw(
                st.sampled_from(["np", "jnp", "list"]), label="class_weights form"
            )
    if kind == "integer" or kind == "focal":
        static["ignore_index"] = ignore_index
    if kind in ("integer", "soft"):
        _lm_options(draw, rng, static, arrays, forms, batch_shape, kind, x64, dtype)
        static["return_aux"] = _bool_option(draw, "return_aux")
    if static.get("shift") and where_kind == "class":
        keep = _keep_shifted_labels(
            keep, anchors, label_codes, static["shift"], batch_shape
        )
        arrays["where"] = from_classes_last(keep, shape, axes)
    if kind == "focal":
        static["gamma"] = draw(st.sampled_from([2.0, 0.0, 1.0]), label="gamma")
        alpha = draw(st.sampled_from([None, "scalar", "per_class"]), label="alpha")
        if alpha == "scalar":
            arrays["alpha"] = np.asarray(0.25, np.float64 if x64 else np.float32)
            forms["alpha"] = draw(
                st.sampled_from(["py", "np", "jnp"]), label="alpha form"
            )
        elif alpha == "per_class":
            a = np.round(rng.uniform(0.1, 1.0, size=c) * 64) / 64
            arrays["alpha"] = a.astype(np.float64 if x64 else np.float32)
            forms["alpha"] = draw(
                st.sampled_from(["np", "jnp", "list"]), label="alpha form"
            )
    reduction = _reduction(draw, lm=kind != "focal")
    static["reduction"] = reduction
    pair_ok = kind != "focal" and z_loss > 0
    normalizer, form = _normalizer(draw, reduction, pair_ok, x64)
    if normalizer is not None:
        arrays["normalizer"], forms["normalizer"] = normalizer, form
    if kind != "focal":
        static["implementation"] = draw(
            st.sampled_from([None, "reference"]), label="implementation"
        )
    transform = _transform(draw, kind)
    per_example = ("logits", "labels", "where", "segment_ids")
    case = Case(
        kind, transform, x64, dtype, arrays, forms, static, per_example=per_example
    )
    case.notes.update(seed=seed, regime=regime, rows=row_codes, label_codes=label_codes)
    _finish(draw, rng, case)
    return case


def draw_linear_case(draw):
    """A case for linear_cross_entropy (dyadic x and w, so that x @ w is exact
    in float32 and the offset lives in the bias)."""
    x64, dtype, label_dtype = _draw_dtypes(draw)
    batch_shape, d, v = draw(st.sampled_from(LINEAR_SHAPES), label="x batch, D, V")
    n = int(np.prod(batch_shape))
    seed = draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    regime = draw(st.sampled_from(["unit", "large", "offset"]), label="value regime")
    ex = ew = 0
    offset = 0.0
    if regime == "large":
        top = 5 if dtype == F16 else 50
        ex = ew = draw(st.sampled_from([5, top]), label="log2 scale")
    elif regime == "offset":
        sign = draw(st.sampled_from([1.0, -1.0]), label="offset sign")
        offset = sign * draw(
            st.sampled_from([1e4] if dtype == F16 else [1e4, 3e5]), label="offset"
        )
    x = rng.integers(-16, 17, size=(n, d)) / 8.0 * 2.0**ex
    w = rng.integers(-16, 17, size=(d, v)) / 8.0 * 2.0**ew

    static: dict[str, Any] = {}
    nc = None
    if v > 2 and draw(st.booleans(), label="padded"):
        nc = v - 2
        static["num_classes"] = draw(
            st.sampled_from([nc, np.int64(nc)]), label="num_classes"
        )
    num_real = v if nc is None else nc
    ignore_index = _ignore_index(draw)
    extra = () if nc is None else (nc, v - 1)
    labels, anchors, label_codes = _labels(
        draw, rng, n, num_real, label_dtype, ignore_index, extra
    )
    row_codes = _codes(draw, ("ordinary", "nan_x", "inf_x"), n, "x rows")
    for i, code in enumerate(row_codes):
        if code == "nan_x":
            x[i, rng.integers(d)] = np.nan
        elif code == "inf_x":
            x[i, rng.integers(d)] = rng.choice([np.inf, -np.inf])
    _poison(draw, rng, x, np.array([c != "class" for c in label_codes], bool))

    arrays: dict[str, Any] = {
        "x": x.reshape(batch_shape + (d,)).astype(dtype),
        "w": w.astype(dtype),
        "labels": labels.reshape(batch_shape),
    }
    forms = {
        "x": draw(st.sampled_from(["np", "jnp"]), label="x form"),
        "w": draw(st.sampled_from(["np", "jnp"]), label="w form"),
        "labels": draw(
            st.sampled_from(
                ["np", "jnp"] + (["list"] if label_dtype == np.dtype(np.int32) else [])
            ),
            label="labels form",
        ),
    }
    bias_kind = draw(
        st.sampled_from([None, "plain", "neg_inf", "pos_inf", "nan_padding"]),
        label="bias",
    )
    if regime == "offset" and bias_kind is None:
        bias_kind = "plain"
    if bias_kind is not None:
        b = rng.integers(-16, 17, size=v) / 16.0 * 2.0 ** (ex + ew) + offset
        if bias_kind == "neg_inf":
            b[rng.choice(v, size=rng.integers(1, v + 1), replace=False)] = -np.inf
        elif bias_kind == "pos_inf":
            b[rng.integers(v)] = np.inf
        elif bias_kind == "nan_padding" and nc is not None:
            b[rng.integers(nc, v)] = np.nan
        arrays["bias"] = _clip_to(dtype, b).astype(dtype)
        forms["bias"] = draw(st.sampled_from(["np", "jnp", "list"]), label="bias form")

    static["ignore_index"] = ignore_index
    static["label_smoothing"] = draw(
        st.sampled_from([0.0, 0.1, 1.0]), label="label_smoothing"
    )
    z_loss = 0.0
    if regime != "large" or ex + ew <= 10:
        z_loss = draw(st.sampled_from([0.0, 1e-3, 0.5]), label="z_loss")
    static["z_loss"] = z_loss
    cw = draw(st.sampled_from([None, "positive", "with_zero"]), label="weights")
    if cw is not None:
        cwv = np.round(rng.uniform(0.25, 2.0, size=v) * 64) / 64
        if cw == "with_zero":
            cwv[_zero_weight_class(rng, v, anchors)] = 0.0
        arrays["class_weights"] = cwv.astype(np.float64 if x64 else np.float32)
        forms["class_weights"] = draw(
            st.sampled_from(["np", "jnp", "list"]), label="class_weights form"
        )
    static["logit_softcap"] = draw(
        st.sampled_from([None, 5.0, 30.0]), label="logit_softcap"
    )
    static["block_size"] = draw(
        st.sampled_from([None, 2, (2, 3), np.int64(3)]), label="block_size"
    )
    static["filter_threshold"] = draw(
        st.sampled_from([None, 1e-30]), label="filter_threshold"
    )
    outputs = draw(st.sampled_from([None, "lse", "aux"]), label="outputs")
    static["return_lse"] = _bool_option(draw, "return_lse", outputs == "lse")
    static["return_aux"] = _bool_option(draw, "return_aux", outputs == "aux")
    if draw(st.booleans(), label="skip_unscored drawn"):
        static["skip_unscored"] = _bool_option(draw, "skip_unscored")
    if outputs == "aux" and draw(st.booleans(), label="coarse filter"):
        # A threshold that skips blocks: the filter must be off while the
        # entropy (differentiated with return_aux) has a cotangent, exact
        # again (issue 28, item 3: a skipped block dropped its gradient).
        static["filter_threshold"] = 1e-2
    _lm_options(draw, rng, static, arrays, forms, batch_shape, "linear", x64, dtype)
    if draw(st.booleans(), label="w_layout vd"):
        static["w_layout"] = "vd"
        arrays["w"] = np.ascontiguousarray(arrays["w"].T)
    reduction = _reduction(draw, default="default", lm=True)
    if reduction != "default":
        static["reduction"] = reduction
    normalizer, form = _normalizer(draw, reduction, z_loss > 0, x64)
    if normalizer is not None:
        arrays["normalizer"], forms["normalizer"] = normalizer, form
    # The Pallas kernels run interpreted on CPU; they take no float64.
    pallas = ["pallas_triton", "pallas_tpu"] if dtype != F64 else []
    static["implementation"] = draw(
        st.sampled_from([None, "reference", *pallas]), label="implementation"
    )
    transform = _transform(draw, "linear")
    per_example = ("x", "labels", "segment_ids")
    case = Case("linear", transform, x64, dtype, arrays, forms, static, per_example)
    case.notes.update(
        seed=seed, regime=regime, x_rows=row_codes, label_codes=label_codes
    )
    _finish(draw, rng, case)
    return case


def draw_bce_case(draw):
    x64 = draw(st.booleans(), label="x64")
    dtype = draw(st.sampled_from(FLOATS_32 + ((F64,) if x64 else ())), label="dtype")
    shape = draw(st.sampled_from(BCE_SHAPES), label="shape")
    seed = draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    regime = draw(st.sampled_from(["unit", "large", "special"]), label="regime")
    scale = 3.0
    if regime == "large":
        scale = 1e4 if dtype == F16 else draw(st.sampled_from([1e4, 1e30]))
    x = rng.standard_normal(shape) * scale
    if regime == "special" and x.size:
        flat = x.reshape(-1)
        k = rng.integers(1, flat.size + 1)
        idx = rng.choice(flat.size, size=k, replace=False)
        flat[idx] = rng.choice([np.inf, -np.inf, np.nan], size=k)
    x = _clip_to(dtype, x)
    label_kind = draw(st.sampled_from(["float", "binary", "int", "bool"]), label="y")
    y = rng.random(shape)
    if label_kind != "float":
        y = (y < 0.5).astype(np.float64)
    else:
        y = np.where(rng.random(shape) < 0.3, np.round(y), y)
    if label_kind == "float":
        y = y.astype(dtype)
    elif label_kind == "binary":
        y = y.astype(dtype)
    elif label_kind == "int":
        y = y.astype(np.int32)
    else:
        y = y.astype(bool)
    arrays: dict[str, Any] = {"logits": x.astype(dtype), "labels": y}
    forms = {
        "logits": draw(st.sampled_from(["np", "jnp"]), label="logits form"),
        "labels": draw(st.sampled_from(["np", "jnp"]), label="labels form"),
    }
    wdt = np.float64 if x64 else np.float32
    last = shape[-1]
    for name in ("pos_weight", "weights"):
        what = draw(st.sampled_from([None, "last_axis", "scalar", "full"]), label=name)
        if what is None:
            continue
        wshape = {"last_axis": (last,), "scalar": (), "full": shape}[what]
        arrays[name] = (np.round(rng.uniform(0.25, 3.0, wshape) * 64) / 64).astype(wdt)
        forms[name] = draw(
            st.sampled_from(["np", "jnp"] + (["list"] if wshape else ["py"])),
            label=f"{name} form",
        )
    static: dict[str, Any] = {
        "label_smoothing": draw(st.sampled_from([0.0, 0.1]), label="label_smoothing")
    }
    reduction = _reduction(draw)
    static["reduction"] = reduction
    normalizer, form = _normalizer(draw, reduction, False, x64)
    if normalizer is not None:
        arrays["normalizer"], forms["normalizer"] = normalizer, form
    static["implementation"] = draw(
        st.sampled_from([None, "reference"]), label="implementation"
    )
    transform = _transform(draw)
    case = Case(
        "bce", transform, x64, dtype, arrays, forms, static, ("logits", "labels")
    )
    case.notes.update(seed=seed, regime=regime)
    _finish(draw, rng, case)
    return case


def _concrete(case: Case, name: str) -> bool:
    """Whether the package sees ``name`` as a concrete value (not traced)."""
    return case.transform in CONCRETE_LABELS or case.forms.get(name) == "list"


def _widen_segment_ids(draw, case: Case):
    """With x64 off, segment ids given as concrete int64 values beyond int32
    (every id moved by 2**32: wrapped to int32 they would be the same ids, so
    only the check tells): a ValueError naming ``segment_ids`` (issue 28,
    item 6). JAX itself converts traced ones at the ``jit`` boundary."""
    ids = case.arrays.get("segment_ids")
    if case.x64 or ids is None or ids.size == 0 or not _concrete(case, "segment_ids"):
        return
    if draw(st.booleans(), label="segment_ids beyond int32"):
        ids = ids.astype(np.int64)
        case.arrays["segment_ids"] = np.where(ids >= 0, ids + 2**32, ids)
        if case.forms.get("segment_ids") == "jnp":
            case.forms["segment_ids"] = "np"  # jnp.asarray would wrap them first


def segment_ids_wrap(case: Case) -> bool:
    """Whether concrete segment ids do not fit int32 with x64 off."""
    ids = case.arrays.get("segment_ids")
    if case.x64 or ids is None or ids.size == 0 or not _concrete(case, "segment_ids"):
        return False
    return bool((np.asarray(ids, np.int64) > np.iinfo(np.int32).max).any())


def _finish(draw, rng, case: Case):
    """Differentiated arguments and cotangents of a grad transformation."""
    for name, form in case.forms.items():
        if form == "list" and np.size(case.arrays[name]) == 0:
            case.forms[name] = "np"  # an empty list has no dtype
    if case.transform == "export":
        if 0 in _batch_shape(case) or not _batch_shape(case):
            case.transform = "jit"  # a symbolic dimension is at least 1
        for name in _sequence_axes(case):
            if case.forms.get(name) == "list":
                case.forms[name] = "np"  # a constant has no symbolic shape
    if case.transform == "vmap":
        # Per-example arguments must be arrays to be mapped over.
        for name in case.per_example:
            if case.forms.get(name) == "list":
                case.forms[name] = "np"
    _widen_segment_ids(draw, case)
    if case.transform not in GRAD_TRANSFORMS:
        return
    floats = {
        "integer": ("logits", "class_weights", "normalizer"),
        "soft": ("logits", "labels", "class_weights", "normalizer"),
        "focal": ("logits", "alpha", "normalizer"),
        "bce": ("logits", "labels", "pos_weight", "weights", "normalizer"),
        "linear": ("x", "w", "bias", "class_weights", "normalizer"),
    }[case.kind]
    diff = []
    for name in floats:
        form = case.forms.get(name)
        if name not in case.arrays or form == "list":
            continue
        if form == "py" and name != "normalizer":  # a Python float's gradient
            continue  # has the default float dtype, not the array's
        if name == "labels" and case.arrays[name].dtype.kind != "f":
            continue
        diff.append(name)
    case.diff = tuple(diff)
    out_shape = _output_shape(case)
    case.cotangent = _cotangent(rng, out_shape)
    if draw(st.booleans(), label="unit cotangent"):
        case.cotangent = np.ones(out_shape)  # the loss differentiated as it is
        case.notes["unit cotangent"] = True
    batch = _batch_shape(case)
    if case.static.get("return_lse") or case.static.get("return_aux"):
        # Only scored rows: the lse of an unscored row is unspecified.
        case.lse_cotangent = _cotangent(rng, batch) * scored_examples(case)
    if case.static.get("return_aux"):
        case.entropy_cotangent = _cotangent(rng, batch) * scored_examples(case)


def _output_shape(case: Case):
    return () if _reduction_of(case) != "none" else _batch_shape(case)


def _batch_shape(case: Case):
    if case.kind == "bce":
        return case.arrays["logits"].shape
    if case.kind == "linear":
        return np.shape(case.arrays["labels"])
    shape = case.arrays["logits"].shape
    axes = canonical_axes(case.static["axis"], len(shape))
    return tuple(shape[i] for i in range(len(shape)) if i not in axes)


# --- running the package ----------------------------------------------------------


def _package_fn(case: Case):
    """``f(arrays) -> output`` calling the public function with static options."""
    s = dict(case.static)

    def f(a):
        if case.kind == "integer":
            return xj.softmax_cross_entropy_with_integer_labels(
                a["logits"],
                a["labels"],
                s["axis"],
                a.get("where"),
                ignore_index=s["ignore_index"],
                label_smoothing=s["label_smoothing"],
                class_weights=a.get("class_weights"),
                z_loss=s["z_loss"],
                reduction=s["reduction"],
                normalizer=a.get("normalizer"),
                implementation=s["implementation"],
                temperature=s["temperature"],
                shift=s.get("shift", 0),
                segment_ids=a.get("segment_ids"),
                return_aux=s["return_aux"],
            )
        if case.kind == "soft":
            return xj.softmax_cross_entropy(
                a["logits"],
                a["labels"],
                s["axis"],
                a.get("where"),
                label_smoothing=s["label_smoothing"],
                class_weights=a.get("class_weights"),
                z_loss=s["z_loss"],
                reduction=s["reduction"],
                normalizer=a.get("normalizer"),
                implementation=s["implementation"],
                temperature=s["temperature"],
                segment_ids=a.get("segment_ids"),
                return_aux=s["return_aux"],
            )
        if case.kind == "focal":
            return xj.softmax_focal_loss(
                a["logits"],
                a["labels"],
                gamma=s["gamma"],
                alpha=a.get("alpha"),
                axis=s["axis"],
                where=a.get("where"),
                ignore_index=s["ignore_index"],
                reduction=s["reduction"],
                normalizer=a.get("normalizer"),
            )
        if case.kind == "bce":
            return xj.sigmoid_binary_cross_entropy(
                a["logits"],
                a["labels"],
                pos_weight=a.get("pos_weight"),
                label_smoothing=s["label_smoothing"],
                weights=a.get("weights"),
                reduction=s["reduction"],
                normalizer=a.get("normalizer"),
                implementation=s["implementation"],
            )
        if case.kind == "linear":
            kw = {k: v for k, v in s.items()}
            return xj.linear_cross_entropy(
                a["x"],
                a["w"],
                a["labels"],
                bias=a.get("bias"),
                class_weights=a.get("class_weights"),
                normalizer=a.get("normalizer"),
                segment_ids=a.get("segment_ids"),
                **kw,
            )
        raise AssertionError(case.kind)

    return f


def _vmapped(case: Case):
    """The inputs with a leading axis of 2: the case itself and the case with
    negated float per-example inputs (exact in every dtype)."""
    out = {}
    for name, value in case.arrays.items():
        if name in case.per_example:
            value = np.asarray(value)
            second = -value if value.dtype.kind == "f" and name != "labels" else value
            out[name] = np.stack([value, second])
        else:
            out[name] = value
    return out


def _split(arrays, names):
    traced = {k: v for k, v in arrays.items() if k in names}
    rest = {k: v for k, v in arrays.items() if k not in names}
    return traced, rest


def run_package(case: Case):
    """Runs the case on the package: ``(output, grads)`` (grads ``{}`` unless a
    grad transformation); output is ``(loss, lse)`` with ``return_lse``."""
    f = _package_fn(case)
    arrays = case.arrays
    if case.transform == "vmap":
        arrays = _vmapped(case)
    args = {k: _form(v, case.forms.get(k, "np")) for k, v in arrays.items()}
    const = {k: v for k, v in args.items() if case.forms.get(k) == "list"}
    dynamic = {k: v for k, v in args.items() if k not in const}

    def call(d):
        return f({**d, **const})

    t = case.transform
    if t == "eager":
        return call(dynamic), {}
    if t == "jit":
        return jax.jit(call)(dynamic), {}
    if t == "vmap":
        batched, shared = _split(dynamic, case.per_example)
        return jax.jit(jax.vmap(lambda b: call({**b, **shared})))(batched), {}
    if t == "export":
        return _exported(call, case, dynamic)(dynamic), {}

    diff, rest = _split(dynamic, case.diff)
    g = _objective(call, case)
    if t == "grad":
        (_, out), grads = jax.value_and_grad(lambda d: g({**d, **rest}), has_aux=True)(
            diff
        )
    elif t == "jit_grad":
        (_, out), grads = jax.jit(jax.value_and_grad(g_split(g), has_aux=True))(
            diff, rest
        )
    elif t == "checkpoint":
        (_, out), grads = jax.value_and_grad(jax.checkpoint(g_split(g)), has_aux=True)(
            diff, rest
        )
    else:  # pragma: no cover
        raise AssertionError(t)
    return out, grads


def _sequence_axes(case: Case) -> dict[str, int]:
    """The axis of each array that runs along the last batch axis (the
    sequence), made symbolic by the ``export`` transformation."""
    names = {}
    for name, value in case.arrays.items():
        shape = np.shape(value)
        if name == "x":
            names[name] = len(shape) - 2
        elif name in ("logits",) or (
            name in ("labels", "where") and shape == np.shape(case.arrays.get("logits"))
        ):
            axes = canonical_axes(case.static["axis"], len(shape))
            names[name] = max(i for i in range(len(shape)) if i not in axes)
        elif name in ("labels", "where", "segment_ids"):
            names[name] = len(shape) - 1
    return names


def _exported(call, case: Case, dynamic):
    """``call`` exported with the sequence length symbolic, called on the
    arrays (a Python scalar becomes an array argument)."""
    (length,) = jax.export.symbolic_shape("t")
    axes = _sequence_axes(case)
    args = jax.tree.map(jnp.asarray, dynamic)

    def spec(name, value):
        shape = list(value.shape)
        if name in axes:
            shape[axes[name]] = length
        return jax.ShapeDtypeStruct(tuple(shape), value.dtype)

    specs = {k: jax.tree.map(lambda v, k=k: spec(k, v), v) for k, v in args.items()}
    exported = jax.export.export(jax.jit(call))(specs)
    return lambda _: exported.call(args)


def g_split(g):
    return lambda d, r: g({**d, **r})


def _objective(call, case: Case):
    """``sum(ct * loss)`` plus ``sum(ct_lse * lse)`` (``return_lse``, or
    ``aux.lse`` and ``sum(ct_entropy * aux.entropy)`` with ``return_aux``),
    and the raw output as aux."""

    def g(d):
        out = call(d)
        loss = out[0] if isinstance(out, tuple) else out
        total = jnp.sum(jnp.asarray(case.cotangent, loss.dtype) * loss)
        extras = []
        if case.static.get("return_aux"):
            extras = [(case.lse_cotangent, out[1].lse)]
            extras += [(case.entropy_cotangent, out[1].entropy)]
        elif case.lse_cotangent is not None:
            extras = [(case.lse_cotangent, out[1])]
        for ct, value in extras:
            if ct is not None:
                total = total + jnp.sum(jnp.asarray(ct, value.dtype) * value)
        return total, out

    return g


# --- running the reference --------------------------------------------------------


def _ref_terms(case: Case, a):
    """Reference :class:`reference.Terms` (or focal / BCE per-element losses)."""
    s = case.static
    if case.kind == "integer":
        return ref.integer_xent_terms(
            a["logits"],
            a["labels"],
            s["axis"],
            a.get("where"),
            ignore_index=s["ignore_index"],
            label_smoothing=s["label_smoothing"],
            class_weights=a.get("class_weights"),
            z_loss=s["z_loss"],
            temperature=s["temperature"],
            shift=s.get("shift", 0),
            segment_ids=a.get("segment_ids"),
        )
    if case.kind == "soft":
        return ref.soft_xent_terms(
            a["logits"],
            a["labels"],
            s["axis"],
            a.get("where"),
            label_smoothing=s["label_smoothing"],
            class_weights=a.get("class_weights"),
            z_loss=s["z_loss"],
            temperature=s["temperature"],
            segment_ids=a.get("segment_ids"),
        )
    if case.kind == "linear":
        return ref.linear_xent_terms(
            a["x"],
            w_dv(case, a["w"]),
            a["labels"],
            bias=a.get("bias"),
            ignore_index=s["ignore_index"],
            label_smoothing=s["label_smoothing"],
            class_weights=a.get("class_weights"),
            z_loss=s["z_loss"],
            logit_softcap=s["logit_softcap"],
            num_classes=s.get("num_classes"),
            temperature=s["temperature"],
            shift=s["shift"],
            segment_ids=a.get("segment_ids"),
        )
    if case.kind == "focal":
        t = ref.integer_xent_terms(
            a["logits"],
            a["labels"],
            s["axis"],
            a.get("where"),
            ignore_index=s["ignore_index"],
        )
        loss = ref.softmax_focal(
            a["logits"],
            a["labels"],
            gamma=s["gamma"],
            alpha=a.get("alpha"),
            axis=s["axis"],
            where=a.get("where"),
            ignore_index=s["ignore_index"],
        )
        return ref.Terms(loss, jnp.zeros_like(loss), t.weight, t.scored)
    if case.kind == "bce":
        loss = ref.bce(
            a["logits"],
            a["labels"],
            pos_weight=a.get("pos_weight"),
            label_smoothing=s["label_smoothing"],
            weights=a.get("weights"),
        )
        ones = jnp.ones(loss.shape, loss.dtype)
        return ref.Terms(loss, jnp.zeros_like(loss), ones, ones > 0)
    raise AssertionError(case.kind)


def w_dv(case: Case, w):
    """``w`` as [D, V] (``w_layout="vd"`` passes its transpose)."""
    return w.T if case.static.get("w_layout") == "vd" else w


def _ref_logits(case: Case, a, scored):
    """``(logits, kept classes, T)``: classes-last logits, ``T`` the
    temperature still to divide them by (the fused loss's are tempered and
    capped already, and of the real columns only, from the rows of ``x`` of
    scored examples; the others zeroed: double-where)."""
    s = case.static
    if case.kind == "linear":
        x = jnp.where(scored[..., None], a["x"], 0.0)
        nc = _num_classes(case)
        bias = a.get("bias")
        bias = None if bias is None else bias[:nc]
        w = w_dv(case, a["w"])[:, :nc]
        z = ref.linear_logits(x, w, bias, s["logit_softcap"], s["temperature"])
        return z, jnp.ones(z.shape, bool), None
    logits = a["logits"]
    axes = canonical_axes(s["axis"], logits.ndim)
    x = ref._classes_last(logits, axes)
    where = a.get("where")
    keep = jnp.ones(x.shape, bool)  # a per-example where masks no class
    if where is not None and where.shape == logits.shape:
        keep = ref._classes_last(where, axes)
    return x, keep, s["temperature"]


def _ref_output(case: Case, a):
    """The loss; with ``return_lse`` ``(loss, lse)``, with ``return_aux``
    ``(loss, reference.AuxStats)``."""
    terms = _ref_terms(case, a)
    segments = None
    if _reduction_of(case) == "mean_per_segment":
        segments = ref.segment_index(a.get("segment_ids"), np.shape(terms.ce))
    loss = ref.reduce_terms(terms, _reduction_of(case), a.get("normalizer"), segments)
    if case.static.get("return_lse"):
        z, _, _ = _ref_logits(case, a, terms.scored)
        return loss, jax.nn.logsumexp(z, axis=-1)
    if case.static.get("return_aux"):
        # Aux of every row from its own logits (lse and entropy differentiated
        # on scored rows only: the cotangents are 0 elsewhere).
        z, keep, t = _ref_logits(case, a, jnp.ones(np.shape(terms.ce), bool))
        z_scored, _, _ = _ref_logits(case, a, terms.scored)
        stats = ref.softmax_stats(z_scored, keep, t)
        values = ref.softmax_stats(jax.lax.stop_gradient(z), keep, t)
        ok = terms.scored
        return loss, ref.AuxStats(
            jnp.where(ok, stats.lse, values.lse),
            values.argmax,
            jnp.where(ok, stats.entropy, values.entropy),
        )
    return loss


def _f64_arrays(arrays):
    out = {}
    for name, value in arrays.items():
        if name in ("labels", "segment_ids") and np.asarray(value).dtype.kind in "iub":
            out[name] = jnp.asarray(np.asarray(value))
        elif name == "where":
            out[name] = jnp.asarray(np.asarray(value, bool))
        elif isinstance(value, tuple):
            out[name] = tuple(jnp.asarray(to_f64(v)) for v in value)
        else:
            out[name] = jnp.asarray(to_f64(value))
    return out


@dataclasses.dataclass
class Reference:
    output: Any  # loss, or (loss, lse)
    grads: dict[str, Any]
    terms: list  # one reference.Terms per vmap slice (numpy)
    arrays: list  # the float64 inputs per slice (numpy)
    logits: list  # (classes-last logits, kept classes) per slice, with return_aux


def run_reference(case: Case) -> Reference:
    """The reference on the case's inputs in float64, as one jitted program."""
    slices = [case.arrays]
    if case.transform == "vmap":
        both = _vmapped(case)
        slices = [
            {k: (v[i] if k in case.per_example else v) for k, v in both.items()}
            for i in range(2)
        ]
    grad = case.transform in GRAD_TRANSFORMS

    def evaluate(per_slice):
        terms = [_ref_terms(case, a) for a in per_slice]
        outs = [_ref_output(case, a) for a in per_slice]
        logits = []
        if case.static.get("return_aux"):
            every = [jnp.ones(np.shape(t.ce), bool) for t in terms]
            logits = [
                _ref_logits(case, a, o) for a, o in zip(per_slice, every, strict=True)
            ]
        grads = {}
        if grad:
            diff, rest = _split(per_slice[0], case.diff)
            g = _objective(lambda d: _ref_output(case, d), case)
            (_, out), grads = jax.value_and_grad(
                lambda d: g({**d, **rest}), has_aux=True
            )(diff)
            outs = [out]
        return terms, outs, grads, logits

    with float64():
        inputs = [_f64_arrays(a) for a in slices]
        terms, outs, grads, logits = jax.jit(evaluate)(inputs)
        output = outs[0]
        if case.transform == "vmap":
            output = jax.tree.map(lambda *v: np.stack(v), *outs)
        return Reference(
            jax.tree.map(_np, output),
            jax.tree.map(_np, grads),
            [ref.Terms(*(_np(t) for t in ts)) for ts in terms],
            [{k: _np(v) for k, v in a.items()} for a in inputs],
            [(_np(z), _np(keep), t) for z, keep, t in logits],
        )


def _np(v):
    return np.asarray(v) if not isinstance(v, tuple) else tuple(map(_np, v))


# --- expectations -----------------------------------------------------------------


def _reduction_of(case: Case) -> str:
    return case.static.get("reduction", "mean" if case.kind == "linear" else "none")


def _num_classes(case: Case) -> int:
    if case.kind == "linear":
        v = np.shape(w_dv(case, case.arrays["w"]))[1]
        return int(case.static.get("num_classes") or v)
    shape = case.arrays["logits"].shape
    axes = canonical_axes(case.static["axis"], len(shape))
    return int(np.prod([shape[i] for i in axes]))


def _label_values(case: Case):
    labels = np.asarray(case.arrays["labels"])
    values = np.array(labels.reshape(-1).tolist(), dtype=object)
    return values.reshape(labels.shape)


def _targets(case: Case):
    """``(target label values, has_target)``: the labels moved by ``shift``
    (exact Python ints; the last ``shift`` positions have none)."""
    values = _label_values(case)
    has = np.ones(values.shape, bool)
    k = min(case.static.get("shift", 0), values.shape[-1] if values.ndim else 0)
    if k:
        values = np.concatenate([values[..., k:], np.zeros_like(values[..., :k])], -1)
        has[..., values.shape[-1] - k :] = False
    return values, has


def _segments_allow(case: Case):
    """Where segments let an example score (padding, and shift across a
    segment boundary, do not)."""
    seg = case.arrays.get("segment_ids")
    if seg is None:
        return True
    seg = np.array(np.asarray(seg).tolist(), dtype=object)
    ii = case.static.get("ignore_index")
    ok = [v >= 0 and (ii is None or v != int(ii)) for v in seg.reshape(-1)]
    ok = np.array(ok, bool)
    ok = ok.reshape(seg.shape)
    length = seg.shape[-1]
    for k in range(1, case.static.get("shift", 0) + 1):
        same = np.zeros(seg.shape, bool)
        same[..., : max(length - k, 0)] = seg[..., k:] == seg[..., : length - k]
        ok = ok & same
    return ok


def bad_labels(case: Case):
    """Target labels that are neither a class id nor ignore_index (exact)."""
    values, has = _targets(case)
    c = _num_classes(case)
    ii = case.static.get("ignore_index")
    bad = [
        not 0 <= int(v) < c and (ii is None or int(v) != int(ii))
        for v in values.reshape(-1)
    ]
    return np.array(bad, bool).reshape(values.shape) & has


def scored_labels(case: Case):
    """Target labels that are a class id and not ignore_index (exact), where
    segments allow."""
    values, has = _targets(case)
    c = _num_classes(case)
    ii = case.static.get("ignore_index")
    ok = [
        0 <= int(v) < c and (ii is None or int(v) != int(ii))
        for v in values.reshape(-1)
    ]
    return np.array(ok, bool).reshape(values.shape) & has & _segments_allow(case)


def scored_examples(case: Case):
    """Examples that may be scored, as far as the labels and segments tell
    (``where`` and masked rows may still leave some out)."""
    if case.kind in ("integer", "focal", "linear"):
        return scored_labels(case)
    return np.ones(_batch_shape(case), bool) & _segments_allow(case)


def expected_errors(case: Case):
    """``(exception type, words one of which the message names)`` or None.
    Options are validated before the arrays: a refused boolean option's
    TypeError comes first."""
    refused = refused_bool_options(case)
    if refused:
        return TypeError, refused
    words = []
    if temperature_refused(case):
        words.append("temperature")
    if segment_ids_wrap(case):
        words.append("segment_ids")
    norm = case.arrays.get("normalizer")
    if (
        case.kind in ("integer", "linear")
        and _reduction_of(case) == "mean"
        and norm is not None
        and not isinstance(norm, tuple)
        and "class_weights" in case.arrays
        and case.static["z_loss"] > 0
    ):
        words.append("normalizer")
    if case.kind in ("integer", "focal", "linear") and _concrete(case, "labels"):
        if bad_labels(case).any():
            words.append("label")
    if words:
        return ValueError, tuple(words)
    pallas = str(case.static.get("implementation")).startswith("pallas")
    if case.transform == "export" and pallas:
        return NotImplementedError, ("static shapes",)  # Pallas grids are static
    return None


# --- tolerances -------------------------------------------------------------------


@dataclasses.dataclass
class RowStats:
    """Per-example error scales (multiples of eps) of one slice."""

    value: np.ndarray  # of the loss
    grad: np.ndarray  # of each logit's gradient, per unit cotangent
    unshifted: np.ndarray  # of lse - x_c in unshifted coordinates
    tmass: np.ndarray  # bound on sum_c |t_c|
    lse: np.ndarray  # of the lse
    spread: np.ndarray = None  # of softmax statistics (the entropy)


def _softmax_row_stats(xc, keep, tmass, z_loss, delta=None):
    """Error scales of the softmax losses from classes-last float64 logits;
    ``delta``: error of the logits themselves (fused loss), in eps units."""
    fk = keep & np.isfinite(xc)
    has = fk.any(axis=-1)
    safe = np.where(fk, xc, -np.inf)
    m = np.where(has, safe.max(axis=-1, initial=-np.inf), 0.0)
    spread = np.where(fk, np.abs(xc - m[..., None]), 0.0).max(axis=-1, initial=0.0)
    big = np.where(fk, np.abs(xc), 0.0).max(axis=-1, initial=0.0)
    log_c = np.log(np.maximum(keep.sum(axis=-1), 1)) + 1.0
    lse_abs = np.abs(m) + log_c
    coef = tmass + 2 * z_loss * lse_abs
    value = tmass * (1.0 + spread + log_c) + z_loss * lse_abs * (lse_abs + log_c)
    grad = coef * (1.0 + spread + log_c)
    lse = lse_abs.copy()
    if delta is not None:
        value = value + 2 * coef * delta
        grad = grad + 2 * coef * delta
        lse = lse + 2 * delta
    unshifted = 1.0 + np.abs(m) + big + log_c
    spread_scale = 1.0 + spread + log_c + (0.0 if delta is None else 2 * delta)
    return RowStats(value, grad, unshifted, tmass, lse, spread_scale)


def _keep_classes_last(a, logits, axes):
    where = a.get("where")
    if where is not None and where.shape == logits.shape:
        return classes_last(where, axes)
    return np.ones(classes_last(logits, axes).shape, bool)  # no class masked


def _wmax(a, name):
    if name not in a:
        return 1.0
    return max(1.0, float(np.max(np.abs(a[name]), initial=0)))


def _stats(case: Case, a: dict) -> RowStats:
    """Row statistics of one slice from its float64 inputs."""
    s = case.static
    if case.kind in ("integer", "soft", "focal"):
        logits = a["logits"]
        axes = canonical_axes(s["axis"], logits.ndim)
        xc = classes_last(logits, axes) / (s.get("temperature") or 1.0)
        keep = _keep_classes_last(a, logits, axes)
        wmax = _wmax(a, "class_weights") * _wmax(a, "alpha")
        if case.kind == "soft":
            y = classes_last(a["labels"], axes)
            tmass = wmax * (np.abs(y).sum(axis=-1) + 1.0)
        else:
            tmass = np.full(xc.shape[:-1], wmax * 2.0)
        if case.kind == "focal":
            tmass = tmass * (1.0 + 2 * s["gamma"])
        return _softmax_row_stats(xc, keep, tmass, s.get("z_loss", 0.0))
    if case.kind == "linear":
        x, w, b = a["x"], w_dv(case, a["w"]), a.get("bias")
        e = eps(case.dtype)
        t = s.get("temperature") or 1.0
        with np.errstate(invalid="ignore", over="ignore"):
            pre = x @ w + (0.0 if b is None else b)
            delta = np.abs(pre.astype(np.float32).astype(np.float64) - pre) / t
            if case.dtype == F64:
                delta = np.zeros_like(pre)
            pre = pre / t
            cap = s["logit_softcap"]
            z = pre
            if t != 1.0 and cap is None:
                # The fused loss divides x @ w + b by T before it shifts: one
                # more rounding of the logits, of the order of the matmul's.
                delta = delta + e * np.abs(pre)
            if cap is not None:
                z = cap * np.tanh(pre / cap)
                delta = delta + e * (2 * cap + np.abs(pre) / np.cosh(pre / cap) ** 2)
        v = w.shape[1]
        keep = np.broadcast_to(np.arange(v) < _num_classes(case), z.shape)
        delta = np.where(keep & np.isfinite(delta), delta, 0.0).max(axis=-1, initial=0)
        tmass = np.full(z.shape[:-1], _wmax(a, "class_weights") * 2.0)
        return _softmax_row_stats(z, keep, tmass, s["z_loss"], delta / e)
    if case.kind == "bce":
        x = a["logits"]
        y = np.broadcast_to(a["labels"].astype(np.float64), x.shape)
        pw = np.broadcast_to(a.get("pos_weight", 1.0), x.shape)
        wt = np.broadcast_to(a.get("weights", 1.0), x.shape)
        coef = np.abs(wt) * (np.abs(pw) * (np.abs(y) + 1) + np.abs(1 - y) + 1)
        ax = np.where(np.isfinite(x), np.abs(x), 0.0)
        return RowStats(coef * (1 + ax), coef, coef * (1 + ax), coef, ax)
    raise AssertionError(case.kind)


def _row_weights(case: Case, terms, a):
    """Per-example cotangent scale of the reduction (1 / denominator)."""
    if _reduction_of(case) == "mean_per_segment":
        return _segment_row_weights(terms, a)
    if _reduction_of(case) != "mean":
        return np.ones(np.shape(terms.ce))
    norm = a.get("normalizer")
    if norm is None:
        dens = [terms.weight.sum(), terms.scored.sum()]
    elif isinstance(norm, tuple):
        dens = list(norm)
    else:
        dens = [norm, norm]
    inv = max((1.0 / abs(float(d)) for d in dens if float(d) != 0), default=0.0)
    return np.full(np.shape(terms.ce), inv)


def _segment_row_weights(terms, a):
    """``max(1 / |D_s|, 1 / N_s) / |number of segments|`` per example."""
    shape = np.shape(terms.ce)
    if not shape or not np.size(terms.ce):
        return np.ones(shape)
    length = shape[-1]
    index = np.arange(np.prod(shape)).reshape(shape) // length * length
    seg = a.get("segment_ids")
    if seg is not None:
        new = np.concatenate(
            [np.ones(shape[:-1] + (1,), bool), seg[..., 1:] != seg[..., :-1]], -1
        )
        index = index + np.cumsum(new, -1) - 1
    index = index.reshape(-1)
    dens = np.zeros(index.size)
    counts = np.zeros(index.size)
    np.add.at(dens, index, np.abs(terms.weight.reshape(-1)))
    np.add.at(counts, index, terms.scored.reshape(-1).astype(float))
    norm = a.get("normalizer")
    nseg = abs(float(norm)) if norm is not None else float((counts > 0).sum())
    inv = lambda v: np.where(v > 0, 1.0 / np.where(v > 0, v, 1.0), 0.0)  # noqa: E731
    per = np.maximum(inv(dens[index]), inv(counts[index])) * (inv(np.array(nseg)))
    return per.reshape(shape)


# --- comparison -------------------------------------------------------------------


class Mismatch(AssertionError):
    pass


def assert_match(actual, expected, tol, what, skip=None, zero=None):
    """NaN and inf positions equal; finite values within ``tol``; entries in
    ``zero`` exactly 0; entries in ``skip`` not compared."""
    with np.errstate(invalid="ignore", over="ignore"):
        _assert_match(actual, expected, tol, what, skip, zero)


def _assert_match(actual, expected, tol, what, skip, zero):
    actual = np.asarray(np.asarray(actual).astype(np.float64))
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise Mismatch(f"{what}: shape {actual.shape}, expected {expected.shape}")
    tol = np.broadcast_to(np.asarray(tol, np.float64), expected.shape)
    check = np.ones(expected.shape, bool)
    if skip is not None:
        check = check & ~np.broadcast_to(skip, expected.shape)
    if zero is not None:
        zero = np.broadcast_to(zero, expected.shape)
        bad = zero & (actual != 0)
        if bad.any():
            raise Mismatch(
                f"{what}: must be exactly 0 (unscored rows) at "
                f"{np.argwhere(bad).tolist()}; got {actual[bad].tolist()}"
            )
        check = check & ~zero

    def fail(message, wrong):
        raise Mismatch(
            f"{what}: {message} at {np.argwhere(wrong).tolist()}: got "
            f"{actual[wrong].tolist()}, expected {expected[wrong].tolist()}"
            f"\n  actual:   {actual.tolist()}\n  expected: {expected.tolist()}"
        )

    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    wrong = check & (nan_a != nan_e)
    if wrong.any():
        fail("NaN positions differ", wrong)
    wrong = check & ~nan_e & (np.isinf(expected) | np.isinf(actual))
    wrong = wrong & (actual != expected)
    if wrong.any():
        fail("inf positions differ", wrong)
    fin = check & np.isfinite(expected)
    err = np.where(fin, np.abs(actual - expected), 0.0)
    wrong = fin & (err > tol)
    if wrong.any():
        ratio = np.where(wrong, err / np.maximum(tol, 1e-300), 0)
        i = np.unravel_index(np.argmax(ratio), err.shape)
        fail(
            f"{int(wrong.sum())} value(s) out of tolerance (worst at "
            f"{list(map(int, i))}: |error| {err[i]:.3g} > tol {tol[i]:.3g})",
            wrong,
        )


def _expected_in_dtype(want, dtype):
    """A result overflows where the float64 one exceeds its dtype's range
    (a float32 loss of 1e73 from a tiny temperature is inf)."""
    want = np.asarray(want, np.float64)
    if np.dtype(dtype) == F64:
        return want
    big = np.abs(want) >= 0.5 * float(jnp.finfo(dtype).max)
    with np.errstate(over="ignore"):
        cast = want.astype(dtype).astype(np.float64)
    return np.where(big, cast, want)


def compare(case: Case, out, grads, r: Reference):
    """Compares the package's output (and gradients) with the reference."""
    e = eps(case.dtype)
    reduction = _reduction_of(case)
    stats = [_stats(case, a) for a in r.arrays]
    weights = [_row_weights(case, t, a) for t, a in zip(r.terms, r.arrays, strict=True)]
    loss_out = out[0] if isinstance(out, tuple) else out
    loss_ref = r.output[0] if isinstance(r.output, tuple) else r.output
    loss_ref = _expected_in_dtype(loss_ref, np.asarray(loss_out).dtype)
    ref_slices = [loss_ref] if case.transform != "vmap" else list(loss_ref)

    tols = []
    for st_, terms, wts, value in zip(stats, r.terms, weights, ref_slices, strict=True):
        loss = terms.ce + terms.zl
        per = K * e * (st_.value + np.abs(np.where(np.isfinite(loss), loss, 0)))
        if reduction != "none":
            value = float(np.asarray(value))
            fin = abs(value) if np.isfinite(value) else 0.0
            per = np.sum(np.where(np.isfinite(per), per, 0) * wts) + K * e * fin
        tols.append(per)
    tol = tols[0] if case.transform != "vmap" else np.stack(tols)
    if _total_overflows(case, r, np.asarray(loss_out).dtype):
        # A mean whose float32 total overflows (a tiny temperature) is inf.
        loss_ref = np.where(np.isinf(loss_out), loss_out, loss_ref)
    assert_match(loss_out, loss_ref, tol, "loss")
    if not case.x64:
        want = F32 if case.dtype in (F16, BF16) else case.dtype
        if np.asarray(loss_out).dtype != want:
            raise Mismatch(f"loss dtype {np.asarray(loss_out).dtype}, expected {want}")
    if case.static.get("return_aux"):
        _compare_aux(case, out[1], r, stats)
    elif isinstance(out, tuple):  # return_lse: finite ones of scored rows only
        lse_ref = _expected_in_dtype(r.output[1], np.asarray(out[1]).dtype)
        lse_tol = np.stack([K * e * s_.lse for s_ in stats]).reshape(lse_ref.shape)
        scored = np.stack([t.scored for t in r.terms]).reshape(lse_ref.shape)
        skip = ~scored.astype(bool) | ~np.isfinite(lse_ref)
        assert_match(out[1], lse_ref, lse_tol, "lse", skip=skip)
    if grads:
        _compare_grads(case, grads, r, stats[0], weights[0])
        if rounded_once_applies(case):
            _check_rounded_once(grads["logits"], r.grads["logits"], case.dtype)


def _total_overflows(case: Case, r: Reference, dtype) -> bool:
    """Whether a reduced loss sums per-example values whose total exceeds
    ``dtype``'s range."""
    if _reduction_of(case) == "none" or np.dtype(dtype) == F64:
        return False
    total = sum(
        float(np.sum(np.abs(np.where(np.isfinite(v), v, 0))))
        for t in r.terms
        for v in (np.asarray(t.ce), np.asarray(t.zl))
    )
    return total > float(np.finfo(dtype).max)


def rounded_once_applies(case: Case) -> bool:
    """Whether the 16-bit logits' gradient must be correctly rounded (issue
    28, item 8): the core loss differentiated as it is (unit cotangent, no
    differentiated ``lse``), ordinary finite rows, a usual temperature."""
    return (
        case.kind in ("integer", "soft")
        and case.dtype in (F16, BF16)
        and "logits" in case.diff
        and case.notes.get("unit cotangent", False)
        and case.lse_cotangent is None
        and case.static.get("implementation") is None
        and case.notes.get("regime") == "unit"
        and set(case.notes.get("rows", ())) <= {"ordinary"}
        and case.static.get("temperature") in TEMPERATURES
    )


def _check_rounded_once(got, want, dtype):
    """Every element within half an ulp of the float64 gradient (and float32's
    own error near a tie, 2^-10 ulp)."""
    worst = float(np.max(ulps(got, want, dtype), initial=0))
    if worst > 0.5 + 2.0**-10:
        raise Mismatch(f"d/d logits is {worst:.3f} ulp from float64, not rounded once")


def _compare_aux(case: Case, aux, r: Reference, stats):
    """``return_aux`` against the reference, every row: ``scored`` exactly;
    ``lse`` and ``entropy`` within tolerance with NaN and +-inf positions
    exact, except that a row without a finite kept logit has ``lse`` 0 (not
    -inf); ``argmax`` a kept class holding the row's largest logit (within
    the logits' rounding; the first NaN of a NaN row); ``correct`` exactly
    ``scored & (argmax == target)``."""
    e = eps(case.dtype)
    ref_aux = r.output[1]
    shape = np.shape(ref_aux.lse)
    scored = np.stack([t.scored for t in r.terms]).reshape(shape).astype(bool)
    assert_match(aux.scored, scored, 0.0, "aux.scored")
    skipped = _skipped_rows(case, aux, scored)
    lse_tol = np.stack([K * e * s_.lse for s_ in stats]).reshape(shape)
    no_mass = np.isneginf(ref_aux.lse)
    lse_ref = _expected_in_dtype(ref_aux.lse, np.asarray(aux.lse).dtype)
    assert_match(aux.lse, lse_ref, lse_tol, "aux.lse", skip=no_mass | skipped)
    if np.any(no_mass & ~skipped & (np.asarray(aux.lse) != 0)):
        raise Mismatch(f"aux.lse: rows without mass must be 0, got {aux.lse}")
    ent_tol = np.stack([K * e * s_.spread for s_ in stats]).reshape(shape)
    assert_match(aux.entropy, ref_aux.entropy, ent_tol, "aux.entropy", skip=skipped)
    n = len(r.logits)
    argmax = np.where(skipped, ref_aux.argmax, aux.argmax).reshape(n, -1)
    for i, (z, keep, t) in enumerate(r.logits):
        z = z / (t or 1.0)
        keep = np.broadcast_to(keep, z.shape).reshape(-1, z.shape[-1])
        z = z.reshape(-1, z.shape[-1])
        tol = lse_tol.reshape(n, -1)[i]
        _check_argmax(
            argmax[i], z, keep, tol, np.asarray(ref_aux.argmax).reshape(n, -1)[i]
        )
    target = _aux_target(case, r).reshape(shape)
    want = scored & (np.asarray(aux.argmax) == target)
    assert_match(aux.correct, want, 0.0, "aux.correct")


def _skipped_rows(case: Case, aux, scored):
    """The rows ``skip_unscored`` leaves out (the unscored ones, with the
    default implementation): their ``lse``, entropy and argmax must be 0."""
    skip = case.static.get("skip_unscored") and case.static.get("implementation") in (
        None,
        "xla",
    )
    skipped = ~scored if skip else np.zeros_like(scored)
    for name in ("lse", "entropy", "argmax"):
        if np.any(np.asarray(getattr(aux, name))[skipped] != 0):
            raise Mismatch(f"aux.{name} of unscored rows skipped must be 0")
    return skipped


def _check_argmax(got, z, keep, tol, ref_argmax):
    for row, j in enumerate(got):
        zk = np.where(keep[row], z[row], -np.inf)
        nan = keep[row] & np.isnan(z[row])
        if nan.any():
            ok = j == ref_argmax[row]
        elif not np.isfinite(zk).any() and not np.isposinf(zk).any():
            continue  # no finite kept logit: any class
        else:
            top = np.max(zk)
            ok = 0 <= j < z.shape[1] and keep[row, j] and z[row, j] >= top - tol[row]
        if not ok:
            raise Mismatch(
                f"aux.argmax: row {row} got class {j}; logits {z[row].tolist()}, "
                f"kept {keep[row].tolist()}"
            )


def _aux_target(case: Case, r: Reference):
    """The class ``correct`` compares with: the target label, or the soft
    target's mode."""
    if case.kind != "soft":
        values, _ = _targets(case)
        c = _num_classes(case)
        t = np.array([int(v) if 0 <= int(v) < c else -1 for v in values.reshape(-1)])
        return np.stack([t.reshape(values.shape)] * len(r.arrays))
    axes = canonical_axes(case.static["axis"], r.arrays[0]["labels"].ndim)
    return np.stack([classes_last(a["labels"], axes).argmax(-1) for a in r.arrays])


def _compare_grads(case: Case, grads, r: Reference, st_: RowStats, wts):
    with np.errstate(invalid="ignore", over="ignore"):
        _compare_grads_impl(case, grads, r, st_, wts)


def _compare_grads_impl(case: Case, grads, r: Reference, st_: RowStats, wts):
    e = eps(case.dtype)
    terms, a = r.terms[0], r.arrays[0]
    reduction = _reduction_of(case)
    # d(x / T) / dx = 1 / T scales every gradient and its error.
    chain = 1.0 / min(case.static.get("temperature") or 1.0, 1.0)
    ct_rows = np.broadcast_to(np.abs(case.cotangent), np.shape(terms.ce)) * wts * chain
    loss = terms.ce + terms.zl
    scored = np.asarray(terms.scored, bool)
    bad = np.isnan(terms.ce) & ~scored
    finite = np.isfinite(loss)
    unscored = ~scored
    if case.lse_cotangent is not None:
        ct_rows = ct_rows + np.abs(case.lse_cotangent) * chain
        lse = r.output[1].lse if case.static.get("return_aux") else r.output[1]
        finite = finite & np.isfinite(np.asarray(lse))
    if case.entropy_cotangent is not None:
        ent = np.asarray(r.output[1].entropy)
        ct_rows = ct_rows + np.abs(case.entropy_cotangent) * chain * st_.spread
        finite = finite & np.isfinite(ent)
    if case.kind == "bce":
        unscored = np.zeros(np.shape(loss), bool)
    # Gradients shared by all rows (class weights, w, bias, BCE weights, alpha,
    # normalizer) are specified when every scored row is finite (and, for a
    # mean, when no out-of-range label makes the numerator NaN).
    shared_ok = bool(np.all(finite | ~scored))
    if reduction in ("mean", "mean_per_segment") and bad.any():
        shared_ok = False
    if case.kind == "linear":  # x of unscored rows must not matter (class 6)
        shared_ok = shared_ok and bool(np.all(np.isfinite(a["x"][scored])))
        if "bias" in a:
            real = a["bias"][: _num_classes(case)]
            shared_ok = shared_ok and bool(np.all(np.isfinite(real)))
    total = float(np.sum(np.where(finite, np.abs(loss), 0)))
    wmax = float(np.max(wts, initial=0))
    shared = (
        K
        * e
        * (
            np.sum(ct_rows * (st_.unshifted * (1 + st_.tmass) + st_.value))
            + total * (wmax + wmax**2) * max(1, np.size(loss))
        )
    )
    for name in case.diff:
        got, want = grads[name], r.grads[name]
        if name == "normalizer":
            if not shared_ok:
                continue
            norm = a["normalizer"]
            pairs = (
                zip(got, want, norm, strict=True)
                if isinstance(want, tuple)
                else [(got, want, norm)]
            )
            for k, (g_k, w_k, n_k) in enumerate(pairs):
                if _total_overflows(case, r, np.asarray(g_k).dtype):
                    # the loss is then inf (documented), and -g loss / n too
                    same = np.sign(np.asarray(g_k)) == np.sign(w_k)
                    w_k = np.where(np.isinf(g_k) & same, g_k, w_k)
                tol = shared / (abs(float(n_k)) or 1.0)
                assert_match(g_k, w_k, tol, f"d/d normalizer[{k}]")
            continue
        dtype = np.asarray(case.arrays[name]).dtype
        if np.asarray(got).dtype != dtype:
            raise Mismatch(f"d/d {name} has dtype {np.asarray(got).dtype}, not {dtype}")
        want = _expected_in_dtype(want, dtype)
        rnd = ulp(dtype) * np.abs(want)
        if dtype in (F16, BF16):
            rnd = rnd + 4 * float(jnp.finfo(dtype).smallest_subnormal)
        if case.kind == "bce" and name in ("logits", "labels"):
            ct = np.broadcast_to(np.abs(case.cotangent), np.shape(loss)) * wts
            per = st_.grad if name == "logits" else st_.unshifted
            skip = ~np.isfinite(loss) | ~np.isfinite(a["logits"])
            assert_match(got, want, K * e * ct * per + rnd, f"d/d {name}", skip=skip)
        elif name in ("logits", "labels", "x"):
            _per_row_grad(
                case, name, got, want, st_, ct_rows, scored & ~finite, unscored, a, rnd
            )
        elif shared_ok:
            tol = shared
            if case.kind == "linear" and name in ("w", "bias"):
                xs = 1.0 + np.abs(a["x"][scored]).max(initial=0)
                per = K * e * st_.grad + _dz_rounding(case, st_)
                tol = tol + np.sum(ct_rows * per) * xs * 4
            assert_match(got, want, tol + rnd, f"d/d {name}")


def _dz_rounding(case: Case, st_: RowStats) -> np.ndarray:
    """Per unit cotangent, the absolute error of the fused loss's logits'
    gradient rounded to 16-bit products' inputs (docs/semantics.md: one
    rounding of dz, u = eps / 2): u times a bound on its size, the
    targets' mass and the z-loss's 2 z lse. Where a dx or dw element is a
    cancelling sum of such terms, this is its whole error (a bfloat16 dx of
    -0.0019 for -0.00029: its dz entries -0.159 and 0.159 at w = -2)."""
    if np.dtype(case.dtype) not in (F16, BF16):
        return np.zeros_like(st_.tmass)
    u = float(jnp.finfo(case.dtype).eps) / 2
    return u * (st_.tmass + 2 * case.static.get("z_loss", 0.0) * st_.lse)


def _per_row_grad(case, name, got, want, st_, ct_rows, skip_rows, zero_rows, a, rnd):
    """Gradients of per-example inputs, row by row: unscored rows exactly 0,
    scored rows with a non-finite loss not compared."""
    e = eps(case.dtype)
    if case.kind == "linear":
        # dx = dz @ w.T: the logits' gradient error times the row sums of |w|,
        # and the rounding of dz to a 16-bit product's inputs.
        wsum = np.abs(w_dv(case, a["w"])).sum(axis=1).max(initial=0) + 1.0
        per = K * e * st_.grad + _dz_rounding(case, st_)
        tol = (ct_rows * per * wsum)[..., None]
        assert_match(
            got,
            want,
            tol + rnd,
            f"d/d {name}",
            skip=skip_rows[..., None],
            zero=zero_rows[..., None],
        )
        return
    shape = a["logits"].shape
    axes = canonical_axes(case.static["axis"], len(shape))
    c = int(np.prod([shape[i] for i in axes]))

    def full(m):
        m = np.broadcast_to(np.asarray(m)[..., None], np.shape(m) + (c,))
        return from_classes_last(np.ascontiguousarray(m), shape, axes)

    per = st_.grad if name == "logits" else st_.unshifted * st_.tmass
    tol = full(K * e * ct_rows * per)
    skip = full(skip_rows)
    if name == "labels":  # not at a kept non-finite logit (+-inf there)
        keep = from_classes_last(
            np.ascontiguousarray(_keep_classes_last(a, a["logits"], axes)), shape, axes
        )
        skip = skip | (keep & ~np.isfinite(a["logits"]))
    assert_match(got, want, tol + rnd, f"d/d {name}", skip=skip, zero=full(zero_rows))


# --- entry points ------------------------------------------------------------------


def draw_case(draw, kind):
    if kind in ("integer", "soft", "focal"):
        return draw_softmax_case(draw, kind)
    if kind == "linear":
        return draw_linear_case(draw)
    if kind == "bce":
        return draw_bce_case(draw)
    raise AssertionError(kind)


def check_case(case: Case):
    """Runs one case on the package and the reference and compares them;
    raises :class:`Mismatch` (or the package's own exception)."""
    err = expected_errors(case)
    with x64_context(case.x64):
        if err is not None:
            exc, words = err
            try:
                run_package(case)
            except exc as e:
                if not any(w in str(e).lower() for w in words):
                    raise Mismatch(
                        f"the {exc.__name__} should name {words}: {e}"
                    ) from e
                return
            raise Mismatch(f"expected a {exc.__name__} naming {words}; none raised")
        out, grads = run_package(case)
        out = jax.tree.map(np.asarray, out)
        grads = jax.tree.map(np.asarray, grads)
    if fused_logits_overflow(case):
        return  # ran (no crash, no wrong error); not compared
    compare(case, out, grads, run_reference(case))


def fused_logits_overflow(case: Case) -> bool:
    """Whether a fused-loss case at ``T < 1`` has a logit ``(x w + b) / T``
    beyond its compute dtype's range. The fused loss divides before it shifts
    (``docs/semantics.md``), so such a logit is infinite there (NaN at a row's
    maximum), where the float64 reference shifts first: a documented limit,
    not compared."""
    t = case.static.get("temperature")
    if case.kind != "linear" or t is None or t >= 1:
        return False
    x = np.asarray(case.arrays["x"], F64)
    z = x @ np.asarray(w_dv(case, case.arrays["w"]), F64)
    if case.arrays.get("bias") is not None:
        z = z + np.asarray(case.arrays["bias"], F64)
    with np.errstate(all="ignore"):
        big = np.abs(z) / t > float(np.finfo(compute_dtype(case.dtype)).max)
    return bool(np.any(big & np.isfinite(z)))


# --- optax's other losses -----------------------------------------------------------

EXTRAS = (
    "poly_loss_cross_entropy",
    "safe_softmax_cross_entropy",
    "sigmoid_focal_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "smooth_labels",
)


# Float labels whose gradient is finite at hard 0/1 labels, differentiated
# too (issue 28, item 4: the focal loss's was NaN there). The KL divergence's
# d/dy = log y + 1 - x is -inf at y = 0, and the safe cross-entropy's
# -log_softmax(x) is +inf on its -inf logits: not drawn.
LABELS_DIFFERENTIATED = ("sigmoid_focal_loss", "poly_loss_cross_entropy")


def draw_extras_case(draw, name):
    """A light case for one of optax's other losses: finite inputs (and -inf
    logits where the targets are 0 for the safe cross-entropy)."""
    x64 = draw(st.booleans(), label="x64")
    dtype = draw(st.sampled_from(FLOATS_32 + ((F64,) if x64 else ())), label="dtype")
    shape, axis = draw(
        st.sampled_from([((4, 5), -1), ((0, 5), -1), ((2, 4, 3), 1)]), label="shape"
    )
    if name not in ("poly_loss_cross_entropy",):
        axis = -1
    seed = draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2
    y = rng.random(shape) * (rng.random(shape) < 0.6)
    y = y / np.maximum(y.sum(axis=axis, keepdims=True), 1e-3)
    static: dict[str, Any] = {"axis": axis}
    arrays: dict[str, Any] = {}
    if name == "safe_softmax_cross_entropy":
        x = np.where((y == 0) & (rng.random(shape) < 0.5), -np.inf, x)
    if name in ("kl_divergence", "kl_divergence_with_log_targets"):
        x = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))  # log-probabilities
    if name == "kl_divergence_with_log_targets":
        y = rng.standard_normal(shape)
        y = y - np.log(np.exp(y).sum(axis=-1, keepdims=True))
    if name == "sigmoid_focal_loss":
        y = np.where(rng.random(shape) < 0.5, np.round(y), y)
        static["gamma"] = draw(st.sampled_from([2.0, 0.0]), label="gamma")
        static["alpha"] = draw(st.sampled_from([None, 0.25]), label="alpha")
    if name == "poly_loss_cross_entropy":
        static["epsilon"] = draw(st.sampled_from([2.0, 0.0]), label="epsilon")
        where = draw(st.sampled_from([None, "example", "class"]), label="where")
        axes = canonical_axes(axis, len(shape))
        batch = tuple(shape[i] for i in range(len(shape)) if i not in axes)
        if where == "example":
            arrays["where"] = rng.random(batch) < 0.7
        elif where == "class":
            keep = rng.random(shape) < 0.7
            arrays["where"] = keep | (y > 0)
    if name == "smooth_labels":
        static["alpha"] = draw(st.sampled_from([0.1, 0.0]), label="alpha")
    arrays = {"logits": x.astype(dtype), "labels": y.astype(dtype), **arrays}
    forms = {"logits": draw(st.sampled_from(["np", "jnp"]), label="logits form")}
    transform = draw(st.sampled_from(["eager", "jit", "grad", "jit_grad"]))
    case = Case(name, transform, x64, dtype, arrays, forms, static)
    case.notes.update(seed=seed)
    if transform in ("grad", "jit_grad"):
        case.diff = ("logits",)
        if name in LABELS_DIFFERENTIATED:
            case.diff = ("logits", "labels")
        axes = canonical_axes(axis, len(shape))
        out_shape = tuple(shape[i] for i in range(len(shape)) if i not in axes)
        if name in ("smooth_labels", "sigmoid_focal_loss"):  # elementwise
            out_shape = shape
        if name == "smooth_labels":
            case.diff = ("labels",)
        case.cotangent = _cotangent(rng, out_shape)
    return case


def _extras_pkg(case: Case, a):
    s = case.static
    x, y = a["logits"], a["labels"]
    if case.kind == "poly_loss_cross_entropy":
        return xj.poly_loss_cross_entropy(
            x, y, epsilon=s["epsilon"], axis=s["axis"], where=a.get("where")
        )
    if case.kind == "safe_softmax_cross_entropy":
        return xj.safe_softmax_cross_entropy(x, y)
    if case.kind == "sigmoid_focal_loss":
        return xj.sigmoid_focal_loss(x, y, alpha=s["alpha"], gamma=s["gamma"])
    if case.kind == "kl_divergence":
        return xj.kl_divergence(x, y)
    if case.kind == "kl_divergence_with_log_targets":
        return xj.kl_divergence_with_log_targets(x, y)
    if case.kind == "smooth_labels":
        return xj.smooth_labels(y, s["alpha"])
    raise AssertionError(case.kind)


def _extras_ref(case: Case, a):
    s = case.static
    x, y = a["logits"], a["labels"]
    if case.kind == "poly_loss_cross_entropy":
        return ref.poly_loss(x, y, s["epsilon"], axis=s["axis"], where=a.get("where"))
    if case.kind == "safe_softmax_cross_entropy":
        return ref.soft_xent(x, y)
    if case.kind == "sigmoid_focal_loss":
        return ref.sigmoid_focal(x, y, alpha=s["alpha"], gamma=s["gamma"])
    if case.kind == "kl_divergence":
        return ref.kl_divergence(x, y)
    if case.kind == "kl_divergence_with_log_targets":
        return ref.kl_divergence_with_log_targets(x, y)
    if case.kind == "smooth_labels":
        return ref.smooth_labels(y, s["alpha"])
    raise AssertionError(case.kind)


def check_extras_case(case: Case):
    """Value (and gradient w.r.t. the logits) against the reference, with a
    tolerance of the input dtype's precision (these follow optax's dtypes)."""
    ct = case.cotangent
    with x64_context(case.x64):
        args = {k: _form(v, case.forms.get(k, "np")) for k, v in case.arrays.items()}

        def g(d):
            out = _extras_pkg(case, {**args, **d})
            return jnp.sum(jnp.asarray(ct, out.dtype) * out), out

        if case.transform == "eager":
            out, grads = _extras_pkg(case, args), {}
        elif case.transform == "jit":
            out, grads = jax.jit(lambda d: _extras_pkg(case, d))(args), {}
        else:
            vg = jax.value_and_grad(g, has_aux=True)
            if case.transform == "jit_grad":
                vg = jax.jit(vg)
            (_, out), grads = vg({name: args[name] for name in case.diff})
        out = np.asarray(out)
        grads = jax.tree.map(np.asarray, grads)
    with float64():
        a = _f64_arrays(case.arrays)
        want = np.asarray(jax.jit(lambda a: _extras_ref(case, a))(a))
        want_grads = {}
        if grads:

            def gr(d):
                out = _extras_ref(case, {**a, **d})
                return jnp.sum(jnp.asarray(ct, out.dtype) * out)

            want_grads = jax.jit(jax.grad(gr))({name: a[name] for name in case.diff})
            want_grads = jax.tree.map(np.asarray, want_grads)
    e = max(float(jnp.finfo(case.dtype).eps), eps(case.dtype))
    x = np.asarray(a["logits"])
    scale = 1.0 + np.abs(np.where(np.isfinite(x), x, 0)).max(initial=0)
    c = x.shape[-1] if x.ndim else 1
    assert_match(out, want, K * e * scale * c * (1 + np.abs(want)), "value")
    for name in grads:
        g_want = _expected_in_dtype(want_grads[name], case.dtype)
        tol = K * e * scale * c * (1 + np.abs(g_want)) * np.max(np.abs(ct), initial=1)
        assert_match(grads[name], g_want, tol, f"d/d {name}")
