"""The fused loss's oracle (``implementation="reference"``): the logits
materialised, then the core loss's reference formula under autodiff."""

from __future__ import annotations

import dataclasses

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
    if opts.temperature is not None:
        logits = logits / opts.temperature
    softcap = opts.logit_softcap
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


@_registry.register("linear", "reference")
def linear_reference(x, w, bias, labels: Labels, class_weights, opts, layout: Layout):
    """Per-example ``(ce, lse)``, with the ``[N, V]`` logits materialised."""
    no_axis_name(opts)
    logits = materialised_logits(x, w.T if layout.rows else w, bias, opts)
    keep = None
    if layout.padded:  # padding columns leave the softmax and the smoothing
        real = jnp.arange(logits.shape[-1]) < opts.num_classes
        keep = jnp.broadcast_to(real, logits.shape)
    inputs = Inputs(logits, labels, keep, class_weights, labels.scored)
    # The logits are already tempered and capped.
    return softmax_reference(inputs, dataclasses.replace(opts, temperature=None))
