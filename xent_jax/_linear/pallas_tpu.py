r"""The fused loss as Pallas TPU (Mosaic) kernels: ``implementation="pallas_tpu"``.

Three kernels replace the XLA path's two streaming loops (everything else is
shared, see ``pallas_common``):

* forward, grid ``(token tiles, vocabulary tiles)``: each step multiplies a
  ``(tn, D)`` tile of ``x`` by a ``(D, tv)`` tile of ``w`` on the MXU and folds
  the logits into per-row statistics (an online log-sum-exp), which stay in
  VMEM across the vocabulary axis;
* ``dx``, grid ``(token tiles, vocabulary tiles)``: recomputes each tile's
  logits, turns them into ``dz`` and accumulates ``dz . w_tileᵀ`` into a
  VMEM-resident ``(tn, D)`` float32 block;
* ``dw`` (with ``db`` and the class weights' smoothing part), grid
  ``(vocabulary tiles, token tiles)``: the same ``dz``, accumulated as
  ``x_tileᵀ . dz`` into a ``(D, tv)`` float32 scratch written once.

A TPU kernel cannot accumulate into an output block it has left (blocks are
written back when their index changes), so ``dx`` (summed over vocabulary
tiles) and ``dw`` (summed over token tiles) need their own grid orders: the
backward pass recomputes the logits twice (5 matmuls of ``x @ w``'s size in
all, against 4 for the XLA loop), and a gradient nobody asked for skips its
kernel. With ``filter_threshold`` a tile whose probabilities are all below it
skips its accumulation (``pl.when``); the label term is added exactly after.
16-bit operands are multiplied as they are with float32 accumulation.

Block sizes come from ``tiles.TILES["tpu"]``; ``block_size`` is the XLA
loop's and is ignored here. On CPU the kernels run in Pallas's interpreter
(``jax.lax.platform_dependent``), which is how the tests check them.
"""

from __future__ import annotations

import functools

from xent_jax import _registry
from xent_jax._labels import Labels
from xent_jax._linear import forward as fwd
from xent_jax._linear import pallas_common as common
from xent_jax._linear import tiles, xla
from xent_jax._linear.layout import Layout

NAME = "pallas_tpu"


@_registry.register("linear", NAME)
def linear_pallas_tpu(x, w, bias, labels: Labels, class_weights, opts, layout: Layout):
    """Per-example statistics (``_stats.KernelOut``) of ``x @ w + bias`` by
    the Mosaic kernels (see the module docstring)."""
    common.check_supported(x, w, NAME)
    if x.shape[0] == 0:  # no tokens: no grid to launch
        return xla.linear_xla(x, w, bias, labels, class_weights, opts, layout)
    return _kernel(x, w, bias, labels, class_weights, None, opts, layout)


def _spec(x, w, opts, layout, threshold=None) -> common.Spec:
    n, d = x.shape
    v = fwd.vocab_size(w, layout)
    tn, tv = tiles.tpu_tiles(n, v, d, x.dtype.itemsize, w.dtype.itemsize)
    return common.spec_for(x, w, opts, layout, dict(tn=tn, tv=tv), threshold)


def _row_statistics(x, w, bias, labels, class_weights, opts, layout):
    """``forward.row_statistics`` by the forward kernel."""
    spec = _spec(x, w, opts, layout)
    cols = common.column_fields(w, bias, class_weights, opts, layout, spec.cdt)
    rows = {"label": common.local_labels(labels, spec.v, opts)}
    names = common.stat_names(spec, "u" in cols)
    args = common.same_varying((x, w, rows, cols))
    call = functools.partial(_kernels().forward_call, spec=spec, names=names)
    out = common.on_platform("tpu", call, *args)
    return common.finish_forward(out, cols, spec)


def _vocab_loop(saved, coefs, needs, filtering, opts, layout, cdt):
    """``backward._vocab_loop`` by the ``dx`` and ``dw`` kernels."""
    threshold = opts.filter_threshold if filtering else None
    spec = _spec(saved.x, saved.w, opts, layout, threshold)
    w, bias, cw = saved.w, saved.bias, saved.class_weights
    cols = common.column_fields(w, bias, cw, opts, layout, cdt)
    rows = common.row_fields(saved, coefs, filtering, cdt)
    rows["label"] = common.local_labels(saved.labels, spec.v, opts)
    args = common.same_varying((saved.x, w, rows, cols))
    dx = None
    if needs.x:
        dx = common.on_platform(
            "tpu", functools.partial(_kernels().dx_call, spec=spec), *args
        )
    wanted = {
        "db": needs.bias,
        "dcw": needs.class_weights and coefs.smoothing is not None,
        "dw": needs.w,
    }
    names = tuple(k for k, want in wanted.items() if want)
    out = {}
    if names:
        call = functools.partial(
            _kernels().dw_call, spec=spec, names=names, w_dtype=w.dtype
        )
        out = common.on_platform("tpu", call, *args)
    return common.finish_backward(
        saved, dx, out.get("dw"), out.get("db"), out.get("dcw")
    )


# Pallas calls have no derivative rules: a second derivative raises by name.
_kernel = xla.fused_kernel(
    common.first_order_only(_row_statistics, 5), common.first_order_only(_vocab_loop, 2)
)


def _kernels():
    """The kernels' module, imported when first traced (Pallas takes ~0.6 s
    to import, which ``import xent_jax`` need not pay)."""
    from xent_jax._linear import pallas_tpu_kernels

    return pallas_tpu_kernels
