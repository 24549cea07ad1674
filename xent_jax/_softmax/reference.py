"""The softmax losses' formula under plain autodiff (``implementation="reference"``).

The same statistics as the kernel (``_stats``, ``targets``), differentiated by
JAX: every transform works on it, forward mode included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _registry
from xent_jax._options import SoftmaxOptions
from xent_jax._softmax import targets as tg
from xent_jax._softmax.targets import Inputs
from xent_jax._stats import (
    KernelOut,
    cross_entropy,
    doubled,
    half_shifted,
    log_of_sum,
    shift_of,
    tempered_shifted,
)


def no_axis_name(opts) -> None:
    if opts.axis_name is not None:
        raise NotImplementedError(
            'implementation="reference" does not support axis_name; use the '
            "default implementation inside shard_map."
        )


@_registry.register("softmax", "reference")
def softmax_reference(inputs: Inputs, opts: SoftmaxOptions) -> KernelOut:
    """Per-example ``sum_c t_c (lse - x_c)`` and statistics, plainly."""
    no_axis_name(opts)
    dtype = _numerics.compute_dtype(inputs.x.dtype)
    scored = inputs.scored[..., None]
    # Rows that are not scored get harmless logits, so that nothing
    # non-finite is differentiated there; their loss is 0 afterwards. The
    # statistics (lse, entropy, argmax) are of the logits as given.
    x = inputs.x.astype(dtype)
    x_safe = jnp.where(scored, x, 0)
    keep = inputs.keep
    xm = x_safe if keep is None else jnp.where(keep | ~scored, x_safe, -jnp.inf)
    shift, log_se = _shifted_lse(xm, opts.temperature)
    t = tg.targets(inputs, opts, dtype, x.shape)
    # The label's own term reads the unmasked logit (optax); t is 0 on the
    # classes `where` masks. The sum is taken halved and the temperature
    # divides it, not each shifted logit, which may overflow where t_c times
    # it does not (see _stats.half_shifted).
    xh = half_shifted(x_safe, shift[..., None])
    sum_t_xs = doubled(jnp.sum(_numerics.weighted(t, xh), axis=-1), opts.temperature)
    ce = cross_entropy(jnp.sum(t, axis=-1), sum_t_xs, log_se, shift)
    lse = _statistic(_lse, x, inputs, opts.temperature)
    out = KernelOut(jnp.where(inputs.scored, ce, 0), lse)
    if opts.aux:
        entropy = _statistic(_entropy, x, inputs, opts.temperature)
        out = out._replace(entropy=entropy, argmax=_argmax(x, keep))
    return out


def _statistic(fn, x, inputs: Inputs, temperature):
    """``fn(x, keep, T)`` per example, differentiated on scored examples only
    (elsewhere its value is of the logits as given, without gradient)."""
    scored = inputs.scored
    value = fn(jnp.where(scored[..., None], x, 0), inputs.keep, temperature)
    unscored = jax.lax.stop_gradient(fn(x, inputs.keep, temperature))
    return jnp.where(scored, value, unscored)


def _masked(x, keep):
    return x if keep is None else jnp.where(keep, x, -jnp.inf)


def _shifted_lse(xm, temperature):
    """``(shift, log_se)``: the shift in the logits' own units and the
    log-sum-exp of ``(xm - shift) / T``, so that an offset cancels before the
    temperature divides."""
    shift = jax.lax.stop_gradient(shift_of(jnp.max(xm, axis=-1)))
    xs = tempered_shifted(xm, shift[..., None], temperature)
    return shift, log_of_sum(jnp.sum(jnp.exp(xs), axis=-1))


def _lse(x, keep, temperature):
    shift, log_se = _shifted_lse(_masked(x, keep), temperature)
    return _numerics.tempered(shift, temperature) + log_se


def _entropy(x, keep, temperature):
    """``-sum_c p_c log p_c`` over the kept classes, in shifted coordinates."""
    xm = _masked(x, keep)
    shift, log_se = _shifted_lse(xm, temperature)
    xs = tempered_shifted(xm, shift[..., None], temperature)
    log_p = xs - log_se[..., None]
    return -jnp.sum(_numerics.weighted(jnp.exp(log_p), log_p), axis=-1)


def _argmax(x, keep):
    return jnp.argmax(_masked(x, keep), axis=-1).astype(jnp.int32)
