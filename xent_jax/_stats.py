r"""The softmax statistics every softmax kernel computes, defined once.

Every option folds into an *effective target* ``t`` per example, so that with
``lse`` the log-sum-exp of the logits ``x`` over the classes kept,

.. math::
    \mathrm{ce} = \textstyle\sum_c t_c (\mathrm{lse} - x_c),
    \qquad
    \frac{\partial\,\mathrm{ce}}{\partial x} = \textstyle\sum_c t_c\,
        \mathrm{softmax}(x) - t.

Everything is computed in *shifted coordinates*: with ``s`` the row's shift
(its largest logit), ``lse - x_c = log(sum_c exp(x_c - s)) - (x_c - s)``, so a
common offset cancels exactly in ``x_c - s`` instead of being added back and
subtracted again (three logits of ``1e8`` give ``log 3``, not 0).

Conventions, the same in every kernel:

* a row with no finite logit shifts by 0, a row whose largest logit is
  ``+inf`` too (its ``lse`` is then ``+inf``); a NaN logit makes the shift NaN
  and the row's loss NaN;
* a class with zero target weight contributes 0, even where its logit is
  infinite (``0 log 0 = 0``);
* a row without mass (every kept logit ``-inf``) has ``log_se = 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax._numerics import tempered, weighted


def shift_of(row_max: jax.Array) -> jax.Array:
    """The row's shift: its largest logit, 0 where that is infinite; NaN
    stays NaN."""
    return jnp.where(jnp.isinf(row_max), 0, row_max)


def log_of_sum(sum_exp: jax.Array) -> jax.Array:
    """``log(sum_exp)``, 0 for rows without mass; NaN stays NaN."""
    empty = sum_exp == 0
    return jnp.where(empty, 0, jnp.log(jnp.where(empty, 1, sum_exp)))


def rescaled(sum_exp, shift_old, shift_new):
    """A sum of ``exp(x - shift_old)`` moved to ``shift_new``; 0 stays 0
    (no mass yet, whatever the shifts)."""
    return jnp.where(sum_exp == 0, sum_exp, sum_exp * jnp.exp(shift_old - shift_new))


class Online(NamedTuple):
    """Running statistics of the logits of a row seen so far (per row)."""

    row_max: jax.Array  # -inf before any logit
    sum_exp: jax.Array  # sum of exp(x - shift_of(row_max))


def online_init(shape, dtype) -> Online:
    return Online(jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, dtype))


def online_update(state: Online, block_max: jax.Array, block_exps) -> Online:
    """One step of an online log-sum-exp: ``block_exps(shift)`` is the sum of
    ``exp(x - shift)`` over the new block's logits, whose max is
    ``block_max``."""
    row_max = jnp.maximum(state.row_max, block_max)
    shift = shift_of(row_max)
    sum_exp = rescaled(state.sum_exp, shift_of(state.row_max), shift)
    return Online(row_max, sum_exp + block_exps(shift))


def rescaled_moment(sum_exs, sum_exp, shift_old, shift_new):
    """A sum of ``exp(x - s_old) (x - s_old)`` moved to ``s_new``:
    ``exp(s_old - s_new) (sum_exs + (s_old - s_new) sum_exp)``; 0 stays 0."""
    delta = shift_old - shift_new
    return moved_weighted_sum(sum_exs, sum_exp, delta, delta)


def moved_weighted_sum(sum_exv, sum_exp, weight_delta, value_delta):
    """A sum of ``exp(x - s) v`` after the weights' shift ``s`` fell by
    ``weight_delta`` and every ``v`` grew by ``value_delta``:
    ``exp(weight_delta) (sum_exv + value_delta sum_exp)``; 0 stays 0."""
    moved = (sum_exv + value_delta * sum_exp) * jnp.exp(weight_delta)
    return jnp.where(sum_exp == 0, 0, moved)


def first_wins(value_new, id_new, value_old, id_old):
    """Whether ``(value_new, id_new)`` beats ``(value_old, id_old)`` as an
    argmax does: the larger value, the smaller id on ties, NaN before any
    number (``jnp.argmax`` returns the first NaN)."""
    nan_new, nan_old = jnp.isnan(value_new), jnp.isnan(value_old)
    earlier = id_new < id_old
    larger = (value_new > value_old) | ((value_new == value_old) & earlier)
    return jnp.where(nan_old, nan_new & earlier, nan_new | larger)


def half_shifted(x: jax.Array, shift: jax.Array) -> jax.Array:
    """``(x - shift) / 2``, finite for every finite ``x`` and ``shift``.

    ``x - shift`` overflows where a row's logits span more than the dtype's
    range (``-3e38`` and ``3e38``; tempered logits at ``T = 2^-126``), while
    ``t_c (x_c - s)`` for a target ``t_c < 1`` (label smoothing) may not: the
    target-weighted shifted sums are taken in these halved units and doubled
    last by :func:`doubled` (issue 28's campaign). Halving is exact, so in the
    dtype's normal range the sums round exactly as unhalved ones would.
    """
    return x * 0.5 - shift * 0.5


def doubled(half_sum: jax.Array, temperature: float | None) -> jax.Array:
    """``2 half_sum / T`` without an intermediate overflow: doubled after the
    division when it shrinks (``T >= 1``), before it otherwise."""
    if temperature is not None and temperature >= 1:
        return tempered(half_sum, temperature) * 2
    return tempered(half_sum * 2, temperature)


def tempered_shifted(x: jax.Array, shift: jax.Array, temperature: float | None):
    """``(x - shift) / T``, the shifted logits in the softmax's units. With
    ``T > 1`` it is ``half_shifted / (T / 2)``: ``x - shift`` overflows where a
    row's logits span more than the dtype's range while its quotient by ``T``
    does not (``T = 2^126``, issue 28's campaign), and the quotient rounds
    exactly as before (both halved). With ``T <= 1`` an overflowing
    difference overflows the quotient too."""
    if temperature is None or temperature <= 1:
        return tempered(x - shift, temperature)
    return half_shifted(x, shift) / (temperature / 2)


def shift_change(state_old: Online, state_new: Online) -> jax.Array:
    """How far the shift moved, to move a shifted sum of logits along:
    ``sum t (x - s_new) = sum t (x - s_old) + (s_old - s_new) sum t``."""
    return shift_of(state_old.row_max) - shift_of(state_new.row_max)


def combine_shards(state: Online, classes) -> Online:
    """Per-shard online statistics combined over the class shards (one
    ``pmax`` and one ``psum`` of per-example scalars)."""
    row_max = classes.max(state.row_max)
    sum_exp = rescaled(state.sum_exp, shift_of(state.row_max), shift_of(row_max))
    return Online(row_max, classes.sum(sum_exp))


def cross_entropy(sum_t, sum_t_xs, log_se, shift):
    """``sum_t * lse - sum_t x`` in shifted coordinates, NaN for rows with a NaN
    logit. ``sum_t_xs`` is ``sum_c t_c (x_c - shift)``."""
    ce = weighted(sum_t, log_se) - sum_t_xs
    return jnp.where(jnp.isnan(shift), jnp.nan, ce)


def integer_target_sums(a: float, w_y, label_xs, smooth_mass=None, smooth_xs=None):
    """``(sum_t, sum_t_xs)`` for integer labels: ``t = (1 - a) w_y onehot(y) +
    u`` with ``u`` the smoothing targets, of total ``smooth_mass`` and
    ``sum_c u_c (x_c - s) = smooth_xs``; ``label_xs = x_y - s``. (The callers
    pass both differences halved, see :func:`half_shifted`, and get
    ``sum_t_xs`` halved.)"""
    sum_t = (1 - a) * w_y
    sum_t_xs = weighted(sum_t, label_xs)
    if a:
        sum_t = sum_t + smooth_mass
        sum_t_xs = sum_t_xs + smooth_xs
    return sum_t, sum_t_xs


def finalize(ce, scored, bad):
    """0 on examples that are not scored, NaN on out-of-range labels."""
    ce = jnp.where(scored, ce, 0)
    return ce if bad is None else jnp.where(bad, jnp.nan, ce)


def logit_coefficients(g_ce, g_lse, sum_t, scored):
    """``(coef, label_coef)`` with ``d/dx = coef * softmax - label_coef * t``
    for per-example cotangents of the cross-entropy and of ``lse``; both 0 on
    examples that are not scored (no output carries gradient there)."""
    label_coef = jnp.where(scored, g_ce, 0)
    coef = label_coef * sum_t
    if g_lse is not None:
        coef = coef + jnp.where(scored, g_lse, 0)
    return coef, label_coef


def softmax_part(coef, p):
    """``coef * p`` per row, exactly 0 where ``coef`` is 0 (also where ``p`` is
    NaN: unscored rows get no gradient from logits they do not use)."""
    coef = coef[..., None]
    return jnp.where(coef == 0, 0, coef * p)


class KernelOut(NamedTuple):
    """What a softmax kernel returns, per example."""

    ce: jax.Array  # the cross-entropy, 0 on unscored examples
    lse: jax.Array  # the log-sum-exp (of the tempered, capped logits)
    entropy: jax.Array | None = None  # of the softmax (with return_aux)
    argmax: jax.Array | None = None  # global id of the largest logit (aux)


def entropy(log_se, sum_exs, sum_exp):
    """``H = lse - sum_c p_c x_c = log_se - sum_c e_c (x_c - s) / sum_e`` in
    shifted coordinates; 0 for rows without mass."""
    mean_xs = sum_exs / jnp.where(sum_exp == 0, 1, sum_exp)
    return log_se - mean_xs
