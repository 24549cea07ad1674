r"""Distillation between a student's and a teacher's linear heads: validation
and dispatch."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from xent_jax import (
    _checks,
    _labels,
    _numerics,
    _options,
    _registry,
    _segments,
    _sharding,
    _stats,
)
from xent_jax._distillation import reference as _reference  # noqa: F401 (registers)
from xent_jax._distillation import xla as _xla
from xent_jax._options import SoftmaxReduction
from xent_jax._reduction import Part, reduce_loss

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Implementation = Literal["xla", "reference"]
ArrayLike = jax.typing.ArrayLike


def _head(x, w, vd: bool, xname: str, wname: str):
    """``(x, w, D, V)`` checked: floating, ``w`` ``[D, V]`` (``[V, D]`` when
    ``vd``), ``x``'s last axis ``D``."""
    x, w = _checks.as_array(x, xname), _checks.as_array(w, wname)
    for value, name in ((x, xname), (w, wname)):
        _checks.check_floating(value, name)
    layout = "(V, D)" if vd else "(D, V)"
    _checks.check_rank(w, 2, f"{wname} must have shape {layout}; got {w.shape}.")
    d, v = (w.shape[1], w.shape[0]) if vd else w.shape
    if x.ndim == 0:
        raise ValueError(f"{xname} must be [..., D]; got a scalar.")
    _checks.check_shape(x, (..., d), xname, f" (..., D) with D = {d} from {wname}")
    return x, w, v


def _beta(beta, divergence: str) -> float:
    if divergence != "jsd":
        if beta is not None:
            raise ValueError(
                f'beta is for divergence="jsd"; got divergence={divergence!r}.'
            )
        return 0.5
    if beta is None:
        return 0.5
    beta = _options.static_float(beta, "beta")
    if not 0 < beta < 1:  # 0 and 1 make the divergence identically 0
        raise ValueError(f"beta must lie in (0, 1); got {beta}.")
    return beta


def _scored(
    labels, lead, v, alpha, ignore_index, shift, segment_ids, padding_id, where
):
    """``(ids, scored, bad)`` per position (``lead`` the positions' shape;
    ``segment_ids`` and ``padding_id`` validated)."""
    if labels is not None:
        source = labels
        labels = _checks.as_array(labels, "labels")
        _checks.check_integer(labels, "labels")
        _checks.check_shape(labels, lead, "labels", " (x's shape without D)")
        lab = _labels.prepare(labels, v, ignore_index, shift, source)
    else:
        if alpha:
            raise ValueError(
                "alpha > 0 weighs a hard-label cross-entropy: pass labels."
            )
        if ignore_index is not None:
            raise ValueError("ignore_index needs labels.")
        scored = jnp.ones(lead, bool)
        if shift:
            scored = scored.at[..., lead[-1] - shift :].set(False)
        zeros = jnp.zeros(lead, jnp.int32)
        lab = _labels.Labels(zeros, scored, jnp.zeros(lead, bool))
    if segment_ids is not None:
        keep = _segments.kept(segment_ids, ignore_index, shift, padding_id)
        lab = _labels.restricted(lab, keep)
    where = _checks.optional_mask(where, lead, " (x's shape without D)")
    if where is not None:
        lab = _labels.restricted(lab, where)
    return lab


def linear_distillation_loss(
    x: ArrayLike,
    w: ArrayLike,
    teacher_x: ArrayLike,
    teacher_w: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    divergence: Divergence = "forward_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    alpha: float = 0.0,
    ignore_index: int | None = None,
    shift: int = 0,
    segment_ids: ArrayLike | None = None,
    segment_padding_id: int | None = None,
    where: ArrayLike | None = None,
    reduction: SoftmaxReduction = "mean",
    block_size: int | None = None,
    w_layout: Literal["dv", "vd"] = "dv",
    axis_name: Any = None,
    reduction_axis_name: Any = None,
    teacher_grad: bool = False,
    implementation: Implementation | None = None,
) -> jax.Array:
    r"""Distillation loss between two linear heads without their logits.

    With the student's and teacher's distributions at temperature ``T``,
    :math:`Q = \mathrm{softmax}(x W / T)` and :math:`P =
    \mathrm{softmax}(x_t W_t / T)`, each position's loss is

    .. math::
        \ell = \alpha\, \mathrm{CE}(x W, y) + (1 - \alpha)\, T^2\, D(P, Q),

    with :math:`D` one of ``"forward_kl"`` :math:`\mathrm{KL}(P\,\|\,Q)`
    (Hinton et al. 2015, the usual knowledge distillation), ``"reverse_kl"``
    :math:`\mathrm{KL}(Q\,\|\,P)`, or ``"jsd"``, the generalised
    Jensen-Shannon divergence of Agarwal et al. 2024 (GKD),
    :math:`\beta\,\mathrm{KL}(P\,\|\,M) + (1-\beta)\,\mathrm{KL}(Q\,\|\,M)`
    with :math:`M = \beta P + (1 - \beta) Q` (Liger's ``jsd_beta``). The
    :math:`T^2` keeps the soft term's gradient on the hard term's scale
    (Hinton et al.); the hard-label cross-entropy uses the untempered
    logits.

    The default implementation streams over blocks of the vocabulary, one
    pass forward (online log-sum-exps and, for a KL, its sum at the running
    shifts; ``"jsd"`` takes a second pass, from exact log-probabilities) and
    one backward that recomputes the blocks: memory is
    one ``[N, block]`` block per head plus a few numbers per position and the
    float32 ``dx`` accumulator, never ``O(N V)``. The teacher gets no gradient
    unless ``teacher_grad=True`` (on-policy distillation of a teacher being
    trained, or a shared head).

    Args:
      x: Student hidden states ``[..., D]``, any floating dtype (16-bit
        inputs are multiplied in their dtype, accumulated in float32).
      w: Student head ``[D, V]`` (``[V, D]`` with ``w_layout="vd"``).
      teacher_x: Teacher hidden states ``[..., D_t]``, the same positions.
      teacher_w: Teacher head ``[D_t, V]`` (``[V, D_t]``), the same ``V``.
      labels: Optional integer labels ``[...]`` for the hard-label term and
        for ``ignore_index``; out-of-range ids raise as in
        :func:`xent_jax.linear_cross_entropy`.
      divergence: ``"forward_kl"`` (default), ``"reverse_kl"`` or ``"jsd"``.
      beta: The mixture weight of ``"jsd"``, in ``(0, 1)`` (default 0.5).
      temperature: ``T > 0`` for both heads' soft distributions.
      alpha: Weight of the hard-label cross-entropy in ``[0, 1]``; ``> 0``
        needs ``labels``.
      ignore_index: Label value whose positions are not scored (loss 0,
        gradient 0, out of the mean).
      shift: Position ``t`` takes the label at ``t + shift`` (the last
        ``shift`` positions are not scored); both heads' logits at ``t``
        are compared, as for :func:`xent_jax.linear_cross_entropy`.
      segment_ids: Packed sequences: positions of padding segments (negative
        ids or ``segment_padding_id``), and with ``shift`` those whose
        target lies in the next segment, are not scored.
      segment_padding_id: The padding segment's id, as in
        :func:`xent_jax.linear_cross_entropy`.
      where: Optional boolean mask ``[...]``: positions where it is False are
        not scored.
      reduction: ``"mean"`` over the scored positions (default),
        ``"mean_per_segment"`` (the mean within each packed sequence of
        ``segment_ids``, each row one without them, then over the sequences
        with a scored position), ``"sum"`` or ``"none"``.
      block_size: Classes per step; default as many as make a 16 MiB float32
        ``[N, block]`` block (a multiple of 128).
      w_layout: ``"dv"`` (default) or ``"vd"`` (embedding matrices, tied
        heads), for both heads.
      axis_name: Inside ``jax.shard_map``, the mesh axis (or axes) over which
        both heads' vocabularies are split (the same contiguous slices):
        only per-position scalars cross devices.
      reduction_axis_name: The data-parallel axes, as for the other losses:
        ``"mean"`` and ``"sum"`` become global.
      teacher_grad: Also differentiate the teacher's ``x`` and ``w``.
      implementation: ``"xla"`` (default) or ``"reference"`` (materialises
        both heads' logits; one device; the oracle for tests).

    Returns:
      The loss, float32 for 16-bit inputs: a scalar, or ``[...]`` per
      position for ``"none"`` (0 where not scored).

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> x = jnp.eye(2)
      >>> teacher_w = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
      >>> w = jnp.zeros((2, 2))  # a uniform student
      >>> loss = xent_jax.linear_distillation_loss(x, w, x, teacher_w)
      >>> round(float(loss), 4)  # (KL(.5,.5 || U) + KL(.9,.1 || U)) / 2
      0.184
    """
    _options.choice(w_layout, ("dv", "vd"), "w_layout")
    vd = w_layout == "vd"
    x, w, v = _head(x, w, vd, "x", "w")
    xt, wt, vt = _head(teacher_x, teacher_w, vd, "teacher_x", "teacher_w")
    if vt != v:
        raise ValueError(
            f"teacher_w must have the student's vocabulary, {v} classes; got {vt}."
        )
    _checks.check_shape(xt, x.shape[:-1] + (None,), "teacher_x", " (x's positions)")
    divergence = _options.choice(
        divergence, ("forward_kl", "reverse_kl", "jsd"), "divergence"
    )
    temperature = _options.static_float(temperature, "temperature", 0.0, low_open=True)
    _options.check_temperature(temperature, _numerics.compute_dtype(x.dtype))
    alpha = _options.static_float(alpha, "alpha", 0.0, 1.0)
    reduction = _options.choice(reduction, _options.SOFTMAX_REDUCTIONS, "reduction")
    axis_name = _options.axis_names(axis_name)
    reduction_axis_name = _options.axis_names(reduction_axis_name)
    _sharding.check_reduction_axes(axis_name, reduction_axis_name)
    opts = _xla.Options(
        divergence=divergence,
        beta=_beta(beta, divergence),
        temperature=temperature,
        alpha=alpha,
        block_size=_options.optional(_options.static_int, block_size, "block_size", 1),
        vd=vd,
        axis_name=axis_name,
        teacher_grad=_options.static_bool(teacher_grad, "teacher_grad"),
    )
    ignore_index = _options.optional(_options.static_int, ignore_index, "ignore_index")
    shift = _options.static_int(shift, "shift", minimum=0)
    lead = x.shape[:-1]
    v_global = v if axis_name is None else v * jax.lax.axis_size(axis_name)
    segment_ids, padding_id = _segments.validate(segment_ids, lead, segment_padding_id)
    lab = _scored(
        labels,
        lead,
        v_global,
        alpha,
        ignore_index,
        shift,
        segment_ids,
        padding_id,
        where,
    )
    if not opts.teacher_grad:
        xt, wt = jax.lax.stop_gradient(xt), jax.lax.stop_gradient(wt)
    impl = _registry.lookup("distillation", implementation)
    flat = impl(
        x.reshape(-1, x.shape[-1]),
        w,
        xt.reshape(-1, xt.shape[-1]),
        wt,
        lab.ids.reshape(-1),
        opts,
    )
    loss = _stats.finalize(flat.reshape(lead), lab.scored, lab.bad)
    if reduction == "mean_per_segment":
        segs = _segments.segments(segment_ids, lead)
        weight, _, count = _segments.mean_weights(lab.scored, None, segs, loss.dtype)
        part = Part(loss * weight, count)
        return reduce_loss([part], "mean", reduction_axis_name=reduction_axis_name)
    count = jnp.sum(lab.scored).astype(loss.dtype)
    return reduce_loss(
        [Part(loss, count)], reduction, reduction_axis_name=reduction_axis_name
    )
