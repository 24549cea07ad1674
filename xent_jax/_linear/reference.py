"""The fused loss's oracle (``implementation="reference"``): the logits
materialised, then the core loss's reference formula under autodiff."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _registry
from xent_jax._labels import Labels
from xent_jax._linear.layout import Layout
from xent_jax._softmax.reference import no_axis_name, softmax_reference
from xent_jax._softmax.targets import Inputs


def materialised_logits(x, w, bias, opts):
    """``cap((x @ w + bias) / T)``, 16-bit operands multiplied with float32
    accumulation, as the kernels do."""
    op = jnp.promote_types(x.dtype, w.dtype)
    cdt = _numerics.compute_dtype(op)
    logits = jnp.matmul(x.astype(op), w.astype(op), preferred_element_type=cdt)
    if bias is not None:
        logits = logits + bias.astype(cdt)
    logits = _numerics.tempered(logits, opts.temperature)
    softcap = opts.logit_softcap
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


@_registry.register("linear", "reference")
def linear_reference(x, w, bias, labels: Labels, class_weights, opts, layout: Layout):
    """Per-example ``(ce, lse)``, with the ``[N, V]`` logits materialised."""
    no_axis_name(opts)
    w = w.T if layout.rows else w
    # Unscored rows of x and padding columns are not part of the loss: kept
    # out of the differentiated matmul, so that nothing non-finite there
    # reaches a gradient; unscored rows keep their logits' values (for aux).
    scored = labels.scored[:, None]
    v, keep = w.shape[-1], None
    if layout.padded:
        c = opts.num_classes
        w, bias = w[:, :c], None if bias is None else bias[:c]
    x_scored = jnp.where(scored, x, jnp.zeros((), x.dtype))
    logits = jnp.where(
        scored,
        materialised_logits(x_scored, w, bias, opts),
        jax.lax.stop_gradient(materialised_logits(x, w, bias, opts)),
    )
    if layout.padded:  # padding columns leave the softmax and the smoothing
        pad = jnp.full((logits.shape[0], v - c), -jnp.inf, logits.dtype)
        logits = jnp.concatenate([logits, pad], axis=-1)
        keep = jnp.broadcast_to(jnp.arange(v) < c, logits.shape)
    inputs = Inputs(logits, labels, keep, class_weights, labels.scored)
    # The logits are already tempered and capped.
    return softmax_reference(inputs, dataclasses.replace(opts, temperature=None))
