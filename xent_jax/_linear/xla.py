r"""The default fused kernel: XLA loops over vocabulary and token blocks.

The forward pass (``forward``) streams over vocabulary blocks (and token
blocks) with an online log-sum-exp and saves only its inputs and three
scalars per example (the shift, the log-sum-exp in shifted coordinates and the
label's logit). The backward pass (``backward``) recomputes each block's
logits and accumulates ``dx``, ``dw`` and ``db`` one block at a time, so no
``[N, V]`` array ever exists: memory is ``O(token_block * vocab_block)`` on
top of the inputs and the gradients.

Gradients that nothing asked for are not computed (``symbolic_zeros``): a
frozen head pays no ``dw``, a loss differentiated only in ``w`` no ``dx``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xent_jax import _registry
from xent_jax._labels import Labels
from xent_jax._linear import backward
from xent_jax._linear import forward as fwd
from xent_jax._linear.layout import Layout, ScoredRows
from xent_jax._stats import KernelOut


@_registry.register("linear", "xla")
def linear_xla(x, w, bias, labels: Labels, class_weights, opts, layout: Layout):
    """Per-example statistics (``_stats.KernelOut``) of ``x @ w + bias``
    (``x`` ``[N, D]``; ``w`` ``[D, V]``, or ``[V, D]`` in the row layout), by
    the blockwise kernel; with ``layout.skip_unscored`` on the scored rows
    alone."""
    if layout.skip_unscored:
        return scored_first(_kernel, x, w, bias, labels, class_weights, opts, layout)
    return _kernel(x, w, bias, labels, class_weights, None, opts, layout)


def scored_first(kernel, x, w, bias, labels: Labels, class_weights, opts, layout):
    """``kernel`` visiting the rows in a stable partition, the scored ones
    first, told how many are scored: its loops run over their token blocks
    alone (at 50% unscored, half the products). The per-row vectors are
    permuted (N entries each), ``x`` and ``dx`` are gathered and scattered
    block by block (``layout.ScoredRows``); the per-row outputs go back to
    their places, and every unscored row's are 0 (its ``lse``, entropy and
    argmax: some share the last scored block, the others are not computed)."""
    scored = labels.scored
    order = jnp.argsort(~scored, stable=True)
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    rows = ScoredRows(order.astype(jnp.int32), jnp.sum(scored, dtype=jnp.int32))
    labels = Labels(*(f[order] for f in labels))
    out = kernel(x, w, bias, labels, class_weights, rows, opts, layout)
    return jax.tree.map(lambda a: jnp.where(scored, a[back], 0), out)


def fused_kernel(row_statistics=fwd.row_statistics, vocab_loop=None):
    """The fused loss as a ``custom_vjp`` around its two streaming loops:
    ``row_statistics`` (forward: ``forward.row_statistics``'s contract) and
    ``vocab_loop`` (backward: ``backward._vocab_loop``'s; ``None``: the XLA
    loop). Everything else (shard combination, outputs, coefficients, the
    class-weight gradient, the filter's label term after a loop that leaves
    it out) is shared; the Pallas kernels (``pallas_tpu``,
    ``pallas_triton``) pass their own two loops."""

    def forward(x, w, bias, labels, class_weights, rows, opts, layout):
        # ``rows``: the scored rows first (``scored_first``), else None.
        extra = {} if rows is None else dict(rows=rows)
        st, u_total = row_statistics(
            x, w, bias, labels, class_weights, opts, layout, **extra
        )
        cdt = fwd.compute_dtype(x, w)
        out, shift, log_se = fwd.outputs(st, u_total, labels, class_weights, opts, cdt)
        return out, shift, log_se, st.label_logit

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
    def kernel(x, w, bias, labels, class_weights, rows, opts, layout) -> KernelOut:
        return forward(x, w, bias, labels, class_weights, rows, opts, layout)[0]

    def kernel_fwd(x, w, bias, labels, class_weights, rows, opts, layout):
        needs = backward.Needs(
            x.perturbed,
            w.perturbed,
            bias is not None and bias.perturbed,
            class_weights is not None and class_weights.perturbed,
        )
        x, w, bias, labels, class_weights, rows = jax.tree.map(
            lambda a: a.value, (x, w, bias, labels, class_weights, rows)
        )
        out, shift, log_se, label_logit = forward(
            x, w, bias, labels, class_weights, rows, opts, layout
        )
        saved = backward.Saved(
            x,
            w,
            bias,
            labels,
            class_weights,
            shift,
            log_se,
            label_logit,
            out.entropy,
            rows,
        )
        # Which gradients are needed is static: it travels as the residuals'
        # structure (an empty array where needed, None where not).
        flags = tuple(jnp.zeros((0,)) if need else None for need in needs)
        return out, (saved, flags)

    def kernel_bwd(opts, layout, residual, cotangents):
        saved, flags = residual
        needs = backward.Needs(*(f is not None for f in flags))
        grads = backward.gradients(saved, cotangents, needs, opts, layout, vocab_loop)
        return (*grads, None)  # rows: integers

    kernel.defvjp(kernel_fwd, kernel_bwd, symbolic_zeros=True)
    return kernel


_kernel = fused_kernel()
