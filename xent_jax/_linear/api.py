r"""Fused linear + softmax cross-entropy: validation and dispatch.

For hidden states ``x`` ``[N, D]``, a classifier ``w`` ``[D, V]`` (or
``[V, D]``) and an optional bias ``b``, the logits are ``z = cap((x @ w + b) /
T)`` and the loss per example is exactly that of
:func:`xent_jax.softmax_cross_entropy_with_integer_labels` on ``z``. The
implementations (``xla``: the blockwise streaming kernel; ``reference``: the
logits materialised) return per-example statistics; this module adds the
z-loss and reduces, as the core losses do.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from xent_jax import (
    _checks,
    _compat,
    _labels,
    _numerics,
    _options,
    _registry,
    _segments,
    _sharding,
    _stats,
)
from xent_jax._aux import Aux, make_aux
from xent_jax._classes import ClassAxis
from xent_jax._labels import Labels
from xent_jax._linear import explicit, layout
from xent_jax._linear import forward as fwd
from xent_jax._linear import pallas_tpu as _pallas_tpu  # noqa: F401 (registers)
from xent_jax._linear import pallas_triton as _pallas_triton  # noqa: F401
from xent_jax._linear import reference as _reference  # noqa: F401 (registers)
from xent_jax._linear import xla as _xla  # noqa: F401 (registers)
from xent_jax._options import SoftmaxReduction
from xent_jax._reduction import reduce_softmax

Implementation = Literal["xla", "blockwise", "reference"]
ArrayLike = jax.typing.ArrayLike


def _per_example(
    x, w, bias, labels, class_weights, opts, *, impl, block_size, rows, skip_unscored
):
    """Per-example kernel outputs with ``x``'s leading shape (``w`` is ``[V,
    D]`` when ``rows``); the layout is chosen from this device's shapes."""
    d, v_local = w.shape[::-1] if rows else w.shape
    x2 = x.reshape(-1, d)
    flat = Labels(*(f.reshape(-1) for f in labels))
    padded = opts.num_classes < v_local * ClassAxis(opts.axis_name).num_shards()
    lay = layout.choose(
        block_size, x2.shape[0], v_local, d, rows, padded, skip_unscored
    )
    out = impl(x2, w, bias, flat, class_weights, opts, lay)
    return jax.tree.map(lambda a: a.reshape(x.shape[:-1]), out)


def _per_class(value, name: str, v_local: int):
    value = _checks.optional_array(value, name)
    if value is not None:
        _checks.check_floating(value, name)
        _checks.check_shape(value, (v_local,), name, " (one entry per class)")
    return value


def _classifier(w, w_layout, implementation: str):
    """``(w, rows)``: ``w`` as the kernel takes it, ``[V, D]`` when ``rows``."""
    _options.choice(w_layout, ("dv", "vd"), "w_layout")
    expected = "(V, D)" if w_layout == "vd" else "(D, V)"
    _checks.check_rank(w, 2, f"w must have shape {expected}; got {w.shape}.")
    if w_layout == "vd":
        return w, True
    # A tied embedding passed as emb.T: the kernel runs on w.T [V, D], which XLA
    # folds with the caller's transpose (see _compat.is_transpose_output).
    if implementation != "reference" and _compat.is_transpose_output(w):
        return jnp.transpose(w), True
    return w, False


def _num_classes(num_classes, v: int) -> int:
    if num_classes is None:
        return v
    num_classes = _options.static_int(num_classes, "num_classes")
    if not 1 <= num_classes <= v:
        raise ValueError(
            f"num_classes must lie in [1, {v}] (w's global vocabulary); got "
            f"{num_classes}."
        )
    return num_classes


def _inputs(x, w, labels, bias, class_weights, w_layout, opts, impl_name):
    """The arrays validated, ``w`` in the kernel's layout."""
    for value, name in ((x, "x"), (w, "w")):
        _checks.check_floating(value, name)
    _checks.check_integer(labels, "labels")
    w, rows = _classifier(w, w_layout, impl_name)
    v_local, d = w.shape if rows else w.shape[::-1]
    message = f"x must have shape (..., {d}) (its last axis is w's D); got {x.shape}."
    _checks.check_shape(x, (..., d), "x", message=message)
    _checks.check_shape(labels, x.shape[:-1], "labels", " (x's shape without D)")
    bias = _per_class(bias, "bias", v_local)
    class_weights = _per_class(class_weights, "class_weights", v_local)
    v = v_local * ClassAxis(opts.axis_name).num_shards()
    return w, rows, bias, class_weights, v


def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | None = None,
    reduction: SoftmaxReduction = "mean",
    normalizer: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    block_size: int | tuple[int, int] | None = None,
    return_lse: bool = False,
    return_aux: bool = False,
    implementation: Implementation | None = None,
    filter_threshold: float | None = None,
    num_classes: int | None = None,
    axis_name: Any = None,
    reduction_axis_name: Any = None,
    w_layout: Literal["dv", "vd"] = "dv",
    shift: int = 0,
    segment_ids: ArrayLike | None = None,
    segment_padding_id: int | None = None,
    where: ArrayLike | None = None,
    skip_unscored: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array] | tuple[jax.Array, Aux]:
    r"""Cross-entropy of ``x @ w + bias`` without materialising the logits.

    Equals ``softmax_cross_entropy_with_integer_labels(z, labels, **options)``
    on the logits ``z = cap((x @ w + bias) / T)``, with the temperature ``T``
    and the soft cap ``cap(r) = s * tanh(r / s)`` (Gemma 2) when given, i.e.
    per example

    .. math::
        \ell = (1 - a)\, w_y (\mathrm{lse} - z_y)
          + \frac{a}{V} \sum_c w_c (\mathrm{lse} - z_c) + \zeta\,\mathrm{lse}^2,

    but the default implementation streams over blocks of the vocabulary (and
    of the tokens) with an online log-sum-exp, saves only its inputs and three
    scalars per example, and recomputes each block's logits in the backward
    pass: memory is ``O(token_block * vocab_block)`` (plus a float32 ``dx``
    accumulator for 16-bit ``x``), never ``O(N * V)``. ``value_and_grad``
    costs 4 matmuls of the size of ``x @ w`` instead of 3, but moves no
    ``[N, V]`` array through memory; gradients nobody asked for (``dx`` of a
    loss differentiated only in ``w``, ``dw`` of a frozen head) are not
    computed. Forward-mode autodiff (``jax.jvp``) needs
    ``implementation="reference"``.

    Args:
      x: Hidden states ``[..., D]``, any floating dtype. 16-bit inputs are
        multiplied in their own dtype with float32 accumulation.
      w: Classifier ``[D, V]`` (a Dense kernel), or ``[V, D]`` with
        ``w_layout="vd"`` (an embedding matrix, PyTorch's layout), which the
        kernel reads directly: neither ``w`` nor its gradient is copied. A
        tied embedding may also be passed as ``emb.T``: under ``jax.jit`` that
        is recognised and runs the ``[V, D]`` path too.
      labels: Integer class ids ``[...]`` (``x``'s shape without ``D``), any
        integer dtype. Ids outside ``[0, V)`` other than ``ignore_index``
        raise ``ValueError`` for concrete inputs; under ``jit`` their loss is
        NaN with no gradient and ``jax.experimental.checkify.checkify`` reports
        them.
      bias: Optional ``[V]`` bias. ``-inf`` entries mask classes out of the
        softmax (a label on a masked class, or label smoothing with masked
        classes, gives an infinite loss, as for logits).
      ignore_index: Label value whose examples get loss 0 and gradient 0 and
        leave the mean's denominator; a value the labels' dtype cannot
        represent matches nothing.
      label_smoothing: ``a`` in ``[0, 1]``; the target is ``(1-a) onehot + a/V``.
      class_weights: ``[V]`` per-class weights (PyTorch's ``weight``), with
        their true gradient.
      z_loss: Coefficient of the auxiliary ``lse**2`` term.
      logit_softcap: Optional ``s > 0``: the logits become ``s tanh(z / s)``
        before the loss, with the chain-rule factor in the gradient.
      temperature: Optional ``T > 0`` dividing ``x @ w + bias`` before the
        soft cap and everything else, with its chain factor. ``T`` and
        ``1 / T`` must be normal numbers of the compute dtype (``[1.18e-38,
        8.5e37]`` for float32 and 16-bit inputs).
      reduction: ``"mean"`` (default: as the core losses: the cross-entropy
        over the sum of ``class_weights[label]`` of the scored examples, their
        count without weights, plus the z-loss over their count; 0 when there
        are none), ``"mean_per_segment"`` (that mean per segment, then over
        segments; see ``segment_ids``), ``"sum"`` or ``"none"``.
      normalizer: Replaces the denominators of the mean, as in
        :func:`xent_jax.softmax_cross_entropy_with_integer_labels`.
      block_size: ``None`` (defaults tuned for CPU: 1024 classes per step and
        token blocks of ``2**21 // 1024`` rows, both halved at large ``D``
        until the blocks' temporaries fit 24 MiB), an int (classes per step)
        or ``(token_block, vocab_block)``. Results do not depend on it beyond
        float round-off.
      return_lse: Also return the per-example log-sum-exp of the logits,
        differentiable, with the labels' shape: ``(loss, lse)``.
      return_aux: Also return :class:`xent_jax.Aux` (``lse``, ``argmax``,
        ``correct``, ``entropy``), computed in the same streaming pass:
        ``(loss, aux)``. Not together with ``return_lse`` (``aux.lse`` is it).
      implementation: ``"xla"`` (default; also ``"blockwise"``) or
        ``"reference"`` (materialises the logits and applies the core
        formula; the oracle for tests).
      filter_threshold: ``None`` (default, exact) or a probability: in the
        backward pass a block whose probabilities are all below it skips its
        matmuls (Cut-Cross-Entropy's gradient filtering; the label term stays
        exact). The error in each logit's gradient is below ``threshold *
        (sum(t) + 2 z_loss lse)``. No effect with label smoothing, nor when
        ``aux.entropy`` is differentiated (its gradient has no such bound).
      num_classes: The number of real classes when ``w``'s vocabulary is
        padded (to a multiple of 128, or of the devices): columns with global
        id ``>= num_classes`` get no probability, no smoothing mass and no
        gradient, and labels must lie below it. Default: all of ``V``.
      axis_name: Inside ``jax.shard_map``, the mesh axis (or axes) over which
        the vocabulary is split (Megatron's vocabulary parallelism): ``w``,
        ``bias`` and ``class_weights`` hold this device's contiguous slice of
        ``V_local`` classes, global ids ``axis_index * V_local + j``; ``x`` and
        the (global) labels are the same on every device of the axis. Only
        per-example scalars cross devices in the forward pass (a ``pmax`` and
        ``psum``s); the backward pass is local. Each device's ``dx`` is its
        part of the gradient, exactly as for ``x @ w`` with ``w`` split over
        the axis: with ``check_vma=True`` the parts are summed where ``x``'s
        type asks for it (``x`` replicated over the axis), with
        ``check_vma=False`` the caller sums them (``psum`` over ``axis_name``),
        so the fused loss is a drop-in for
        ``softmax_cross_entropy_with_integer_labels(x @ w, axis_name=...)``
        either way. Smoothing, class weights, z-loss, metrics and the range of
        labels are over the global classes.
      reduction_axis_name: Inside ``jax.shard_map``, the data-parallel axes over
        which the examples are split: the reductions are global (see
        :func:`xent_jax.softmax_cross_entropy_with_integer_labels`). Must not
        name an ``axis_name`` axis.
      w_layout: ``"dv"`` (default, ``w`` is ``[D, V]``) or ``"vd"``.
      shift: Causal language modelling on unshifted arrays: position ``t`` is
        scored against the label at ``t + shift`` along the labels' last axis
        (``x`` ``[batch, seq, D]``, labels ``[batch, seq]``), the last
        ``shift`` positions against nothing. Only the labels move; ``x`` is
        never copied.
      segment_ids: Optional integer ids with the labels' shape marking packed
        sequences (see :func:`xent_jax.softmax_cross_entropy_with_integer_labels`).
      segment_padding_id: Optional id that also marks padding in
        ``segment_ids`` (``0`` for t5x's and MaxText's packed batches).
      where: Optional boolean mask with the labels' shape: the positions
        (rows of ``x``) to score, as the core loss's per-example ``where``
        (Levanter's ``loss_mask``); with ``shift``, position ``t`` is scored
        against label ``t + shift`` where ``where[t]`` holds. Masked positions
        get no loss, no gradient and leave the means' denominators. A
        per-class mask would need the ``[..., V]`` logits: mask classes with
        ``bias=-inf`` or ``num_classes`` instead.
      skip_unscored: With ``"xla"``, multiply only the scored rows (not
        ignored, masked, shifted out or segment padding) with ``w``: the rows
        are partitioned stably, scored first (a gather of ``x``, a scatter of
        ``dx``), and the loops stop after the last scored row's token block,
        a trip count computed at run time, so at 50% unscored a step costs
        about half. Values and gradients equal the default's to float32
        round-off (dW sums its rows in another order). The unscored rows'
        ``lse`` and ``aux`` fields are then 0 (``correct`` False) instead of
        computed. Under automatic (GSPMD) batch sharding the partition is a
        global one; under ``shard_map`` each device partitions its own rows.
        The other implementations compute every row either way.

    Returns:
      The loss (a scalar for the reductions, the labels' shape for
      ``"none"``; float32 for 16-bit inputs), and with ``return_lse`` the
      pair ``(loss, lse)``, with ``return_aux`` the pair ``(loss, aux)``.
      Gradients have the dtypes of ``x``, ``w``, ``bias``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import xent_jax
      >>> x = jnp.ones((4, 8)); w = jnp.zeros((8, 1000))
      >>> y = jnp.array([0, 1, 2, 3])
      >>> loss = xent_jax.linear_cross_entropy(x, w, y)
      >>> print(round(float(loss), 4))  # uniform logits: log(1000)
      6.9078
      >>> dx, dw = jax.grad(xent_jax.linear_cross_entropy, argnums=(0, 1))(x, w, y)
    """
    source_labels = labels
    x, w, labels = (
        _checks.as_array(a, n) for a, n in ((x, "x"), (w, "w"), (labels, "labels"))
    )
    opts = _options.softmax_options(
        integer=True,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        temperature=temperature,
        logit_softcap=logit_softcap,
        axis_name=axis_name,
        return_aux=return_aux,
        filter_threshold=filter_threshold,
        reduction=reduction,
        reduction_axis_name=reduction_axis_name,
        shift=shift,
    )
    return_lse = _options.static_bool(return_lse, "return_lse")
    skip_unscored = _options.static_bool(skip_unscored, "skip_unscored")
    if return_lse and opts.aux:
        raise ValueError("pass return_lse or return_aux, not both (aux.lse is lse).")
    impl_name = _registry.canonical("linear", implementation)
    block_size = _options.block_size(block_size)
    w, rows, bias, class_weights, v = _inputs(
        x, w, labels, bias, class_weights, w_layout, opts, impl_name
    )
    opts = dataclasses.replace(opts, num_classes=_num_classes(num_classes, v))
    _options.check_temperature(opts.temperature, fwd.compute_dtype(x, w))
    segment_ids, padding_id = _segments.validate(
        segment_ids, labels.shape, segment_padding_id
    )
    where = _example_mask(where, labels.shape)
    labels = _prepare_labels(
        labels, source_labels, opts, segment_ids, where, padding_id
    )

    per_example = functools.partial(
        _per_example,
        impl=_registry.lookup("linear", impl_name),
        block_size=block_size,
        rows=rows,
        skip_unscored=skip_unscored and impl_name == "xla",
    )
    args = (x, w, bias, labels, class_weights)
    if opts.axis_name is None and _sharding.explicit_axes(
        x, w, bias, class_weights, *labels
    ):
        out = explicit.in_shard_map(per_example, *args, opts, rows)
    else:
        out = per_example(*args, opts)
    loss = _reduce(out, labels, class_weights, opts, normalizer, segment_ids)
    if opts.aux:
        return loss, make_aux(out, labels.scored, labels.ids, labels.ids.shape)
    return (loss, out.lse) if return_lse else loss


def _example_mask(where, shape) -> jax.Array | None:
    """``where`` checked: a boolean mask of the labels' ``shape``."""
    hint = (
        " (per example; a per-class mask would need the [..., V] logits: mask "
        "classes with bias=-inf or num_classes)"
    )
    return _checks.optional_mask(where, shape, hint)


def _prepare_labels(
    labels, source_labels, opts, segment_ids, where=None, padding_id=None
) -> Labels:
    """Labels classified (and shifted); segment padding and the positions
    ``where`` leaves out are never scored."""
    labels = _labels.prepare(
        labels, opts.num_classes, opts.ignore_index, opts.shift, source_labels
    )
    if where is not None:
        labels = _labels.restricted(labels, where)
    if segment_ids is None:
        return labels
    keep = _segments.kept(segment_ids, opts.ignore_index, opts.shift, padding_id)
    return _labels.restricted(labels, keep)


def _reduce(out, labels: Labels, class_weights, opts, normalizer, segment_ids):
    label_weight = None
    if class_weights is not None:
        cdt = _numerics.compute_dtype(class_weights.dtype)
        label_weight = ClassAxis(opts.axis_name).take(
            class_weights.astype(cdt), labels.ids
        )
    ce = _stats.finalize(out.ce, labels.scored, labels.bad)
    segs = None
    if opts.reduction == "mean_per_segment":
        segs = _segments.segments(segment_ids, labels.ids.shape)
    return reduce_softmax(
        ce, out.lse, labels.scored, label_weight, opts, normalizer, segs
    )
