"""Distillation on both heads' materialised logits, under plain autodiff: the
oracle the blockwise kernel is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _registry
from xent_jax._distillation.xla import Options


def _logits(x, w, vd: bool, cdt):
    return jnp.matmul(x.astype(cdt), (w.T if vd else w).astype(cdt))


def _kl(log_a, log_b):
    return jnp.sum(_numerics.weighted(jnp.exp(log_a), log_a - log_b), axis=-1)


@_registry.register("distillation", "reference")
def distillation(x, w, xt, wt, ids, opts: Options):
    if opts.axis_name is not None:
        raise ValueError(
            'implementation="reference" computes on one device: axis_name needs "xla".'
        )
    cdt = _numerics.compute_dtype(jnp.promote_types(x.dtype, xt.dtype))
    raw = _logits(x, w, opts.vd, cdt)
    teacher = _logits(xt, wt, opts.vd, cdt)
    if not opts.teacher_grad:
        teacher = jax.lax.stop_gradient(teacher)
    q = jax.nn.log_softmax(raw / opts.temperature, axis=-1)
    p = jax.nn.log_softmax(teacher / opts.temperature, axis=-1)
    b = opts.beta
    if opts.divergence == "forward_kl":
        div = _kl(p, q)
    elif opts.divergence == "reverse_kl":
        div = _kl(q, p)
    else:
        m = jnp.logaddexp(jnp.log(b) + p, jnp.log1p(-b) + q)
        div = b * _kl(p, m) + (1 - b) * _kl(q, m)
    loss = (1 - opts.alpha) * opts.temperature**2 * div
    if opts.alpha:
        log_soft = jax.nn.log_softmax(raw, axis=-1)
        ce = -jnp.take_along_axis(log_soft, ids[:, None], axis=-1)[:, 0]
        loss = loss + opts.alpha * ce
    return loss
