"""The ops x implementations that the concern tests iterate over.

Every entry (:class:`Op`) is one public loss with one ``implementation=``:
``integer`` (``softmax_cross_entropy_with_integer_labels``), ``soft``
(``softmax_cross_entropy``), ``linear`` (``linear_cross_entropy``) and ``bce``
(``sigmoid_binary_cross_entropy``), each with every implementation the package
registers (``_registry.names``): a new implementation is picked up here and
gets every check of its op. An entry knows

* how to call it with its own arguments (:meth:`Op.raw`, by name) and on
  logits-like inputs (:meth:`Op.__call__`): the fused loss gets ``x = logits``
  and ``w = I`` (``D = C``), so ``x @ w`` is the logits exactly (a 0/1 matmul
  accumulated in float32 is exact also for 16-bit inputs) and the gradient
  with respect to ``x`` is the one with respect to the logits; a class that
  is ``-inf`` in every row goes to the bias instead (``-inf * 0`` is NaN);
* its independent reference (``tests/reference.py``, with the same
  arguments; the fused loss's is ``linear_xent_terms``, which materialises
  ``x @ w + b``), reductions included;
* what it supports, as capability flags (:data:`CAPABILITIES`): a check that
  only makes sense for some ops selects them with :func:`parametrize`, so
  that a flag, not a skip, decides who gets it.

Test ids are ``"<op>-<implementation>"`` (``"linear-pallas_tpu"``). The Pallas
implementations run in Pallas's interpreter on CPU, slowly: :func:`select`
leaves them out unless a check asks for them (``pallas=True``); the same for
the fused loss's reference (``composite=True``), which is the integer op's
reference formula on materialised logits.

Compiling dominates the cost of these small tests, so :func:`value_and_vjp`
compiles an op's loss and VJP once per static options and shapes (the array
options are arguments) and shares it between tests; the reference is shared
by the implementations of an op.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from tiers import SLOW

import xent_jax as xj
from xent_jax import _registry

IGNORE = -100

# What a capability flag means (every flag an Op may carry):
CAPABILITIES = {
    # The loss of an example is a softmax over a class axis: invariant to a
    # common offset and to a permutation of the classes (labels permuted).
    "softmax": "one loss per example over the class axis",
    "elementwise": "one loss per logit (sigmoid BCE)",
    "integer_labels": "class ids: out-of-range checks, checkify",
    "soft_labels": "a distribution over the classes as labels",
    "label_grad": "the labels are floating and differentiable",
    "axis": "the class axis is an argument (axis=)",
    "row_neg_inf": "any logit may be -inf (the fused loss: whole classes only)",
    "float64": "computes in float64",
    "forward_mode": "jax.jvp works (no custom_vjp)",
    "second_order": "differentiable twice in reverse mode (grad of grad)",
    "pallas": "a Pallas kernel, interpreted on CPU (slow)",
    # The fused loss's "reference" materialises x @ w + b and runs the softmax
    # reference, the integer op's: what its numbers and transformations would
    # check is checked there (test_linear.py checks it against the kernels).
    "composite": "another entry's formula on materialised logits",
    # Keyword options (capabilities too: Op.options keeps those an op takes).
    "ignore_index": "ignore_index=",
    "where": "where= (per class or per example)",
    "class_weights": "class_weights= (differentiable)",
    "label_smoothing": "label_smoothing=",
    "z_loss": "z_loss=",
    "pos_weight": "pos_weight= (differentiable)",
    "weights": "weights= (elementwise, differentiable)",
}

SOFTMAX_REDUCTIONS = ("none", "sum", "mean", "mean_per_segment")
REDUCTIONS = ("none", "sum", "mean")

_SOFTMAX_OPTIONS = ("label_smoothing", "class_weights", "z_loss")
_KINDS: dict[str, dict[str, Any]] = {
    "integer": dict(
        registry="softmax",
        fn=xj.softmax_cross_entropy_with_integer_labels,
        positional=("logits", "labels"),
        diff=("logits", "class_weights"),
        caps=(
            "softmax",
            "integer_labels",
            "axis",
            "row_neg_inf",
            "ignore_index",
            "where",
        )
        + _SOFTMAX_OPTIONS,
    ),
    "soft": dict(
        registry="softmax",
        fn=xj.softmax_cross_entropy,
        positional=("logits", "labels"),
        diff=("logits", "labels", "class_weights"),
        caps=("softmax", "soft_labels", "label_grad", "axis", "row_neg_inf", "where")
        + _SOFTMAX_OPTIONS,
    ),
    "linear": dict(
        registry="linear",
        fn=xj.linear_cross_entropy,
        positional=("x", "w", "labels"),
        diff=("x", "w", "bias", "class_weights"),
        caps=("softmax", "integer_labels", "ignore_index") + _SOFTMAX_OPTIONS,
    ),
    "bce": dict(
        registry="sigmoid",
        fn=xj.sigmoid_binary_cross_entropy,
        positional=("logits", "labels"),
        diff=("logits", "labels", "pos_weight", "weights"),
        caps=(
            "elementwise",
            "label_grad",
            "row_neg_inf",
            "label_smoothing",
            "pos_weight",
            "weights",
        ),
    ),
}

# The capabilities each implementation adds to its op's. Every registered
# implementation must be listed (test_contracts checks it).
_IMPLS: dict[str, tuple[str, ...]] = {
    "xla": ("float64", "second_order"),
    "reference": ("float64", "forward_mode", "second_order"),
    # Pallas kernels take float32 and 16-bit x and w only, and pallas_call has
    # no JVP rule (grad of grad raises).
    "pallas_tpu": ("pallas",),
    "pallas_triton": ("pallas",),
}
_COMPOSITE = {("linear", "reference")}


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # "integer", "soft", "linear" or "bce"
    impl: str | None  # the implementation= passed (None: the default)
    caps: frozenset[str]

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.impl}"

    def __repr__(self) -> str:
        return self.id

    def has(self, *caps: str) -> bool:
        unknown = set(caps) - set(CAPABILITIES)
        assert not unknown, unknown
        return set(caps) <= self.caps

    @property
    def fn(self) -> Callable[..., Any]:
        return _KINDS[self.kind]["fn"]

    @property
    def positional(self) -> tuple[str, ...]:
        return _KINDS[self.kind]["positional"]

    @property
    def diff(self) -> tuple[str, ...]:
        """The differentiable arguments :meth:`example` returns."""
        return _KINDS[self.kind]["diff"]

    @property
    def logits_arg(self) -> str:
        """The argument :meth:`inputs` puts the logits in (``x`` for the fused
        loss, whose ``w`` is then the identity)."""
        return "x" if self.kind == "linear" else "logits"

    @property
    def reductions(self) -> tuple[str, ...]:
        return SOFTMAX_REDUCTIONS if self.has("softmax") else REDUCTIONS

    def options(self, **candidates: Any) -> dict[str, Any]:
        """The candidate keyword options this op takes (others dropped)."""
        return {k: v for k, v in candidates.items() if self.has(k)}

    def every_option(self, c: int) -> dict[str, Any]:
        """Every option this op takes, for ``c`` classes (labels need not use
        ``ignore_index``). Checks that use it with the same shapes share one
        compiled program per op (:func:`value_and_vjp`)."""
        return self.options(
            label_smoothing=0.1,
            z_loss=0.01,
            class_weights=jnp.linspace(0.5, 2.0, c),
            ignore_index=IGNORE,
            pos_weight=2.0,
        )

    def default(self) -> Op:
        """The same op with ``implementation=None`` (the default)."""
        return dataclasses.replace(self, impl=None)

    # --- calls with the op's own arguments ------------------------------------

    def raw(self, args: dict[str, Any], *, reduction: str = "none", **kw: Any):
        """The loss on ``args`` (arrays by argument name) and options ``kw``."""
        args = {k: v for k, v in args.items() if v is not None}
        pos = [args.pop(name) for name in self.positional]
        return self.fn(
            *pos, **args, reduction=reduction, implementation=self.impl, **kw
        )

    def raw_ref(self, args: dict[str, Any], *, reduction: str = "none", **kw: Any):
        """The independent reference of :meth:`raw` (``tests/reference.py``)."""
        args = {k: v for k, v in args.items() if v is not None}
        normalizer = kw.pop("normalizer", None)
        if self.kind == "bce":
            loss = ref.bce(args.pop("logits"), args.pop("labels"), **args, **kw)
            return ref.reduce(loss, reduction, normalizer=normalizer)
        if self.kind == "linear":
            x, w, y = (args.pop(n) for n in ("x", "w", "labels"))
            terms = ref.linear_xent_terms(x, w, y, **args, **kw)
        elif self.kind == "integer":
            terms = ref.integer_xent_terms(
                args.pop("logits"), args.pop("labels"), **args, **kw
            )
        else:
            terms = ref.soft_xent_terms(
                args.pop("logits"), args.pop("labels"), **args, **kw
            )
        return ref.reduce_terms(terms, reduction, normalizer)

    # --- calls on logits ------------------------------------------------------

    def inputs(self, logits, labels) -> dict[str, Any]:
        """The op's arguments whose loss is that of ``logits`` (classes last)."""
        if self.kind != "linear":
            return dict(logits=logits, labels=labels)
        return dict(zip(("x", "w", "bias"), linear_inputs(logits), strict=True)) | dict(
            labels=labels
        )

    def __call__(self, logits, labels, **kw: Any):
        """The loss of ``logits`` ``[..., C]`` (options ``kw``)."""
        return self.raw(self.inputs(logits, labels), **kw)

    def ref(self, logits, labels, **kw: Any):
        """The reference loss of ``logits`` (options ``kw``)."""
        return self.raw_ref(self.inputs(logits, labels), **kw)

    # --- data -------------------------------------------------------------------

    def labels(
        self,
        batch: tuple[int, ...],
        c: int,
        seed: int = 1,
        dtype=jnp.float32,
        normalised: bool = True,
    ):
        """Typical labels: class ids, a distribution (``normalised``; else
        weights in [0, 1]), or BCE targets in [0, 1]."""
        rng = np.random.default_rng(seed)
        if self.has("integer_labels"):
            return jnp.asarray(rng.integers(0, c, size=batch), jnp.int32)
        u = rng.uniform(0.0, 1.0, size=batch + (c,))
        if self.has("soft_labels") and normalised:
            u = u / u.sum(-1, keepdims=True)
        return jnp.asarray(u, dtype)

    def hard(self, y, c: int):
        """Class ids ``y`` as this op's labels (one-hot for float labels)."""
        return y if self.has("integer_labels") else jax.nn.one_hot(y, c)

    def probs(self, logits):
        """Labels that are a differentiable function of ``logits``."""
        assert self.has("label_grad")
        if self.has("soft_labels"):
            return jax.nn.softmax(logits, axis=-1)
        return jax.nn.sigmoid(logits)

    def out_shape(self, logits_shape: tuple[int, ...], reduction: str = "none"):
        if reduction != "none":
            return ()
        return logits_shape if self.has("elementwise") else logits_shape[:-1]

    def random_inputs(self, n: int, c: int, dtype=jnp.float32, seed=0, d: int = 3):
        """Random logits ``[n, c]`` (the fused loss: ``x [n, d]``, ``w [d,
        c]`` and a bias), by argument name."""
        rng = np.random.default_rng(seed)

        def normal(*shape, scale=1.0):
            return jnp.asarray(rng.normal(size=shape) * scale, dtype)

        if self.kind == "linear":
            return dict(x=normal(n, d), w=normal(d, c, scale=0.7), bias=normal(c))
        return dict(logits=normal(n, c, scale=2.0))

    def example(self, n: int, c: int, dtype=jnp.float32, seed: int = 0, d: int = 3):
        """``(args, fixed)``: the differentiable arguments (:attr:`diff`, by
        name) and the others, random, of shape ``[n, c]`` (the fused loss:
        ``x [n, d]``, ``w [d, c]``). Integer labels have ``IGNORE`` at row 2
        where the op takes ``ignore_index``."""
        rng = np.random.default_rng(seed + 10)

        def uniform(*shape, low=0.3, high=2.0):
            return jnp.asarray(rng.uniform(low, high, size=shape), dtype)

        args = self.random_inputs(n, c, dtype, seed, d)
        if self.has("class_weights"):
            args["class_weights"] = uniform(c)
        if self.has("pos_weight"):
            args.update(pos_weight=uniform(c, low=0.5, high=3.0), weights=uniform(n, 1))
        labels = self.labels((n,), c, seed + 1, dtype, normalised=False)
        if self.has("ignore_index"):
            labels = labels.at[min(2, n - 1)].set(IGNORE)
        if self.has("label_grad"):
            args["labels"] = labels
            return args, {}
        return args, dict(labels=labels)


def linear_inputs(logits):
    """``(x, w, bias)`` with ``x @ w + bias == logits`` exactly: ``w = I``;
    a class that is ``-inf`` in every row is 0 in ``x`` and ``-inf`` in the
    bias (other ``-inf`` logits cannot be written so: ``-inf * 0`` is NaN)."""
    logits = jnp.asarray(logits)
    c = logits.shape[-1]
    masked = jnp.all(jnp.isneginf(logits.reshape(-1, c)), axis=0)
    x = jnp.where(masked, jnp.zeros((), logits.dtype), logits)
    bias = jnp.where(masked, -jnp.inf, 0.0).astype(logits.dtype)
    return x, jnp.eye(c, dtype=logits.dtype), bias


def _build() -> tuple[Op, ...]:
    out = []
    for kind, spec in _KINDS.items():
        for impl in _registry.names(spec["registry"]):
            caps = set(spec["caps"]) | set(_IMPLS.get(impl, _IMPLS["xla"]))
            if (kind, impl) in _COMPOSITE:
                caps.add("composite")
            out.append(Op(kind, impl, frozenset(caps)))
    return tuple(out)


OPS: tuple[Op, ...] = _build()


def get(kind: str, impl: str | None) -> Op:
    """The entry of ``kind`` with implementation ``impl``."""
    (op,) = [o for o in OPS if o.kind == kind and o.impl == impl]
    return op


def counterpart(op: Op, kind: str) -> Op:
    """``kind``'s entry with ``op``'s implementation (else its reference)."""
    same = [o for o in OPS if o.kind == kind and o.impl == op.impl]
    return same[0] if same else get(kind, "reference")


def select(
    *caps: str,
    pallas: bool = False,
    composite: bool = False,
    exclude: tuple[str, ...] = (),
):
    """The entries with every capability in ``caps`` and none in ``exclude``;
    the Pallas ones only with ``pallas=True``, the composite one (the fused
    loss's reference) only with ``composite=True``."""
    for c in caps + exclude:
        assert c in CAPABILITIES, c
    return [
        op
        for op in OPS
        if op.has(*caps)
        and not any(op.has(c) for c in exclude)
        and (pallas or not op.has("pallas"))
        and (composite or not op.has("composite"))
    ]


def parametrize(*caps: str, fast: tuple[str, ...] | None = None, **kw: Any):
    """``@pytest.mark.parametrize("op", ...)`` over :func:`select`, with the
    entries' ids; with ``fast`` (op ids), the other entries are marked slow
    (``tests/tiers.py``)."""
    ops = select(*caps, **kw)
    if fast is not None:
        unknown = set(fast) - {op.id for op in ops}
        assert not unknown, unknown
    return pytest.mark.parametrize(
        "op",
        [
            pytest.param(
                op, id=op.id, marks=() if fast is None or op.id in fast else SLOW
            )
            for op in ops
        ],
    )


# --- compiled once: values and VJPs -------------------------------------------


def _static(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _value_and_vjp(op: Op, ref: bool, wrt_labels: bool, static: tuple, arrays, ct):
    kw = dict(static) | {
        k: v for k, v in arrays.items() if k not in ("logits", "labels")
    }
    fn = op.ref if ref else op
    primals = [arrays["logits"]] + ([arrays["labels"]] if wrt_labels else [])

    def f(v, *labels):
        return fn(v, labels[0] if labels else arrays["labels"], **kw)

    out, vjp = jax.vjp(f, *primals)
    c = jnp.ones_like(out) if out.ndim == 0 else ct.astype(out.dtype)
    grads = vjp(c)
    return out, (grads if wrt_labels else grads[0])


def value_and_vjp(
    op: Op, logits, labels, ct=None, *, ref: bool = False, wrt_labels=False, **kw
):
    """``(loss, d loss / d logits . ct)`` of ``op`` (its reference with
    ``ref``) at options ``kw``; a scalar loss (a reduction) gets its gradient.
    ``wrt_labels``: the VJP is the pair (logits, labels).

    Compiled once per op, static options and shapes, and shared by every test
    (the reference once per kind): the arrays, array options included, are
    arguments, not constants.
    """
    static = tuple(sorted((k, v) for k, v in kw.items() if _static(v)))
    arrays = {k: v for k, v in kw.items() if not _static(v)}
    arrays.update(logits=logits, labels=labels)
    if ref:  # the reference does not depend on the implementation
        op = get(op.kind, "reference")
    if ct is None:
        ct = jnp.zeros(())
    return _value_and_vjp(op, ref, bool(wrt_labels), static, arrays, ct)


@functools.cache
def jitted_ref(kind: str) -> Callable[..., Any]:
    """``kind``'s :meth:`Op.raw_ref`, jitted (one per kind)."""
    return jax.jit(get(kind, "reference").raw_ref, static_argnames="reduction")
