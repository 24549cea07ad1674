r"""Softmax cross-entropy on logits, for integer class ids and for soft targets.

The public functions validate their arguments (``_options``, ``_checks``),
move the class axes last, classify the labels (``_labels``), call the
implementation selected by ``implementation=`` (``_registry``) for the
per-example cross-entropy and log-sum-exp, add the z-loss and reduce
(``_reduction``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax import (
    _checks,
    _labels,
    _numerics,
    _options,
    _registry,
    _segments,
    _stats,
)
from xent_jax._aux import Aux, make_aux
from xent_jax._classes import ClassAxis
from xent_jax._options import SoftmaxReduction
from xent_jax._reduction import cotangent_hint, reduce_softmax
from xent_jax._softmax import reference as _reference  # noqa: F401 (registers)
from xent_jax._softmax import xla as _xla  # noqa: F401 (registers)
from xent_jax._softmax.targets import CotangentHint, Inputs, label_weights

Implementation = Literal["xla", "custom_vjp", "reference"]
AxisName = Any  # a shard_map axis name, or a tuple of them
ArrayLike = jax.typing.ArrayLike


def _canonicalize(logits, labels, axis, where, integer: bool):
    """Moves the class axes last (flattening several into one).

    Returns ``(x, labels, keep, example_keep)``: ``x`` ``[..., C]``, the labels
    to match, and ``where`` as a per-class mask of ``x``'s shape or a
    per-example mask of its batch shape (one of them ``None``).
    """
    message = "logits must have at least one (class) axis; got a scalar."
    _checks.check_shape(logits, (None, ...), "logits", message=message)
    ndim = logits.ndim
    axes = _checks.canonical_axes(axis, ndim)
    batch_axes = tuple(a for a in range(ndim) if a not in axes)
    batch_shape = tuple(logits.shape[a] for a in batch_axes)
    num_classes = int(np.prod([logits.shape[a] for a in axes]))
    order = batch_axes + axes
    x = jnp.transpose(logits, order).reshape(batch_shape + (num_classes,))
    if integer:
        _checks.check_shape(
            labels, batch_shape, "labels", " (the logits' shape without the class axis)"
        )
    else:
        _checks.check_shape(labels, logits.shape, "labels", " (the logits' shape)")
        labels = jnp.transpose(labels, order).reshape(x.shape)
    keep = example_keep = None
    if where is not None:
        where = _checks.as_array(where, "where")
        _checks.check_bool(where, "where")
        if where.shape == logits.shape:
            keep = jnp.transpose(where, order).reshape(x.shape)
        elif where.shape == batch_shape:
            example_keep = where
        else:
            raise ValueError(
                f"where must have the logits' shape {logits.shape} (per class) or "
                f"{batch_shape} (per example); got {where.shape}."
            )
    return x, labels, keep, example_keep


def softmax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Any = -1,
    where: ArrayLike | None = None,
    *,
    integer: bool,
    class_weights: ArrayLike | None = None,
    normalizer: Any = None,
    implementation: Any = None,
    segment_ids: ArrayLike | None = None,
    segment_padding_id: Any = None,
    per_example: Callable[[jax.Array, Inputs], jax.Array] | None = None,
    **options: Any,
):
    """The front end every softmax loss shares.

    ``options`` are the static options of ``_options.softmax_options``.
    ``per_example(ce, inputs)``, if given, maps the per-example
    cross-entropies to another loss before the reduction (the focal loss).
    Returns the loss, or ``(loss, aux)`` with ``return_aux``.
    """
    source_labels = labels
    logits = _checks.as_array(logits, "logits")
    labels = _checks.as_array(labels, "labels")
    _checks.check_floating(logits, "logits")
    if integer:
        _checks.check_integer(labels, "labels")
    else:
        _checks.check_floating(labels, "labels")
    opts = _options.softmax_options(integer=integer, **options)
    impl = _registry.lookup("softmax", implementation)
    x, labels, keep, example_keep = _canonicalize(logits, labels, axis, where, integer)
    _options.check_temperature(opts.temperature, _numerics.compute_dtype(x.dtype))
    classes = ClassAxis(opts.axis_name)
    class_weights = _checks.optional_array(class_weights, "class_weights")
    if class_weights is not None:
        _checks.check_floating(class_weights, "class_weights")
        _checks.check_shape(
            class_weights, (x.shape[-1],), "class_weights", " (one weight per class)"
        )
    opts = dataclasses.replace(opts, num_classes=x.shape[-1] * classes.num_shards())
    batch_shape = x.shape[:-1]
    segment_ids, padding_id = _segments.validate(
        segment_ids, batch_shape, segment_padding_id
    )
    labels, scored, bad = _targets(labels, source_labels, opts, segment_ids, padding_id)
    if example_keep is not None:
        scored = scored & example_keep
    if keep is not None:
        scored = scored & (classes.row_sum(keep.astype(jnp.int32)) > 0)
    inputs = Inputs(x, labels, keep, class_weights, scored)
    label_weight = None
    if integer and class_weights is not None:
        cdt = _numerics.compute_dtype(class_weights.dtype)
        label_weight = label_weights(inputs, opts, cdt)
    segs = None
    if opts.reduction == "mean_per_segment":
        segs = _segments.segments(segment_ids, batch_shape)
    if per_example is None:
        # What the reduction will send back, for the kernel to fold into its
        # residual (a per-example transform changes it: no hint then).
        cdt = _numerics.compute_dtype(x.dtype)
        hint = cotangent_hint(scored, label_weight, opts, cdt, normalizer, segs)
        inputs = inputs._replace(hint=CotangentHint(*hint))
    out = impl(inputs, opts)
    ce = _stats.finalize(out.ce, scored, bad)
    if per_example is not None:
        ce = per_example(ce, inputs)
    loss = reduce_softmax(ce, out.lse, scored, label_weight, opts, normalizer, segs)
    if not opts.aux:
        return loss
    target = labels.ids if integer else jnp.argmax(labels, axis=-1)
    return loss, make_aux(out, scored, target, batch_shape)


def _targets(labels, source_labels, opts, segment_ids, padding_id=None):
    """``(labels, scored, bad)``: integer labels classified (and shifted),
    soft labels as they are; segment padding is never scored."""
    bad = None
    if opts.integer:
        labels = _labels.prepare(
            labels, opts.num_classes, opts.ignore_index, opts.shift, source_labels
        )
        scored, bad = labels.scored, labels.bad
    else:
        scored = jnp.ones(labels.shape[:-1], bool)
    if segment_ids is not None:
        keep = _segments.kept(segment_ids, opts.ignore_index, opts.shift, padding_id)
        scored = scored & keep
    if opts.integer:
        labels = labels._replace(scored=scored)
    return labels, scored, bad


_SHARED_ARGS = """
      temperature: Optional ``T > 0`` dividing the logits before everything
        else (then the soft cap, where there is one), with its chain factor
        in the gradient. ``T`` and ``1 / T`` must be normal numbers of the
        compute dtype (``[1.18e-38, 8.5e37]`` for float32 and 16-bit logits).
      reduction: ``"none"`` (per-example losses, the default, as optax),
        ``"sum"``, ``"mean"`` or ``"mean_per_segment"``. ``"mean"``: the
        cross-entropy summed over the scored examples divided by the sum of
        their ``class_weights[label]`` (their count without weights,
        PyTorch's weighted mean), plus the z-loss summed and divided by the
        number of scored examples (independent of class weights, as Liger and
        Cut-Cross-Entropy); a term with a zero denominator is 0, not NaN
        (but NaN stays NaN: out-of-range labels alone give a NaN mean).
        ``"mean_per_segment"``: that mean within each segment (see
        ``segment_ids``), then the average over the segments that score an
        example, so short sequences weigh as much as long ones.
      normalizer: Replaces the denominators of the mean: pass the global
        values when accumulating gradients over micro-batches or devices,
        since ``x1/n1 + x2/n2 != (x1 + x2)/(n1 + n2)``. A scalar replaces
        both; with class weights and a z-loss pass the pair ``(sum of
        class_weights[label], count)`` (a scalar raises there). For
        ``"mean_per_segment"``, the (global) number of segments.
      implementation: ``"xla"`` (default; also accepted as ``"custom_vjp"``)
        or ``"reference"`` (the plain formula under autodiff). ``jax.jvp`` and
        ``jax.jacfwd`` need ``"reference"`` (forward mode raises on a
        ``custom_vjp``); ``jax.hessian`` (forward over reverse) works on both.
      axis_name: Inside ``jax.shard_map``, the mesh axis (or axes) over which
        the class axis is split (vocabulary parallelism): each device passes
        its slice of the logits (and of ``class_weights`` and ``where``), the
        global class ``k * C_local + c`` being local class ``c`` on the device
        with ``axis_index(axis_name) == k``. The log-sum-exp, the label's
        logit, label smoothing's ``C``, the class weights, the z-loss and the
        metrics are over the global class set; only per-example scalars cross
        devices, and the backward pass communicates nothing. The losses are
        replicated over ``axis_name``.
      reduction_axis_name: Inside ``jax.shard_map``, the data-parallel mesh
        axes over which the examples are split. ``"sum"`` and the means then
        return the global value (the same on every device, equal to the
        single-device result on the whole batch): the sums and the
        denominators (for ``"mean_per_segment"``, the number of segments; a
        segment must not straddle devices) are summed over these axes. Each
        device's gradient is its share of the global one, so the gradients
        summed over devices are the one-big-batch gradient (``jax.grad``
        inside ``shard_map`` with the default ``check_vma=True`` does that sum
        for replicated parameters; with ``check_vma=False``, ``psum`` them).
        Must not name an ``axis_name`` axis.
      segment_ids: Optional integer array with the labels' shape (per-example
        shape for soft labels) whose last axis is the sequence: a segment is
        a run of equal ids along it within a row (packed sequences). A
        negative id, or one equal to ``ignore_index``, marks padding, never
        scored. Used by ``"mean_per_segment"`` (without it every row is a
        segment) and, with ``shift``, to stop a sequence's last token from
        predicting the next sequence's first.
      segment_padding_id: Optional id that also marks padding in
        ``segment_ids``: ``0`` for t5x's and MaxText's packed batches (whose
        padding is segment 0).
      return_aux: Also return :class:`xent_jax.Aux` (per-example ``lse``,
        ``argmax``, ``correct``, ``entropy``), computed in the same pass."""

_RETURNS = """
    Returns:
      Per-example losses with the labels' shape (a scalar for the
      reductions), float32 for 16-bit logits; with ``return_aux`` a pair
      ``(loss, aux)``."""


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    temperature: float | None = None,
    reduction: SoftmaxReduction = "none",
    normalizer: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    implementation: Implementation | None = None,
    axis_name: AxisName = None,
    reduction_axis_name: AxisName = None,
    shift: int = 0,
    segment_ids: ArrayLike | None = None,
    segment_padding_id: int | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, Aux]:
    return softmax_loss(
        logits,
        labels,
        axis,
        where,
        integer=True,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        temperature=temperature,
        reduction=reduction,
        normalizer=normalizer,
        implementation=implementation,
        axis_name=axis_name,
        reduction_axis_name=reduction_axis_name,
        shift=shift,
        segment_ids=segment_ids,
        segment_padding_id=segment_padding_id,
        return_aux=return_aux,
    )


softmax_cross_entropy_with_integer_labels.__doc__ = (
    r"""Softmax cross-entropy between logits and integer class ids.

    Per example, with ``lse`` the log-sum-exp of the logits ``x`` over the
    classes that ``where`` keeps, ``w`` the class weights (1 without), ``a`` the
    label smoothing, ``C`` the number of kept classes and ``z`` the z-loss
    coefficient:

    .. math::
        \ell = (1 - a)\, w_y (\mathrm{lse} - x_y)
          + \frac{a}{C} \sum_c w_c (\mathrm{lse} - x_c) + z\,\mathrm{lse}^2,

    exactly PyTorch's ``F.cross_entropy(weight=w, label_smoothing=a,
    reduction="none")`` plus PaLM's z-loss, computed in shifted coordinates
    (a common offset of the logits cancels exactly). The gradient is the closed
    form :math:`(\sum_c t_c + 2 z\,\mathrm{lse})\,\mathrm{softmax}(x) - t` with
    :math:`t = w \odot ((1-a)\,\mathrm{onehot}(y) + a/C)`, supplied by a
    ``jax.custom_vjp`` that computes the softmax once and keeps one
    logits-sized residual.

    Args:
      logits: Unnormalized log-probabilities ``[..., C]`` (the class axis is
        ``axis``), any floating dtype; 16-bit inputs are computed in float32.
        A NaN in a kept class of a scored example makes its loss NaN.
      labels: Integer class ids with the logits' shape minus the class axis,
        any integer dtype (``int8`` to ``uint64``; compared exactly, never
        wrapped), a numpy array or a Python sequence. Ids outside ``[0, C)``
        other than ``ignore_index`` raise ``ValueError`` for concrete inputs;
        under ``jit`` their loss is NaN with no gradient and
        ``jax.experimental.checkify.checkify`` reports them.
      axis: The class axis, a tuple of axes flattened into one (labels are
        then flat indices), or ``None`` for every axis, as in optax.
      where: Optional boolean mask with the logits' shape (classes to include)
        or the labels' shape (examples to include). Masked classes leave the
        softmax; an example with no class left has loss 0 and gradient 0.
      ignore_index: Label value whose examples get loss 0 and gradient 0 and
        leave the mean's denominator (PyTorch uses -100). A value the labels'
        dtype cannot represent (-100 for ``uint8`` labels) matches nothing.
      label_smoothing: ``a`` in ``[0, 1]``: the target becomes
        ``(1 - a) onehot + a / C``.
      class_weights: ``[C]`` per-class weights (PyTorch's ``weight``); they
        get their true gradient, through the mean's denominator too.
      z_loss: Coefficient of the auxiliary ``lse**2`` term (PaLM, t5x)."""
    + _SHARED_ARGS
    + """
      shift: Causal language modelling on unshifted arrays: position ``t``
        is scored against the label at ``t + shift`` along the labels' last
        axis (the sequence), and the last ``shift`` positions against nothing
        (they leave the mean's denominator). Only the labels move; the logits
        are never copied.
"""
    + _RETURNS
    + """

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> logits = jnp.array([[1.0, 2.0, 0.5]])
      >>> loss = xent_jax.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([1]))
      >>> print(loss)
      [0.4644]
    """
)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    temperature: float | None = None,
    reduction: SoftmaxReduction = "none",
    normalizer: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    implementation: Implementation | None = None,
    axis_name: AxisName = None,
    reduction_axis_name: AxisName = None,
    segment_ids: ArrayLike | None = None,
    segment_padding_id: int | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, Aux]:
    return softmax_loss(
        logits,
        labels,
        axis,
        where,
        integer=False,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        temperature=temperature,
        reduction=reduction,
        normalizer=normalizer,
        implementation=implementation,
        axis_name=axis_name,
        reduction_axis_name=reduction_axis_name,
        segment_ids=segment_ids,
        segment_padding_id=segment_padding_id,
        return_aux=return_aux,
    )


softmax_cross_entropy.__doc__ = (
    r"""Softmax cross-entropy between logits and soft targets.

    With ``lse`` the log-sum-exp over the classes ``where`` keeps and the
    smoothed, weighted target :math:`t = w \odot ((1-a)\,y + a/C)`:

    .. math::
        \ell = -\sum_c t_c \log\mathrm{softmax}(x)_c + z\,\mathrm{lse}^2
             = \mathrm{lse}\textstyle\sum_c t_c - \sum_c t_c x_c
             + z\,\mathrm{lse}^2,

    PyTorch's ``F.cross_entropy`` with probability targets. The closed-form
    gradient :math:`(\sum_c t_c + 2z\,\mathrm{lse})\,\mathrm{softmax}(x) - t` is
    exact also when a row's targets do not sum to 1. The labels get their true
    gradient, :math:`(1-a)\,w_c(\mathrm{lse} - x_c)` (distillation), and so do
    the class weights.

    Args:
      logits: Unnormalized log-probabilities ``[..., C]``, any floating dtype.
      labels: Target weights with exactly the logits' shape (usually
        probabilities; they need not sum to 1). A target with no mass on a
        ``-inf`` logit contributes 0 there (``0 * log 0 = 0``). With
        ``return_aux``, ``correct`` compares the argmax with their mode.
      axis: The class axis, a tuple of axes flattened into one, or ``None``
        for every axis.
      where: Optional boolean mask with the logits' shape (classes to include;
        targets on masked classes are dropped) or the batch shape.
      label_smoothing: ``a`` in ``[0, 1]``: targets become ``(1-a) y + a/C``.
      class_weights: ``[C]`` per-class weights (PyTorch's ``weight``). The
        mean divides by the number of scored examples here (PyTorch ignores
        the weights in the denominator for probability targets).
      z_loss: Coefficient of the auxiliary ``lse**2`` term."""
    + _SHARED_ARGS
    + "\n"
    + _RETURNS
    + """

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(xent_jax.softmax_cross_entropy(logits, labels))
      [0.2761 2.9518]
    """
)
