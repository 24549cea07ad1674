r"""Contrastive losses on paired embeddings: validation and dispatch."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from xent_jax import _checks, _options, _registry
from xent_jax._contrastive import reference as _reference  # noqa: F401 (registers)
from xent_jax._contrastive import xla as _xla  # noqa: F401 (registers)
from xent_jax._reduction import Part, Reduction, reduce_loss

Implementation = Literal["xla", "reference"]
ArrayLike = jax.typing.ArrayLike


def _embeddings(a, b) -> tuple[jax.Array, jax.Array]:
    a, b = _checks.as_array(a, "a"), _checks.as_array(b, "b")
    for v, name in ((a, "a"), (b, "b")):
        _checks.check_floating(v, name)
        _checks.check_rank(v, 2, f"{name} must be [N, D] embeddings; got {v.shape}.")
    _checks.check_shape(b, a.shape, "b", hint=" (a's shape: pair i is a[i], b[i])")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have one dtype; got {a.dtype} and {b.dtype}.")
    return a, b


def _scalar(value, name: str) -> jax.Array:
    value = _checks.as_array(value, name)
    _checks.check_floating(value, name)
    _checks.check_shape(value, (), name, hint=" (a scalar)")
    return value


def _run(op, arrays, where, reduction, block_size, axis_name, implementation):
    reduction = _options.choice(reduction, _options.REDUCTIONS, "reduction")
    block_size = _options.optional(_options.static_int, block_size, "block_size", 1)
    axis_name = _options.axis_names(axis_name)
    impl = _registry.lookup(op, implementation)
    kept = _checks.optional_mask(where, arrays[0].shape[:1], " (one entry per pair)")
    if kept is not None:
        # Dropped pairs' embeddings become 0: a NaN or inf there reaches no
        # product (0 x NaN in a masked tile's gradient would still be NaN).
        arrays = tuple(jnp.where(kept[:, None], v, 0) for v in arrays[:2]) + tuple(
            arrays[2:]
        )
    per_pair = impl(*arrays, kept, block_size, axis_name)
    if kept is None:
        count = jnp.asarray(per_pair.shape[0], per_pair.dtype)
    else:
        per_pair = jnp.where(kept, per_pair, 0)
        count = jnp.sum(kept).astype(per_pair.dtype)
    part = Part(per_pair, count)
    return reduce_loss([part], reduction, reduction_axis_name=axis_name)


def clip_loss(
    a: ArrayLike,
    b: ArrayLike,
    scale: ArrayLike,
    *,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
    block_size: int | None = None,
    axis_name: Any = None,
    implementation: Implementation | None = None,
) -> jax.Array:
    r"""CLIP's symmetric InfoNCE loss without the ``[N, N]`` similarity matrix.

    With logits :math:`s_{ij} = \tau\, a_i \cdot b_j` (``scale`` :math:`\tau`,
    the exponentiated learnable temperature of Radford et al. 2021), pair
    ``i``'s loss is the mean of the cross-entropies of its row and its column,
    each with the pair itself as the label:

    .. math::
        \ell_i = \tfrac12 \Big[\big(\log\textstyle\sum_j e^{s_{ij}} - s_{ii}\big)
               + \big(\log\textstyle\sum_j e^{s_{ji}} - s_{ii}\big)\Big],

    so ``reduction="mean"`` is open_clip's ``ClipLoss`` (the mean of the
    image-to-text and text-to-image cross-entropies). The default
    implementation streams over blocks of rows with an online log-sum-exp per
    row and per column and recomputes the blocks in the backward pass: memory
    is one block (16 MiB of float32 by default) plus ``O(N)``, never
    ``O(N²)``. Gradients are exact for ``a``, ``b`` and ``scale``. Pass
    L2-normalised embeddings (the models normalise them; the loss does not).

    Args:
      a: ``[N, D]`` embeddings of one side (images), any floating dtype;
        16-bit inputs are multiplied in their dtype and accumulated in
        float32.
      b: ``[N, D]`` embeddings of the other side (texts), ``a``'s dtype; pair
        ``i`` is ``(a[i], b[i])``.
      scale: Scalar logit scale :math:`\tau` (e.g. ``jnp.exp(log_scale)``),
        differentiable.
      where: Optional boolean ``[N]``: the pairs to keep (a batch padded to
        a fixed size under ``jit``). A dropped pair is in no row's or
        column's log-sum-exp; its loss is 0, its embeddings' gradient
        exactly 0, and ``"mean"`` divides by the number kept.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per pair,
        ``[N]``).
      block_size: Rows per step; default: as many as make a 16 MiB float32
        block. Results do not depend on it beyond float round-off.
      axis_name: Inside ``jax.shard_map``, the mesh axis (or axes) the pairs
        are split over: each device passes its ``N / P`` pairs, and every
        pair is contrasted with all ``N``. The columns travel around a ring
        (``ppermute``), ``O(N D)`` bytes per device, never a block of the
        similarity matrix. ``"mean"``/``"sum"`` are then global (the same on
        every device) and ``"none"`` gives this device's pairs. ``scale``'s
        gradient is each device's share, summed by JAX under
        ``check_vma=True`` (the caller's ``psum`` otherwise), as for every
        loss here.
      implementation: ``"xla"`` (default) or ``"reference"`` (materialises
        the matrix; the oracle for tests).

    Returns:
      The loss, float32 for 16-bit inputs: a scalar, or ``[N]`` for
      ``"none"``.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> loss = xent_jax.clip_loss(a, a, 2.0)
      >>> round(float(loss), 4)  # log(1 + e^-2)
      0.1269
    """
    a, b = _embeddings(a, b)
    arrays = (a, b, _scalar(scale, "scale"))
    return _run("clip", arrays, where, reduction, block_size, axis_name, implementation)


def siglip_loss(
    a: ArrayLike,
    b: ArrayLike,
    scale: ArrayLike,
    bias: ArrayLike,
    *,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
    block_size: int | None = None,
    axis_name: Any = None,
    implementation: Implementation | None = None,
) -> jax.Array:
    r"""SigLIP's pairwise sigmoid loss without the ``[N, N]`` similarity matrix.

    With logits :math:`s_{ij} = \tau\, a_i \cdot b_j + \beta` and labels
    :math:`z_{ij} = +1` for the pair itself and :math:`-1` for every other
    (Zhai et al. 2023), pair ``i``'s loss is the sum over its row,

    .. math::
        \ell_i = -\textstyle\sum_j \log\sigma(z_{ij}\, s_{ij})
               = \mathrm{softplus}(-s_{ii}) + \textstyle\sum_{j \ne i}
                 \mathrm{softplus}(s_{ij}),

    so ``reduction="mean"`` is big_vision's loss (the sum over ``j``, the
    mean over ``i``). Computed in row blocks, memory one block plus ``O(N)``;
    the gradient :math:`\partial \ell / \partial s_{ij} = \sigma(s_{ij}) -
    [i = j]` is recomputed per block. Gradients are exact for ``a``, ``b``,
    ``scale`` and ``bias``.

    Args:
      a: ``[N, D]`` embeddings of one side, any floating dtype.
      b: ``[N, D]`` embeddings of the other side, ``a``'s dtype.
      scale: Scalar :math:`\tau` (e.g. ``jnp.exp(t)``), differentiable.
      bias: Scalar :math:`\beta`, differentiable.
      where: Optional boolean ``[N]``, the pairs to keep, as in
        :func:`clip_loss`: the sums run over kept pairs only.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[N]``).
      block_size: Rows per step, as in :func:`clip_loss`.
      axis_name: The mesh axis the pairs are split over, as in
        :func:`clip_loss` (big_vision's chunked loss, with exact gradients
        for the columns that travel).
      implementation: ``"xla"`` (default) or ``"reference"``.

    Returns:
      The loss, float32 for 16-bit inputs: a scalar, or ``[N]`` for
      ``"none"``.

    Example:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> loss = xent_jax.siglip_loss(a, a, 10.0, -5.0)
      >>> round(float(loss), 4)  # softplus(-5) + softplus(-5)
      0.0134
    """
    a, b = _embeddings(a, b)
    arrays = (a, b, _scalar(scale, "scale"), _scalar(bias, "bias"))
    return _run(
        "siglip", arrays, where, reduction, block_size, axis_name, implementation
    )
