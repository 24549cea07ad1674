r"""What the Pallas kernels (``pallas_tpu``, ``pallas_triton``) share.

The kernels replace only the XLA path's two streaming loops (see
``xla.fused_kernel``): the forward kernel yields the same per-row
``blocks.RowStats`` over this device's columns, the backward kernels the same
``dx``, ``dw``, ``db`` and the class weights' smoothing part from the same
``backward.Coefficients``. Shard combination, outputs, coefficients, the
class-weight gradient and the filter's label term are the XLA path's code.

Inside a kernel every per-row value is a ``[tn, 1]`` column and every
per-class one a ``[1, tv]`` row (2-D: what Mosaic lays out best), and maxima
treat NaN explicitly: Triton's ``max`` is ``maxnumf``, which drops NaN, and
the conventions of ``_stats`` (a NaN logit makes its row NaN) must hold on
every backend. Per-row and per-class operands travel as dicts of ``[N, 1]``
and ``[1, V]`` float32 arrays (labels as int32), so that each kernel reads the
fields its options need by name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from xent_jax import _compat, _numerics, _sharding, _stats
from xent_jax._classes import ClassAxis
from xent_jax._linear import blocks
from xent_jax._linear import forward as fwd
from xent_jax._options import SoftmaxOptions

# Column ids travel as float32 inside the kernels (argmax by a min-reduction).
MAX_LOCAL_CLASSES = 2**24
STAT_FIELDS = ("row_max", "sum_exp", "label_logit", "smooth_xs", "sum_exs", "best_id")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A kernel's static description: options, shapes, dtypes and tiles."""

    opts: SoftmaxOptions
    rows: bool  # w is [V, D]
    n: int
    v: int  # classes on this device
    d: int
    cdt: Any  # compute dtype (float32)
    op: Any  # operand dtype of the matmuls
    tn: int
    tv: int
    td: int = 0  # Triton: D per dot
    splits: int = 1  # Triton forward: vocabulary splits
    threshold: float | None = None  # gradient filter (backward)

    @property
    def ragged_rows(self) -> bool:
        return self.n % self.tn != 0

    @property
    def ragged_cols(self) -> bool:
        return self.v % self.tv != 0


def cost(
    spec: Spec,
    x,
    w,
    *,
    products: int,
    x_reads: int,
    w_reads: int,
    written: int,
    extent: tuple[int, int] | None = None,
):
    """The ``pl.CostEstimate`` of one ``pallas_call`` over the tiled
    ``[N, V]`` (padded to whole tiles; ``extent``: the ``(rows, columns)`` of
    it the call covers): ``products`` ``[N, D] x [D, V]`` matmuls (the
    logits, dx or dW), one exp per logit, the covered part of ``x`` read
    ``x_reads`` times and of ``w`` ``w_reads`` times, ``written`` bytes out.
    Without it XLA counts a kernel as free, and its scheduler and
    ``cost_analysis()`` with it."""
    from jax.experimental import pallas as pl  # not at import (see the kernels)

    n_all = -(-spec.n // spec.tn) * spec.tn
    v_all = -(-spec.v // spec.tv) * spec.tv
    n, v = (n_all, v_all) if extent is None else extent
    read = x_reads * x.size * x.dtype.itemsize * min(
        1.0, n / n_all
    ) + w_reads * w.size * w.dtype.itemsize * min(1.0, v / v_all)
    return pl.CostEstimate(
        flops=2 * products * n * spec.d * v,
        transcendentals=n * v,
        bytes_accessed=int(read + written),
    )


def check_supported(x, w, name: str) -> None:
    """Raises for what no Pallas kernel takes (with the option's name)."""
    if not all(_compat.is_static(s) for s in x.shape + w.shape):
        raise NotImplementedError(
            f"implementation={name!r} needs static shapes (Pallas grids are "
            "static); use implementation='xla' with symbolic shapes."
        )
    dtype = jnp.promote_types(x.dtype, w.dtype)
    if jnp.dtype(_numerics.compute_dtype(dtype)) != jnp.float32:
        raise NotImplementedError(
            f"implementation={name!r} takes float32 and 16-bit x and w (float32 "
            f"accumulation); got {x.dtype} and {w.dtype}: use implementation='xla'."
        )


def spec_for(x, w, opts, layout, tiles: dict, threshold=None) -> Spec:
    v = fwd.vocab_size(w, layout)
    if v >= MAX_LOCAL_CLASSES:
        raise ValueError(
            f"the Pallas kernels take fewer than {MAX_LOCAL_CLASSES} classes per "
            f"device; got {v}."
        )
    op = jnp.promote_types(x.dtype, w.dtype)
    cdt = _numerics.compute_dtype(op)
    n, d = x.shape
    return Spec(opts, layout.rows, n, v, d, cdt, op, threshold=threshold, **tiles)


def on_platform(platform: str, fn, *args):
    """``fn(*args, interpret=...)``: compiled on ``platform`` (``"tpu"`` or
    ``"cuda"``), interpreted on CPU. Both are staged out; lowering keeps only
    the branch of the platform lowered for (``jax.export`` from a CPU host
    lowers the compiled kernel)."""

    def cpu(*args):
        axes = sorted(
            set().union(*map(_compat.varying_manual_axes, jax.tree.leaves(args)))
        )
        if not axes:
            return fn(*args, interpret=True)
        return _interpreted_everywhere(fn, args, tuple(axes))

    compiled = functools.partial(fn, interpret=False)
    return jax.lax.platform_dependent(*args, cpu=cpu, **{platform: compiled})


def _interpreted_everywhere(fn, args, axes: tuple):
    """The interpreter run on every device's arrays at once, untyped.

    Pallas's interpreter (jax 0.10) cannot evaluate a kernel on values typed
    as varying over ``shard_map`` axes (``check_vma=True``): the kernel's
    constants meet them untyped. Gathered over those axes the arrays are
    invariant; each device interprets every device's call (``vmap``) and
    keeps its own. CPU only (tests): the compiled kernels trace their bodies
    without these types.
    """
    gathered = jax.tree.map(lambda a: jax.lax.all_gather(a, axes, to="invarying"), args)
    out = jax.vmap(functools.partial(fn, interpret=True))(*gathered)
    here = jax.lax.axis_index(axes)
    return jax.tree.map(lambda a: a[here], out)


def same_varying(tree):
    """Every array of ``tree`` typed to vary over the same ``shard_map`` axes
    (a ``pallas_call`` types its outputs as one of its inputs)."""
    return _sharding.varying_like(tree, tree)


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """An output of a ``pallas_call`` typed (under ``check_vma``) as ``like``."""
    mat = getattr(jax.typeof(like), "manual_axis_type", None)
    if mat is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


# --- operands, on the XLA side ------------------------------------------------


def column_fields(w, bias, class_weights, opts, layout, cdt) -> dict:
    """Per-class ``[1, V]`` operands: bias, ``real`` (1 where the global id is
    below ``num_classes``) and the smoothing weights ``u``."""
    v = fwd.vocab_size(w, layout)
    cols = {}
    if bias is not None:
        bias = bias.astype(cdt)
        if blocks.divides_inputs(opts):  # once, outside the kernels
            bias = blocks.divided_input(bias, opts)
        cols["bias"] = bias[None]
    if layout.padded:
        real = ClassAxis(opts.axis_name).ids(v) < opts.num_classes
        cols["real"] = real.astype(cdt)[None]
    u = fwd.smoothing_weights(w, class_weights, opts, layout, cdt)
    if u is not None:
        cols["u"] = u[None]
    return cols


def local_labels(labels, v: int, opts) -> jax.Array:
    """Each row's label as a local column id ``[N, 1]``, -1 where another
    device holds it (so that no column past ``v`` of a ragged tile hits)."""
    local, owned = ClassAxis(opts.axis_name).owned(labels.ids, v)
    return jnp.where(owned, local, -1).astype(jnp.int32)[:, None]


def stat_names(spec: Spec, smoothing: bool) -> tuple[str, ...]:
    names = ("row_max", "sum_exp", "label_logit")
    names += ("smooth_xs",) if smoothing else ()
    return names + (("sum_exs", "best_id") if spec.opts.aux else ())


def finish_forward(out: dict, cols: dict, spec: Spec):
    """The kernel's per-row outputs ``[N, 1]`` as ``forward.row_statistics``
    returns them: combined over the class shards, with the total smoothing
    weight."""
    get = {k: a[:, 0] for k, a in out.items()}
    zeros = jnp.zeros_like(get["row_max"])
    st = blocks.RowStats(
        _stats.Online(get["row_max"], get["sum_exp"]),
        get["label_logit"],
        get.get("smooth_xs", zeros),
    )
    if spec.opts.aux:
        offset = ClassAxis(spec.opts.axis_name).offset(spec.v)
        best = get["best_id"].astype(jnp.int32) + offset
        st = st._replace(sum_exs=get["sum_exs"], best_id=best)
    u = cols.get("u")
    u_local = None if u is None else jnp.sum(u)
    return fwd.combine_shards(st, u_local, u is not None, spec.opts)


def row_fields(saved, coefs, filtering: bool, cdt) -> dict:
    """Per-row ``[N, 1]`` operands of the backward kernels."""
    rows = {
        "shift": saved.shift,
        "log_se": saved.log_se,
        "coef": coefs.softmax,
        # x of an unscored row must not reach dw, even when it is NaN
        "scored": saved.labels.scored,
    }
    if not filtering:
        rows["onehot"] = coefs.onehot
    if coefs.smoothing is not None:
        rows["smoothing"] = coefs.smoothing
    if coefs.entropy is not None:
        rows["g_h"], rows["entropy"] = coefs.entropy, saved.entropy
    return {k: a.astype(cdt)[:, None] for k, a in rows.items()}


def finish_backward(saved, dx, dw, db, dcw):
    """Gradients as ``backward._vocab_loop`` returns them: ``dw``, ``db``,
    ``dcw`` summed over the data axes their primal is replicated over (as the
    XLA loop's ``_put_block``), ``dw`` in its primal's dtype (``db``, ``dcw``
    in f32)."""
    if dw is not None:
        dw = _sharding.match_varying(dw, saved.w).astype(saved.w.dtype)
    if db is not None:
        # (float32: backward.gradients casts it after the filter's label term)
        db = _sharding.match_varying(db.reshape(-1), saved.bias)
    if dcw is not None:
        dcw = _sharding.match_varying(dcw.reshape(-1), saved.class_weights)
    return dx, dw, db, dcw


# --- inside the kernels -------------------------------------------------------


def dot(a, b, contract: tuple[tuple[int], tuple[int]], spec: Spec, op=None):
    """``a . b`` in the operand dtype (or ``op``) with float32 accumulation."""
    op = spec.op if op is None else op
    return jax.lax.dot_general(
        a.astype(op),
        b.astype(op),
        (contract, ((), ())),
        preferred_element_type=spec.cdt,
    )


def raw_logits(xb, wb, spec: Spec):
    """``xb [tn, k] . wb`` (``wb`` ``[k, tv]``, or ``[tv, k]`` in rows); ``xb``
    divided by part of the temperature first (in float32) where
    ``blocks.logits`` divides it."""
    contract = ((1,), (1 if spec.rows else 0,))
    if not blocks.divides_inputs(spec.opts):
        return dot(xb, wb, contract, spec)
    xb = blocks.divided_input(xb.astype(spec.cdt), spec.opts)
    return dot(xb, wb, contract, spec, op=jnp.promote_types(spec.cdt, spec.op))


def dx_part(dz, wb, spec: Spec):
    """``dz [tn, tv] . wbᵀ``: ``[tn, k]``."""
    return dot(dz, wb, ((1,), (0 if spec.rows else 1,)), spec)


def dw_part(xb, dz, scored, spec: Spec):
    """``xbᵀ . dz`` ``[k, tv]`` (``dzᵀ . xb`` ``[tv, k]`` in rows), with the
    rows of unscored examples (``scored [tn, 1]`` 0) taken as 0."""
    xb = jnp.where(scored != 0, xb, 0)
    if spec.rows:
        return dot(dz, xb, ((0,), (0,)), spec)
    return dot(xb, dz, ((0,), (0,)), spec)


def nan_max(a, b):
    """``jnp.maximum`` that propagates NaN on every backend."""
    return jnp.where(jnp.isnan(a) | jnp.isnan(b), jnp.nan, jnp.maximum(a, b))


def row_max_of(z):
    """Per-row maxima ``[tn, 1]`` (NaN where the row holds one) and where the
    NaNs are."""
    nan = jnp.isnan(z)
    any_nan = jnp.max(jnp.where(nan, 1.0, 0.0), axis=1, keepdims=True) > 0
    top = jnp.max(jnp.where(nan, -jnp.inf, z), axis=1, keepdims=True)
    return jnp.where(any_nan, jnp.nan, top), nan, any_nan


def column_mask(col, cols: dict, spec: Spec, bounded: bool):
    """Where a tile's columns are real classes (and, if ``bounded``, below
    ``spec.v``); ``None``: everywhere."""
    ok = None
    if bounded:
        ok = col < spec.v
    if "real" in cols:
        real = cols["real"] > 0
        ok = real if ok is None else ok & real
    return ok


def init_stats(names, shape, cdt) -> dict:
    fill = {"row_max": -jnp.inf}
    return {k: jnp.full(shape, fill.get(k, 0.0), cdt) for k in names}


def online_tile(st: dict, z, col, hit, u=None, u_seen=None) -> dict:
    """``blocks.forward_step`` on a tile, per-row values as ``[tn, 1]``:
    ``st`` (``STAT_FIELDS``) updated with the logits ``z`` ``[tn, tv]``
    (``-inf`` where masked) of the columns ``col`` ``[1, tv]`` (float ids),
    ``hit`` marking labels, smoothing weights ``u`` and ``u_seen``, their sum
    over the columns already folded in."""
    block_max, nan, any_nan = row_max_of(z)
    old_max = st["row_max"]
    row_max = nan_max(old_max, block_max)
    shift_old, shift = _stats.shift_of(old_max), _stats.shift_of(row_max)
    zs = z - shift
    new = {
        "row_max": row_max,
        "sum_exp": _stats.rescaled(st["sum_exp"], shift_old, shift)
        + jnp.sum(jnp.exp(zs), axis=1, keepdims=True),
        "label_logit": st["label_logit"]
        + jnp.sum(jnp.where(hit, z, 0), axis=1, keepdims=True),
    }
    if u is not None:
        moved = _numerics.weighted(u_seen, _stats.half_shifted(shift_old, shift))
        zh = _stats.half_shifted(z, shift)
        smooth = jnp.sum(_numerics.weighted(u, zh), axis=1, keepdims=True)
        new["smooth_xs"] = st["smooth_xs"] + moved + smooth
    if "sum_exs" in st:
        moment = _stats.rescaled_moment(st["sum_exs"], st["sum_exp"], shift_old, shift)
        exs = _numerics.weighted(jnp.exp(zs), zs)
        new["sum_exs"] = moment + jnp.sum(exs, axis=1, keepdims=True)
        # Boolean selects as logic: Mosaic cannot select between i1 vectors.
        winner = (any_nan & nan) | (~any_nan & (z == block_max))
        block_id = jnp.min(jnp.where(winner, col, jnp.inf), axis=1, keepdims=True)
        wins = _first_wins(block_max, block_id, old_max, st["best_id"])
        new["best_id"] = jnp.where(wins, block_id, st["best_id"])
    return new


def _first_wins(value_new, id_new, value_old, id_old):
    """``_stats.first_wins`` with its boolean select written as logic."""
    nan_new, nan_old = jnp.isnan(value_new), jnp.isnan(value_old)
    earlier = id_new < id_old
    larger = (value_new > value_old) | ((value_new == value_old) & earlier)
    return (nan_old & nan_new & earlier) | (~nan_old & (nan_new | larger))


def _times(coef, p):
    """``coef * p``, exactly 0 where ``coef`` is (``_stats.softmax_part``)."""
    return jnp.where(coef == 0, 0, coef * p)


def gradient_tile(z, zm, rows: dict, hit, u, opts: SoftmaxOptions):
    """``(dz, zs, p)``: ``blocks.logits_gradient`` of a tile from its capped
    logits ``z`` and masked ones ``zm``, per-row operands ``[tn, 1]``
    (``row_fields``), shifted logits ``zs`` and probabilities ``p``."""
    log_se = rows["log_se"]
    zs = zm - rows["shift"]
    p = jnp.exp(zs - log_se)
    dz = _times(rows["coef"], p)
    if "onehot" in rows:
        dz = dz - jnp.where(hit, rows["onehot"], 0)
    if "smoothing" in rows:
        dz = dz - rows["smoothing"] * u
    if "g_h" in rows:
        d_log_p = _numerics.weighted(p, zs - log_se + rows["entropy"])
        dz = dz - _times(rows["g_h"], d_log_p)
    if opts.logit_softcap is not None:
        dz = _numerics.weighted(dz, 1 - jnp.square(z / opts.logit_softcap))
    return _numerics.tempered(dz, opts.temperature), zs, p


def keep_tile(p, valid, spec: Spec):
    """Whether a tile's gradient is accumulated: not all of its (valid)
    probabilities below the filter's threshold (NaN counts as large);
    ``None`` without filtering."""
    if spec.threshold is None:
        return None
    p = jnp.where(jnp.isnan(p), jnp.inf, p)
    if valid is not None:
        p = jnp.where(valid, p, 0)
    return jnp.max(p) >= spec.threshold


def smoothing_column_sums(zs, rows: dict, ok):
    """The class weights' smoothing gradient of a tile, ``[1, tv]``:
    ``sum_i g_i (lse_i - z_ic)`` over valid rows, on real columns (``a / V``
    applies to the sum, in ``backward._class_weights_grad``)."""
    per = _numerics.weighted(rows["smoothing"], rows["log_se"] - zs)
    if ok is not None:
        per = jnp.where(ok, per, 0)
    return jnp.sum(per, axis=0, keepdims=True)


def both(a, b):
    """``a & b`` where either may be ``None`` (everywhere)."""
    if a is None or b is None:
        return b if a is None else a
    return a & b


def first_order_only(fn, num_arrays: int):
    """``fn`` (``num_arrays`` array arguments, then static ones) refusing to
    be differentiated, by name: Pallas kernels have no derivative rules, and
    grad of grad, ``jax.hessian`` or a jvp of the gradient through them
    failed with a bare ``AssertionError`` deep inside JAX."""

    def wrapped(*args):
        arrays, static = args[:num_arrays], args[num_arrays:]

        @jax.custom_jvp
        def run(*arrays):
            return fn(*arrays, *static)

        run.defjvp(_refuse_derivative)
        return run(*arrays)

    return wrapped


def _refuse_derivative(primals, tangents):
    raise NotImplementedError(
        "linear_cross_entropy's gradient cannot be differentiated with "
        "implementation='pallas_tpu' or 'pallas_triton' (grad of grad, "
        "jax.hessian, a jvp of the gradient): use implementation='xla' (its "
        "backward is differentiable) or 'reference'."
    )
