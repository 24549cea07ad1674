r"""The default softmax kernel: closed-form ``custom_vjp``, exponentials once.

Per example it returns the cross-entropy (see ``_stats``), the log-sum-exp
and, with ``return_aux``, the entropy and the argmax; the z-loss is applied
on ``lse`` by the front end, so its gradient arrives as ``lse``'s cotangent.
With ``z`` the logits divided by the temperature ``T`` and ``p`` their
softmax, the gradient is

.. math::
    T\,\frac{\partial}{\partial x} = (g_\mathrm{ce} \textstyle\sum_c t_c
        + g_\mathrm{lse})\,p - g_\mathrm{ce}\, t
        - g_H\, p \odot (\log p + H).

On a CPU the exponentials dominate: a backward pass that recomputes the
softmax measured 1.9x optax, so the forward pass computes them once and saves
one logits-sized residual, the gradient itself: ``(a p - b t) / T`` with the
cotangents the loss's reduction will send (``Inputs.hint``), computed in
float32 and rounded once to the logits' dtype (for one-hot targets ``a p / T``,
the label's own entry kept per example: no target term per logit in the
forward pass). When the backward pass brings those cotangents the gradient is
that array, correctly rounded in 16 bits; other cotangents are applied to it
(``_from_expected``). A data dependency
(``_after``) makes XLA finish every other read of the logits before the
exponentials, which it can then write over the logits' buffer.

Only what is differentiated is paid for (``symbolic_zeros``): the logits are
kept for the backward pass only when the class weights or soft labels are
differentiated, or for ``return_aux`` with 16-bit logits: the entropy's
gradient cancels where the softmax is flat and needs ``log p`` in float32.
Where 16-bit logits are kept, the whole gradient uses the float32 softmax
recomputed from them, since its parts can cancel each other too; float32
logits keep their softmax for the entropy's gradient instead.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _numerics, _registry, _sharding, _stats
from xent_jax._classes import ClassAxis
from xent_jax._options import SoftmaxOptions
from xent_jax._softmax import targets as tg
from xent_jax._softmax.targets import Inputs
from xent_jax._stats import KernelOut


@_registry.register("softmax", "xla")
def softmax_xla(inputs: Inputs, opts: SoftmaxOptions) -> KernelOut:
    """Per-example statistics (``_stats.KernelOut``) by the closed-form kernel."""
    return _kernel(inputs, opts)


def _after(value, dependency):
    """``value``, made data-dependent on ``dependency`` (``max(v, min(d, v))
    = v`` for any ``d`` but NaN, and NaN only where ``v`` would be NaN too)."""
    return jnp.maximum(value, jnp.minimum(dependency, value))


def _statistics(inputs: Inputs, opts: SoftmaxOptions):
    """The kernel's outputs, and what the softmax and the backward need.

    XLA CPU materialises the elementwise producer of a reduction, so the
    reductions read the logits as given (the max before the temperature, the
    entropy from the exponentials alone), and every other read of the logits
    finishes before the exponentials, which XLA then writes over them.
    """
    classes = ClassAxis(opts.axis_name)
    xm = tg.masked_logits(inputs, _numerics.compute_dtype(inputs.x.dtype))
    row_max = classes.row_max(xm)
    argmax = _argmax(xm, row_max, classes) if opts.aux else None
    # The shift is in the logits' own units: (x - shift) / T lets a common
    # offset cancel exactly before the division rounds anything.
    shift = jax.lax.stop_gradient(_stats.shift_of(row_max))
    sum_t, sum_t_xs, label_x = tg.target_sums(inputs, xm, shift, opts)
    after = _after(shift, sum_t_xs)
    if argmax is not None:
        after = _after(after, argmax.astype(after.dtype))
    e = jnp.exp(_stats.tempered_shifted(xm, after[..., None], opts.temperature))
    sum_e = classes.row_sum(e)
    log_se = _stats.log_of_sum(sum_e)
    ce = _stats.cross_entropy(sum_t, sum_t_xs, log_se, shift)
    lse = _numerics.tempered(shift, opts.temperature) + log_se
    out = KernelOut(jnp.where(inputs.scored, ce, 0), lse)
    if opts.aux:
        # sum_c e_c (x_c - shift), with x_c - shift = log e_c where e_c > 0.
        sum_exs = classes.row_sum(_numerics.weighted(e, jnp.log(e)))
        entropy = _stats.entropy(log_se, sum_exs, sum_e)
        out = out._replace(entropy=entropy, argmax=argmax)
    return out, (xm, e, sum_e, shift, log_se, sum_t, label_x)


def _argmax(xm, row_max, classes: ClassAxis):
    """The global id of each row's largest logit (the first, as jnp.argmax)."""
    local = jnp.argmax(xm, axis=-1).astype(jnp.int32)
    value = jnp.max(xm, axis=-1) if classes.axis_name is not None else row_max
    return classes.argmax(value, local + classes.offset(xm.shape[-1]))


def _softmax(xm, e, sum_e, shift, log_se, x_dtype, temperature, scale=None):
    """The softmax in the compute dtype, times a per-example ``scale``."""

    def reuse(xm, e, sum_e, shift, log_se):
        # The exponentials dominate on CPU: computed once, reused (and one
        # multiplication per logit, not a division).
        inverse = 1 / jnp.where(sum_e == 0, 1, sum_e)
        return e * (inverse if scale is None else scale * inverse)[..., None]

    def recompute(xm, e, sum_e, shift, log_se):
        # Where a row sum fuses its producer (not XLA CPU), the exponentials of
        # 16-bit logits would be a float32 buffer of twice their size.
        xs = _stats.tempered_shifted(xm, shift[..., None], temperature)
        p = jnp.exp(xs - log_se[..., None])
        return p if scale is None else scale[..., None] * p

    operands = (xm, e, sum_e, shift, log_se)
    if jnp.dtype(x_dtype).itemsize >= 4:
        return reuse(*operands)
    # XLA CPU does not fuse the conversion into its reductions and makes a
    # float32 copy of 16-bit logits anyway: the exponentials reuse it.
    return jax.lax.platform_dependent(*operands, cpu=reuse, default=recompute)


class Expected(NamedTuple):
    """The residual gradient: ``grad = (a p - b t) / T`` in the logits' dtype,
    with per-example ``a`` and ``b`` (see ``_expected_coefficients``); for
    one-hot targets ``grad`` holds ``a p / T`` and ``label`` the label's own
    entry in float32."""

    grad: jax.Array
    a: jax.Array
    b: jax.Array
    label: jax.Array | None


def _one_hot(inputs: Inputs, opts: SoftmaxOptions) -> bool:
    """Whether the targets are one class per example (weighted or not) whose
    logit is never masked (``where`` per class may mask the label's)."""
    return opts.integer and not opts.label_smoothing and inputs.keep is None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _kernel(inputs: Inputs, opts: SoftmaxOptions) -> KernelOut:
    return _statistics(inputs, opts)[0]


def _kernel_fwd(inputs, opts: SoftmaxOptions):
    perturbed = jax.tree.map(lambda a: a.perturbed, inputs)
    inputs = jax.tree.map(lambda a: a.value, inputs)
    out, (xm, e, sum_e, shift, log_se, sum_t, label_x) = _statistics(inputs, opts)
    x_dtype = inputs.x.dtype
    statistics = (xm, e, sum_e, shift, log_se, x_dtype, opts.temperature)
    wide = jnp.dtype(x_dtype).itemsize >= 4
    # The logits are kept only for the gradients of soft labels and class
    # weights (with smoothing: the integer one-hot part needs only x_y), and
    # for the entropy's gradient from 16-bit logits (see _entropy_part);
    # float32 logits keep their softmax for it instead. Kept 16-bit logits
    # are the whole gradient's source (recomputed in float32, rounded once);
    # keeping them always would round it once for any cotangent, but the
    # second exponential cost 1.6-1.7x the time in bfloat16 on CPU.
    needs_x = (
        (not opts.integer and perturbed.labels is True)
        or (
            perturbed.class_weights is True
            and (not opts.integer or opts.label_smoothing)
        )
        or (opts.aux and not wide)
    )
    saved = inputs if needs_x else inputs._replace(x=None)
    saved = saved._replace(hint=None)
    expected = None
    if wide or not needs_x:
        expected = _expected(inputs, opts, out.lse, statistics, sum_t, label_x)
    p_aux = _softmax(*statistics) if opts.aux and wide else None
    # x_y, for the one-hot part of the class weights' gradient.
    weights_x = label_x if opts.integer and perturbed.class_weights is True else None
    return out, (saved, expected, p_aux, shift, log_se, sum_t, weights_x, out.entropy)


def _expected(inputs: Inputs, opts, lse, statistics, sum_t, label_x) -> Expected:
    """The gradient the reduction's cotangents give, ``(a p - b t) / T``,
    rounded once to the logits' dtype (see ``_expected_coefficients``)."""
    xm, shift, log_se = statistics[0], statistics[3], statistics[4]
    a, b = _expected_coefficients(inputs, lse, sum_t, opts.temperature)
    # Per example, the temperature's 1 / T scales a and b, not each logit.
    a_t, b_t = (_numerics.tempered(c, opts.temperature) for c in (a, b))
    grad = _softmax(*statistics, scale=a_t)
    label_grad = None
    if _one_hot(inputs, opts):
        # t is the label's weight (sum_t) at the label and 0 elsewhere: the
        # label's entry is kept per example in float32 and put in place by
        # the backward pass, which tests for the label anyway.
        label_xs = _stats.tempered_shifted(label_x, shift, opts.temperature)
        label_grad = a_t * jnp.exp(label_xs - log_se) - b_t * sum_t
    else:
        grad = grad - b_t[..., None] * tg.targets(inputs, opts, xm.dtype, xm.shape)
    return Expected(grad.astype(inputs.x.dtype), a, b, label_grad)


def _expected_coefficients(inputs: Inputs, lse, sum_t, temperature):
    """``(a, b)`` per example: the gradient the reduction's cotangents
    (``inputs.hint``; 1 for the cross-entropy without one) give is
    ``(a p - b t) / T``. Where ``a`` is 0 or ``a / T`` or ``b / T`` not
    finite (examples without scored mass, an infinite ``lse``, a z-loss's
    ``lse / T`` at a tiny temperature) it is ``p / T``: ``a = 1, b = 0``, so
    that ``p`` stays recoverable from the residual."""
    scored = inputs.scored
    if inputs.hint is None:
        b = scored.astype(sum_t.dtype)
        a = b * sum_t
    else:
        # In the order _stats.logit_coefficients combines the cotangents, so
        # that the reduction's own give a bit for bit (a z-loss of 0 adds 0,
        # also where lse is infinite).
        b = jnp.where(scored, inputs.hint.ce.astype(sum_t.dtype), 0)
        per_unit = inputs.hint.lse_per_unit.astype(sum_t.dtype)
        lse_ct = jnp.where(scored & (per_unit != 0), per_unit * lse, 0)
        a = b * sum_t + lse_ct
    finite = [jnp.isfinite(_numerics.tempered(c, temperature)) for c in (a, b)]
    usable = (a != 0) & finite[0] & finite[1]
    return jnp.where(usable, a, 1), jnp.where(usable, b, 0)


def _kernel_bwd(opts: SoftmaxOptions, residual, cotangents: KernelOut):
    saved, expected, p_aux, shift, log_se, sum_t, label_x, entropy = residual
    x_dtype = (saved.x if expected is None else expected.grad).dtype
    dtype = _numerics.compute_dtype(x_dtype)
    g_ce, g_lse = (_numerics.materialised(g, sum_t) for g in cotangents[:2])
    coef, label_coef = _stats.logit_coefficients(g_ce, g_lse, sum_t, saved.scored)
    wants_entropy = entropy is not None and not _numerics.is_zero(cotangents.entropy)
    if saved.x is not None and (wants_entropy or dtype != x_dtype):
        log_p = _log_softmax(saved, opts, shift, log_se)
        pf = jnp.exp(log_p)
    else:
        # The float32 softmax kept for the entropy serves only its gradient:
        # otherwise the saved gradient does, and jit drops p_aux.
        log_p, pf = None, p_aux if wants_entropy else None
    if pf is None:
        d_x = _from_expected(saved, opts, expected, coef, label_coef, sum_t)
    else:
        t = tg.targets(saved, opts, dtype, pf.shape)
        d_x = _stats.softmax_part(coef, pf) - label_coef[..., None] * t
        if wants_entropy:
            g_h = jnp.where(saved.scored, cotangents.entropy.astype(dtype), 0)
            d_x = d_x - _entropy_part(g_h, pf, log_p, entropy)
        # The chain factor of the temperature, d(x / T) / dx = 1 / T.
        d_x = _numerics.tempered(d_x, opts.temperature)
    d_x = d_x.astype(x_dtype)
    if saved.x is not None:
        d_x = _sharding.like(d_x, saved.x)
    d_labels = d_weights = None
    if not opts.integer and saved.x is not None:
        d_labels, d_weights = _soft_label_grads(saved, opts, label_coef, shift, log_se)
    elif saved.class_weights is not None and label_x is not None:
        d_weights = _integer_weight_grad(
            saved, opts, label_coef, label_x, shift, log_se
        )
    d_inputs = Inputs(d_x, None, None, d_weights, None)
    if not opts.integer:
        d_inputs = d_inputs._replace(labels=d_labels)
    return (d_inputs,)


def _from_expected(saved: Inputs, opts, expected: Expected, coef, label_coef, sum_t):
    """``(coef p - label_coef t) / T`` from the saved ``grad = (a p - b t) / T``.

    With ``p = (T grad + b t) / a`` it is ``mu grad + nu t``, ``mu = coef / a``
    and ``nu = (mu b - label_coef) / T`` per example: where the cotangents are
    the reduction's own (``coef = a``, ``label_coef = b``) that is ``grad``
    itself, rounded once; any other cotangent (a differentiated ``lse``, a
    weighted per-example loss) rounds it a second time.
    """
    dtype = sum_t.dtype
    mu = coef / expected.a
    mu_b = _numerics.weighted(expected.b, mu)  # b = 0: no inf * 0
    nu = _numerics.tempered(mu_b - label_coef, opts.temperature)
    scaled = _stats.softmax_part(mu, expected.grad.astype(dtype))
    # nu may overflow (label_coef / T) where t is 0: no NaN there.
    if expected.label is None:
        t = tg.targets(saved, opts, dtype, scaled.shape)
        return scaled + _numerics.weighted(t, nu[..., None])
    # One-hot targets: t is sum_t at the label, 0 elsewhere.
    label = jnp.where(mu == 0, 0, mu * expected.label) + _numerics.weighted(sum_t, nu)
    ids = ClassAxis(opts.axis_name).ids(scaled.shape[-1])
    is_label = ids == saved.labels.ids[..., None]
    return jnp.where(is_label, label[..., None], scaled)


def _log_softmax(saved: Inputs, opts, shift, log_se):
    """``log p`` in the compute dtype, recomputed from the saved logits.

    Where the parts of the gradient cancel (``p`` against ``t`` or against
    the entropy's ``p (log p + H)``), a softmax saved in 16 bits (relative
    error 2^-9) gave errors of a thousand ulps of the gradient, so whenever
    16-bit logits are kept for the backward pass the whole gradient uses the
    float32 softmax.
    """
    xm = tg.masked_logits(saved, log_se.dtype)
    log_p = _stats.tempered_shifted(xm, shift[..., None], opts.temperature)
    return log_p - log_se[..., None]


def _entropy_part(g_h, pf, log_p, entropy):
    """``g_h dH/dx = -g_h p (log p + H)`` before the temperature's factor;
    ``log p`` is ``_log_softmax``'s where the logits were kept."""
    if log_p is None:
        log_p = jnp.log(pf)
    d_log_p = _numerics.weighted(pf, log_p + entropy[..., None])
    return _stats.softmax_part(g_h, d_log_p)


def _times_distance(coef, x, shift, log_se, temperature):
    """``coef (lse - x_c / T)`` per example or class in shifted coordinates.
    With ``T < 1``, where ``(x_c - shift) / T`` overflows but the product
    does not (``T = 2^-126``: issue 28's campaign), it is formed before the
    division."""
    xs = _stats.tempered_shifted(x, shift, temperature)
    direct = _numerics.weighted(coef, log_se - xs)
    if temperature is None or temperature >= 1:
        return direct
    late = _numerics.weighted(coef, temperature * log_se - (x - shift)) / temperature
    return jnp.where(jnp.isinf(direct), late, direct)


def _class_distances(coef, saved: Inputs, opts, shift, log_se):
    """``coef (lse - x_c)`` per class, ``coef`` broadcast to the logits."""
    x = saved.x.astype(log_se.dtype)
    return _times_distance(
        coef, x, shift[..., None], log_se[..., None], opts.temperature
    )


def _soft_label_grads(saved: Inputs, opts, label_coef, shift, log_se):
    """Cotangents of soft labels, ``(1 - a) w_c (lse - x_c)`` on kept classes,
    and of the class weights, ``sum_i t'_ic (lse_i - x_ic)`` with ``t'`` the
    unweighted target."""
    dtype = log_se.dtype
    a = opts.label_smoothing
    coef = label_coef[..., None]
    if saved.keep is not None:
        coef = jnp.where(saved.keep, coef, 0)
    d_y = _class_distances(coef * (1 - a), saved, opts, shift, log_se)
    d_y_weighted = tg.weighted_by_class(d_y, saved, dtype)
    d_labels = _sharding.like(d_y_weighted.astype(saved.labels.dtype), saved.labels)
    d_weights = None
    if saved.class_weights is not None:
        unweighted = saved._replace(class_weights=None)
        t = tg.targets(unweighted, opts, dtype, saved.x.shape)
        per_class = _class_distances(
            label_coef[..., None] * t, saved, opts, shift, log_se
        )
        d_weights = _sum_to_classes(per_class, saved.class_weights)
    return d_labels, d_weights


def _integer_weight_grad(saved: Inputs, opts, label_coef, label_x, shift, log_se):
    """``sum_i g_i [(1 - a) [y_i = c] (lse_i - x_iy) + u_ic (lse_i - x_ic)]``."""
    dtype = log_se.dtype
    classes = ClassAxis(opts.axis_name)
    num_local = saved.class_weights.shape[-1]
    onehot_coef = label_coef * (1 - opts.label_smoothing)
    onehot_part = _times_distance(onehot_coef, label_x, shift, log_se, opts.temperature)
    d_weights = classes.scatter_add(num_local, saved.labels.ids, onehot_part)
    d_weights = _sharding.match_varying(d_weights, saved.class_weights)
    if opts.label_smoothing:
        u = tg.smoothing(saved, opts, dtype)
        per_class = _class_distances(
            label_coef[..., None] * u, saved, opts, shift, log_se
        )
        d_weights = d_weights + _sum_to_classes(per_class, saved.class_weights)
    return d_weights.astype(saved.class_weights.dtype)


def _sum_to_classes(per_class, class_weights):
    """Sums a ``[..., C]`` cotangent over the examples, to ``[C]``."""
    total = jnp.sum(per_class.reshape(-1, per_class.shape[-1]), axis=0)
    total = _sharding.match_varying(total, class_weights)
    return total.astype(class_weights.dtype)


_kernel.defvjp(_kernel_fwd, _kernel_bwd, symbolic_zeros=True)
