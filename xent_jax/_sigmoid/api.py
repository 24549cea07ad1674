r"""Sigmoid binary cross-entropy on logits: validation and dispatch."""

from __future__ import annotations

from typing import Any, Literal

import jax

from xent_jax import _checks, _options, _registry
from xent_jax._reduction import Part, Reduction, reduce_loss
from xent_jax._sigmoid import reference as _reference  # noqa: F401 (registers)
from xent_jax._sigmoid import xla as _xla  # noqa: F401 (registers)

Implementation = Literal["xla", "custom_vjp", "reference"]
ArrayLike = jax.typing.ArrayLike


def _per_element_weight(value, name: str, shape) -> jax.Array | None:
    value = _checks.optional_array(value, name)
    if value is not None:
        _checks.check_floating(value, name)
        _checks.check_broadcastable(value, shape, name)
    return value


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    weights: ArrayLike | None = None,
    reduction: Reduction = "none",
    normalizer: ArrayLike | None = None,
    implementation: Implementation | None = None,
    reduction_axis_name: Any = None,
) -> jax.Array:
    r"""Elementwise sigmoid binary cross-entropy on logits.

    With ``p`` the ``pos_weight``, ``w`` the ``weights`` and ``y`` the label
    (smoothed towards 1/2 as ``(1 - a) y + a/2``):

    .. math::
        \ell = -w\,[p\,y \log\sigma(x) + (1-y)\log(1-\sigma(x))]
             = w\,[p\,y\,\mathrm{softplus}(-x) + (1-y)\,\mathrm{softplus}(x)],

    PyTorch's ``BCEWithLogitsLoss``. The closed-form gradient is
    :math:`w\,[(p\,y + 1 - y)\,\sigma(x) - p\,y]` (:math:`\sigma(x) - y` without
    options), supplied by a ``jax.custom_vjp`` whose residuals are the inputs.
    Infinite logits give the exact limits (0 or ``inf``), never NaN.

    Args:
      logits: ``[...]`` logits, any floating dtype (16-bit computed in float32).
      labels: Targets in ``[0, 1]`` with exactly the logits' shape; float
        labels get a gradient, integer or bool labels are cast.
      pos_weight: Weight of the positive term, broadcast against the logits
        along the last axis (e.g. ``[C]`` for ``C`` labels), as in PyTorch.
        It gets its true gradient.
      label_smoothing: ``a`` in ``[0, 1]``: labels move towards 1/2 (Keras).
      weights: Elementwise weights broadcastable to the logits' shape; they get
        their true gradient.
      reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``: the mean over
        all elements, weights not in the denominator (PyTorch).
      normalizer: A scalar replacing the denominator of ``"mean"``.
      implementation: ``"xla"`` (default; also ``"custom_vjp"``) or
        ``"reference"``.
      reduction_axis_name: Inside ``jax.shard_map``, the mesh axes over which
        the elements are split (the batch, and the label axis if it is split
        too). ``"sum"`` and ``"mean"`` then return the global value, the same
        on every device, with the mean's denominator (the element count)
        summed over these axes; each device's gradient is its share of the
        global one (see :func:`softmax_cross_entropy_with_integer_labels`).

    Returns:
      Losses with the logits' shape (a scalar for ``"sum"``/``"mean"``),
      float32 for 16-bit logits.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> jnp.set_printoptions(precision=4, suppress=True)
      >>> loss = xent_jax.sigmoid_binary_cross_entropy(
      ...     jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0]))
      >>> print(loss)
      [0.6931 2.1269]
    """
    logits = _checks.as_array(logits, "logits")
    labels = _checks.as_array(labels, "labels")
    _checks.check_floating(logits, "logits")
    _checks.check_shape(labels, logits.shape, "labels", " (the logits' shape)")
    _options.choice(reduction, _options.REDUCTIONS, "reduction")
    impl = _registry.lookup("sigmoid", implementation)
    label_smoothing = _options.static_float(
        label_smoothing, "label_smoothing", 0.0, 1.0
    )
    pos_weight = _per_element_weight(pos_weight, "pos_weight", logits.shape)
    weights = _per_element_weight(weights, "weights", logits.shape)
    losses = impl(logits, labels, pos_weight, weights, label_smoothing)
    return reduce_loss(
        [Part(losses, losses.size)],
        reduction,
        _options.normalizer(normalizer, 1),
        _options.axis_names(reduction_axis_name),
    )
