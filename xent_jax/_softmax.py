r"""Softmax cross-entropy on logits, for integer class ids and for soft targets.

Both losses share one kernel. Every option folds into an *effective target*
``t`` (per example, over the classes) so that, with ``lse = logsumexp(x)`` over
the classes kept by ``where``,

.. math::
    \ell = \mathrm{lse}\textstyle\sum_c t_c - \sum_c t_c x_c + z\,\mathrm{lse}^2,
    \qquad
    \frac{\partial \ell}{\partial x} = \bigl(\textstyle\sum_c t_c
        + 2 z\,\mathrm{lse}\bigr)\,\mathrm{softmax}(x) - t,

with ``t = w * ((1 - a) * y + a / C_row) * keep``: ``y`` the one-hot label or
the soft target, ``a`` the label smoothing, ``C_row`` the number of classes kept
in the row, ``w`` the class weights and ``keep`` the ``where`` mask (for integer
labels the label's own term is not masked, as in optax). This is PyTorch's
``F.cross_entropy`` per example, smoothing weighted per class included.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax import _checks, _sharding
from xent_jax._reduction import Reduction, reduce_loss

Implementation = Literal["custom_vjp", "reference"]
IMPLEMENTATIONS = ("custom_vjp", "reference")
AxisName = Any  # a shard_map axis name, or a tuple of them


class _Config(NamedTuple):
    """Static (hashable) options of the kernel."""

    integer: bool
    label_smoothing: float
    z_loss: float
    ignore_index: int | None
    num_classes: int  # global class count (all shards under axis_name)
    axis_name: AxisName


def compute_dtype(dtype: Any) -> Any:
    """16-bit inputs are computed and accumulated in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _row_sum(v: jax.Array, cfg: _Config) -> jax.Array:
    s = jnp.sum(v, axis=-1)
    return s if cfg.axis_name is None else jax.lax.psum(s, cfg.axis_name)


def _row_max(v: jax.Array, cfg: _Config) -> jax.Array:
    m = jnp.max(v, axis=-1)
    return m if cfg.axis_name is None else jax.lax.pmax(m, cfg.axis_name)


def class_offset(num_local: int, axis_name: AxisName = None) -> Any:
    """Global id of the first class held here: ``axis_name`` splits the classes
    into equal contiguous slices, in ``axis_index`` order."""
    if axis_name is None:
        return 0
    return jax.lax.axis_index(axis_name) * num_local


def class_ids(num_local: int, axis_name: AxisName = None) -> jax.Array:
    """Global ids of the classes held here (an offset slice under axis_name)."""
    return jax.lax.iota(jnp.int32, num_local) + class_offset(num_local, axis_name)


def owned_index(labels, num_local: int, axis_name: AxisName = None):
    """``(index, owned)``: each label's index into the classes held here
    (clipped into range) and whether they hold it at all."""
    local = labels - class_offset(num_local, axis_name)
    owned = (local >= 0) & (local < num_local)
    return jnp.clip(local, 0, num_local - 1), owned


def example_status(labels, keep, x_shape, cfg: _Config):
    """Per-example ``(scored, bad)``: scored examples count in the loss and mean.

    An example is not scored when its label is ``ignore_index``, when its label
    is out of range (``bad``: its loss becomes NaN), or when ``where`` masks all
    of its classes.
    """
    batch_shape = x_shape[:-1]
    scored = jnp.ones(batch_shape, bool)
    bad = None
    if cfg.integer:
        bad = _checks.label_out_of_range(labels, cfg.num_classes, cfg.ignore_index)
        scored = ~bad
        if cfg.ignore_index is not None:
            scored &= labels != cfg.ignore_index
    if keep is not None:
        scored &= _row_sum(jnp.broadcast_to(keep, x_shape).astype(jnp.int32), cfg) > 0
    return scored, bad


def smoothing_targets(keep, class_weights, x_shape, dtype, cfg: _Config):
    """The label-independent part of ``t``: ``a / C_row * w`` on kept classes.

    Returns an array broadcastable to ``x_shape`` (a scalar when nothing varies).
    """
    a = cfg.label_smoothing
    if keep is None:
        u = jnp.asarray(a / cfg.num_classes, dtype)
    else:
        kept = _row_sum(jnp.broadcast_to(keep, x_shape).astype(dtype), cfg)
        u = jnp.where(keep, a / jnp.maximum(kept, 1)[..., None], 0)
    if class_weights is not None:
        u = u * class_weights.astype(dtype)
    return u


def effective_targets(labels, keep, class_weights, scored, x_shape, dtype, cfg):
    """The target ``t`` of the module docstring, zero on unscored examples."""
    if cfg.integer:
        ids = class_ids(x_shape[-1], cfg.axis_name)
        t = (ids == labels[..., None]).astype(dtype)
    else:
        t = labels.astype(dtype)
        if keep is not None:
            t = jnp.where(keep, t, 0)
    if class_weights is not None:
        t = t * class_weights.astype(dtype)
    if cfg.label_smoothing:
        t = (1 - cfg.label_smoothing) * t
        t = t + smoothing_targets(keep, class_weights, x_shape, dtype, cfg)
    return jnp.where(scored[..., None], t, 0)


def _masked_logits(x: jax.Array, keep) -> jax.Array:
    xf = x.astype(compute_dtype(x.dtype))
    return xf if keep is None else jnp.where(keep, xf, -jnp.inf)


def _row_max_shift(xm: jax.Array, cfg: _Config) -> jax.Array:
    """The row maximum, 0 for rows with no finite logit (keeps exp finite)."""
    m = jax.lax.stop_gradient(_row_max(xm, cfg))
    return jnp.where(jnp.isfinite(m), m, 0)


def _after(value, dependency):
    """``value``, made data-dependent on ``dependency`` (``max(v, min(d, v)) = v``
    for any ``d`` but NaN).

    The exponentials take ``value`` (the row shift), so XLA must finish every
    other read of the logits (``dependency``) before it computes them, and can
    then write them over the logits' buffer. Without it the label logits may
    be read after, keeping a second logits-sized buffer alive.
    """
    return jnp.maximum(value, jnp.minimum(dependency, value))


def _finalize(loss, scored, bad):
    loss = jnp.where(scored, loss, 0)
    return loss if bad is None else jnp.where(bad, jnp.nan, loss)


def label_values(values, labels, axis_name: AxisName = None):
    """``values[label]`` per example, for a per-class ``values`` ``[C]``
    (this device's slice of the classes under ``axis_name``).

    A gather from the slice that owns the label, 0 on the others and for
    labels out of range, combined by a ``psum`` of per-example scalars. Where
    the class axis is split in ``values``' type (Explicit mesh axes) a masked
    reduction replaces the gather, which could not be typed.
    """
    num_local = values.shape[-1]
    if _sharding.class_axis_in_type(values):
        hit = class_ids(num_local, axis_name) == labels[..., None]
        picked = jnp.sum(jnp.where(hit, values, 0), axis=-1)
    else:
        index, owned = owned_index(labels, num_local, axis_name)
        picked = jnp.where(owned, values[index], 0)
    return picked if axis_name is None else jax.lax.psum(picked, axis_name)


def label_logits_and_weights(x, labels, class_weights, cfg: _Config):
    """``x[label]`` and ``class_weights[label]`` per example, by a gather.

    Under ``axis_name`` each device gathers from its own slice (0 where it does
    not own the label) and a ``psum`` of per-example scalars combines them.
    GSPMD (``Auto`` mesh axes) partitions the gather the same way by itself.
    """
    num_local = x.shape[-1]
    if _sharding.class_axis_in_type(x):
        # Explicit mesh axes: a gather along a split class axis cannot be typed
        # without moving the logits; a masked row reduction can (each device
        # reduces its slice, then per-example scalars are summed). Only here:
        # on one device the gather reads one element per row, not the row.
        hit = class_ids(num_local, cfg.axis_name) == labels[..., None]
        x_y = jnp.sum(jnp.where(hit, x, 0), axis=-1)
    else:
        index, owned = owned_index(labels, num_local, cfg.axis_name)
        x_y = jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0]
        x_y = jnp.where(owned, x_y, 0)
    if cfg.axis_name is not None:
        x_y = jax.lax.psum(x_y, cfg.axis_name)
    w_y = None
    if class_weights is not None:
        w_y = label_values(class_weights.astype(x.dtype), labels, cfg.axis_name)
    return x_y, w_y


def _target_sums(x, xm, labels, keep, class_weights, scored, cfg: _Config):
    """``sum_c t_c`` and ``sum_c t_c x_c`` without materialising ``t``.

    For soft labels ``t`` is elementwise in the labels and fuses into the
    reductions; for integer labels the one-hot part is a gather and only label
    smoothing needs a pass over the row.
    """
    dtype = xm.dtype
    if not cfg.integer:
        t = effective_targets(labels, keep, class_weights, scored, x.shape, dtype, cfg)
        # 0 * (-inf) is 0 here: a masked class the target puts no mass on.
        return _row_sum(t, cfg), _row_sum(jnp.where(t != 0, t * xm, 0), cfg)
    x_y, w_y = label_logits_and_weights(x.astype(dtype), labels, class_weights, cfg)
    a = cfg.label_smoothing
    w_y = jnp.ones_like(x_y) if w_y is None else w_y
    sum_t, sum_tx = (1 - a) * w_y, (1 - a) * w_y * x_y
    if a:
        u = smoothing_targets(keep, class_weights, x.shape, dtype, cfg)
        sum_t += _row_sum(jnp.broadcast_to(u, x.shape), cfg)
        sum_tx += _row_sum(jnp.where(u != 0, u * xm, 0), cfg)
    zero = jnp.zeros_like(sum_t)
    return jnp.where(scored, sum_t, zero), jnp.where(scored, sum_tx, zero)


# --- custom_vjp kernel -----------------------------------------------------


def _kernel_fwd(x, labels, keep, class_weights, cfg: _Config):
    xm = _masked_logits(x, keep)
    dtype = xm.dtype
    scored, bad = example_status(labels, keep, x.shape, cfg)
    shift = _row_max_shift(xm, cfg)
    sum_t, sum_tx = _target_sums(x, xm, labels, keep, class_weights, scored, cfg)
    shift = _after(shift, sum_tx)
    e = jnp.exp(xm - shift[..., None])
    sum_e = _row_sum(e, cfg)
    # Finite everywhere; equals the log-sum-exp on scored rows. Unscored rows
    # may have no finite logit, and -inf there must not reach the arithmetic.
    has_mass = sum_e > 0
    sum_e = jnp.where(has_mass, sum_e, 1)
    lse = jnp.where(has_mass, jnp.log(sum_e), 0) + shift
    loss = _finalize(sum_t * lse - sum_tx + cfg.z_loss * lse**2, scored, bad)
    # d loss / d x = (sum_t + 2 z lse) softmax - t, zero on unscored rows. The
    # closed-form gradient replaces the logits as the residual.
    scale = jnp.where(scored, sum_t + 2 * cfg.z_loss * lse, 0)

    def reuse(e, sum_e, xm, lse, scale):
        # The exponentials dominate on CPU: computed once, reused.
        return (scale / sum_e)[..., None] * e

    def recompute(e, sum_e, xm, lse, scale):
        # Where the row sum fuses its producer (not XLA CPU), the exponentials
        # of 16-bit logits would be a float32 buffer of twice their size.
        return scale[..., None] * jnp.exp(xm - lse[..., None])

    operands = (e, sum_e, xm, lse, scale)
    if jnp.dtype(x.dtype).itemsize >= 4:
        softmax_times_scale = reuse(*operands)
    else:
        # XLA CPU does not fuse the conversion into its reductions and makes
        # a float32 copy of 16-bit logits anyway: the exponentials reuse it.
        softmax_times_scale = jax.lax.platform_dependent(
            *operands, cpu=reuse, default=recompute
        )
    t = effective_targets(labels, keep, class_weights, scored, x.shape, dtype, cfg)
    residual = ((softmax_times_scale - t).astype(x.dtype), lse, scored)
    if not cfg.integer:
        residual += (x, labels, keep, class_weights)
    return loss, residual


def _kernel_bwd(cfg: _Config, residual, g):
    grad, lse = residual[0], residual[1]
    g = g.astype(compute_dtype(grad.dtype))
    d_logits = (g[..., None] * grad).astype(grad.dtype)
    d_logits = _sharding.like(d_logits, grad)
    if cfg.integer:
        return d_logits, None, None, None
    # Soft targets get a real cotangent: d loss / d y_c = (1 - a) w_c (lse - x_c)
    # on kept classes. Under jit it is dead code unless labels need a gradient.
    scored, x, labels, keep, class_weights = residual[2:]
    xm = _masked_logits(x, keep)
    d_y = (1 - cfg.label_smoothing) * (lse[..., None] - xm)
    if class_weights is not None:
        d_y = d_y * class_weights.astype(d_y.dtype)
    if keep is not None:
        d_y = jnp.where(keep, d_y, 0)
    d_y = jnp.where(scored[..., None], g[..., None] * d_y, 0)
    return d_logits, _sharding.like(d_y.astype(labels.dtype), labels), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel(x, labels, keep, class_weights, cfg: _Config):
    return _kernel_fwd(x, labels, keep, class_weights, cfg)[0]


def _kernel_fwd_rule(x, labels, keep, class_weights, cfg):
    return _kernel_fwd(x, labels, keep, class_weights, cfg)


_kernel.defvjp(_kernel_fwd_rule, _kernel_bwd)


# --- reference: the formula, differentiated by autodiff ----------------------


def _reference(x, labels, keep, class_weights, cfg: _Config):
    if cfg.axis_name is not None:
        raise NotImplementedError(
            'implementation="reference" does not support axis_name; use the '
            "default implementation inside shard_map."
        )
    scored, bad = example_status(labels, keep, x.shape, cfg)
    xf = x.astype(compute_dtype(x.dtype))
    # Unscored rows are replaced by zeros so that nothing non-finite is
    # differentiated there; their loss is set to 0 afterwards.
    xf = jnp.where(scored[..., None], xf, 0)
    keep_ = None if keep is None else keep | ~scored[..., None]
    log_z = jax.nn.logsumexp(xf, axis=-1, where=keep_)
    log_p = xf - log_z[..., None]
    t = effective_targets(labels, keep, class_weights, scored, x.shape, xf.dtype, cfg)
    loss = -jnp.sum(jnp.where(t != 0, t * log_p, 0), axis=-1) + cfg.z_loss * log_z**2
    return _finalize(loss, scored, bad)


_IMPLEMENTATIONS = {"custom_vjp": _kernel, "reference": _reference}


# --- public API ---------------------------------------------------------------


def _canonicalize(logits, labels, axis, where, integer: bool):
    """Moves the class axes last (flattening a tuple of them) and shapes ``where``.

    Returns ``(x, labels, keep)`` with ``x`` of shape ``[..., C]`` and ``keep``
    ``None`` or a bool mask broadcastable to ``x`` (``[..., 1]`` for a
    per-example mask).
    """
    logits = jnp.asarray(logits)
    ndim = logits.ndim
    if ndim == 0:
        raise ValueError("logits must have at least one (class) axis; got a scalar.")
    axes = _checks.canonical_axes(axis, ndim)
    batch_axes = tuple(a for a in range(ndim) if a not in axes)
    batch_shape = tuple(logits.shape[a] for a in batch_axes)
    class_shape = tuple(logits.shape[a] for a in axes)
    num_classes = int(np.prod(class_shape))
    order = batch_axes + axes
    x = jnp.transpose(logits, order).reshape(batch_shape + (num_classes,))

    if integer:
        _checks.check_shape(
            labels, batch_shape, "labels", " (the logits' shape without the class axis)"
        )
    else:
        _checks.check_shape(labels, logits.shape, "labels", " (the logits' shape)")
        labels = jnp.transpose(jnp.asarray(labels), order).reshape(x.shape)

    keep = None
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean mask; got dtype {where.dtype}.")
        if where.shape == logits.shape:
            keep = jnp.transpose(where, order).reshape(x.shape)
        elif where.shape == batch_shape:
            keep = where[..., None]
        else:
            raise ValueError(
                f"where must have the logits' shape {logits.shape} (per class) or "
                f"{batch_shape} (per example); got {where.shape}."
            )
    return x, labels, keep


def _softmax_loss(
    logits,
    labels,
    axis,
    where,
    *,
    integer,
    ignore_index,
    label_smoothing,
    class_weights,
    z_loss,
    reduction,
    normalizer,
    implementation,
    axis_name,
    reduction_axis_name=None,
    per_example=None,
):
    """Shared front end of the softmax losses.

    ``per_example(losses, labels, num_local, axis_name)``, if given, maps the
    per-example cross-entropies to another loss before the reduction (the focal
    loss; ``num_local`` is the number of classes here).
    """
    _checks.check_floating(logits, "logits")
    if integer:
        _checks.check_integer(labels, "labels")
    else:
        _checks.check_floating(labels, "labels")
    implementation, label_smoothing, z_loss = _checks.check_common_options(
        reduction, implementation, IMPLEMENTATIONS, label_smoothing, z_loss
    )
    if ignore_index is not None and not integer:
        raise ValueError("ignore_index applies to integer labels only.")
    if ignore_index is not None:
        ignore_index = int(ignore_index)

    x, labels, keep = _canonicalize(logits, labels, axis, where, integer)
    num_local = x.shape[-1]
    if class_weights is not None:
        _checks.check_floating(class_weights, "class_weights")
        _checks.check_shape(
            class_weights, (num_local,), "class_weights", " (one weight per class)"
        )
    num_classes = num_local
    if axis_name is not None:
        num_classes = num_local * jax.lax.psum(1, axis_name)
    if integer:
        labels = _checks.check_labels_in_range(labels, num_classes, ignore_index)
    _sharding.check_reduction_axes(axis_name, reduction_axis_name)

    cfg = _Config(
        integer, label_smoothing, z_loss, ignore_index, num_classes, axis_name
    )
    losses = _IMPLEMENTATIONS[implementation](x, labels, keep, class_weights, cfg)
    if per_example is not None:
        losses = per_example(losses, labels, num_local, axis_name)
    if reduction != "mean" or normalizer is not None:
        return reduce_loss(losses, reduction, None, normalizer, reduction_axis_name)
    return reduce_loss(
        losses,
        reduction,
        _denominator(x, labels, keep, class_weights, cfg),
        reduction_axis_name=reduction_axis_name,
    )


def _denominator(x, labels, keep, class_weights, cfg: _Config):
    """PyTorch's mean denominator (see the public docstrings)."""
    scored, _ = example_status(labels, keep, x.shape, cfg)
    if not cfg.integer or class_weights is None:
        return jnp.sum(scored)
    w = class_weights.astype(compute_dtype(class_weights.dtype))
    return jnp.sum(jnp.where(scored, label_values(w, labels, cfg.axis_name), 0))


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    reduction: Reduction = "none",
    normalizer: jax.typing.ArrayLike | None = None,
    implementation: Implementation | None = None,
    axis_name: AxisName = None,
    reduction_axis_name: AxisName = None,
) -> jax.Array:
    r"""Softmax cross-entropy between logits and integer class ids.

    Per example, with ``lse`` the log-sum-exp of the logits ``x`` over the
    classes that ``where`` keeps, ``w`` the class weights (1 without), ``a`` the
    label smoothing, ``C`` the number of kept classes and ``z`` the z-loss
    coefficient:

    .. math::
        \ell = (1 - a)\, w_y (\mathrm{lse} - x_y)
          + \frac{a}{C} \sum_c w_c (\mathrm{lse} - x_c) + z\,\mathrm{lse}^2,

    exactly PyTorch's ``F.cross_entropy(weight=w, label_smoothing=a,
    reduction="none")`` plus PaLM's z-loss. The gradient is the closed form
    :math:`(\sum_c t_c + 2 z\,\mathrm{lse})\,\mathrm{softmax}(x) - t` with
    :math:`t = w \odot ((1-a)\,\mathrm{onehot}(y) + a/C)`, supplied by a
    ``jax.custom_vjp`` that computes the softmax once and keeps one
    logits-sized residual.

    Args:
      logits: Unnormalized log-probabilities ``[..., C]`` (the class axis is
        ``axis``), any floating dtype; 16-bit inputs are computed in float32.
      labels: Integer class ids with the logits' shape minus the class axis.
        Ids outside ``[0, C)`` other than ``ignore_index`` raise ``ValueError``
        for concrete inputs; under ``jit`` their loss is NaN with no gradient and
        ``jax.experimental.checkify.checkify`` reports them.
      axis: The class axis, or a tuple of axes flattened into one (labels are
        then flat indices), as in optax.
      where: Optional boolean mask with the logits' shape (classes to include)
        or the labels' shape (examples to include). Masked classes leave the
        softmax; an example with no class left has loss 0 and gradient 0.
      ignore_index: Label value whose examples get loss 0 and gradient 0 and
        leave the mean's denominator (PyTorch uses -100).
      label_smoothing: ``a`` in ``[0, 1]``: the target becomes
        ``(1 - a) onehot + a / C``.
      class_weights: ``[C]`` per-class weights (PyTorch's ``weight``).
      z_loss: Coefficient of the auxiliary ``lse**2`` term (PaLM, t5x).
      reduction: ``"none"`` (per-example losses, the default, as optax),
        ``"sum"`` or ``"mean"``: the sum divided by the sum over scored examples
        of ``class_weights[label]`` (their count without weights), PyTorch's
        denominator; 0 (not NaN) when no example is scored.
      normalizer: Replaces the denominator of ``"mean"``; pass the global count
        when accumulating gradients over micro-batches or devices, since
        ``x1/n1 + x2/n2 != (x1 + x2)/(n1 + n2)``.
      implementation: ``"custom_vjp"`` (default) or ``"reference"`` (the plain
        formula under autodiff; use it for forward mode, ``jax.jvp``,
        ``jax.hessian``; the custom VJP raises JAX's forward-mode error).
      axis_name: Inside ``jax.shard_map``, the mesh axis (or axes) over which
        the class axis is split (vocabulary parallelism): each device passes
        its slice of the logits (and of ``class_weights`` and ``where``), the
        global class ``k * C_local + c`` being local class ``c`` on the device
        with ``axis_index(axis_name) == k``. Labels are global class ids,
        replicated over ``axis_name``. The log-sum-exp, the label's logit,
        label smoothing's ``C``, the class weights and the z-loss are over the
        global class set; only per-example scalars cross devices, and the
        backward pass communicates nothing. The losses are replicated over
        ``axis_name``.
      reduction_axis_name: Inside ``jax.shard_map``, the data-parallel mesh
        axes over which the examples are split. ``"sum"`` and ``"mean"`` then
        return the global value (the same on every device, equal to the
        single-device result on the whole batch): the sum and the mean's
        denominator are summed over these axes. Each device's gradient is its
        share of the global one, so the gradients summed over devices are the
        one-big-batch gradient (``jax.grad`` inside ``shard_map`` with the
        default ``check_vma=True`` does that sum for replicated parameters;
        with ``check_vma=False``, ``psum`` them). Must not name an
        ``axis_name`` axis.

    Returns:
      Per-example losses with the labels' shape (a scalar for ``"sum"`` and
      ``"mean"``), float32 for 16-bit logits.

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
    return _softmax_loss(
        logits,
        labels,
        axis,
        where,
        integer=True,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        reduction=reduction,
        normalizer=normalizer,
        implementation=implementation,
        axis_name=axis_name,
        reduction_axis_name=reduction_axis_name,
    )


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    reduction: Reduction = "none",
    normalizer: jax.typing.ArrayLike | None = None,
    implementation: Implementation | None = None,
    axis_name: AxisName = None,
    reduction_axis_name: AxisName = None,
) -> jax.Array:
    r"""Softmax cross-entropy between logits and soft targets.

    With ``lse`` the log-sum-exp over the classes ``where`` keeps and the
    smoothed, weighted target :math:`t = w \odot ((1-a)\,y + a/C)`:

    .. math::
        \ell = -\sum_c t_c \log\mathrm{softmax}(x)_c + z\,\mathrm{lse}^2
             = \mathrm{lse}\textstyle\sum_c t_c - \sum_c t_c x_c + z\,\mathrm{lse}^2,

    PyTorch's ``F.cross_entropy`` with probability targets. The closed-form
    gradient :math:`(\sum_c t_c + 2z\,\mathrm{lse})\,\mathrm{softmax}(x) - t` is
    exact also when a row's targets do not sum to 1. The labels get a real
    gradient, :math:`(1-a)\,w_c(\mathrm{lse} - x_c)` (distillation).

    Args:
      logits: Unnormalized log-probabilities ``[..., C]``, any floating dtype.
      labels: Target weights with exactly the logits' shape (usually
        probabilities; they need not sum to 1). A target with no mass on a
        ``-inf`` logit contributes 0 there (``0 * log 0 = 0``).
      axis: The class axis, or a tuple of axes flattened into one.
      where: Optional boolean mask with the logits' shape (classes to include;
        targets on masked classes are dropped) or the batch shape.
      label_smoothing: ``a`` in ``[0, 1]``: targets become ``(1-a) y + a/C``.
      class_weights: ``[C]`` per-class weights (PyTorch's ``weight``).
      z_loss: Coefficient of the auxiliary ``lse**2`` term.
      reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``: the sum over
        the number of examples with at least one kept class (PyTorch divides by
        the number of examples and ignores weights here); 0 if there are none.
      normalizer: Replaces the denominator of ``"mean"``.
      implementation: ``"custom_vjp"`` (default) or ``"reference"``.
      axis_name: ``shard_map`` axis over which the classes are split: each
        device passes its slice of the logits and of the labels (and of
        ``class_weights`` and ``where``); see
        :func:`softmax_cross_entropy_with_integer_labels`.
      reduction_axis_name: ``shard_map`` data-parallel axes: ``"sum"`` and
        ``"mean"`` return the global value, with the mean's denominator summed
        over these axes; see :func:`softmax_cross_entropy_with_integer_labels`.

    Returns:
      Per-example losses with the logits' shape minus the class axes (a scalar
      for ``"sum"`` and ``"mean"``), float32 for 16-bit logits.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print(xent_jax.softmax_cross_entropy(logits, labels))
      [0.2761 2.9518]
    """
    return _softmax_loss(
        logits,
        labels,
        axis,
        where,
        integer=False,
        ignore_index=None,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        reduction=reduction,
        normalizer=normalizer,
        implementation=implementation,
        axis_name=axis_name,
        reduction_axis_name=reduction_axis_name,
    )
