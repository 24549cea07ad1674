"""Small helpers that let the kernels run under every kind of JAX sharding.

Three regimes meet here: ``jax.shard_map`` (manual axes, whose values carry
the set of axes they vary over when ``check_vma=True``), GSPMD under
``jax.jit`` with ``Auto`` mesh axes (types carry no sharding; XLA partitions
the program) and ``Explicit`` mesh axes (jax's "sharding in types", the
default axis type of ``jax.make_mesh`` in recent jax), where every array's
type names the mesh axes it is split over and the program must say where a
reduction lands.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xent_jax import _compat


def axes_tuple(axis_name: Any) -> tuple[Any, ...]:
    """``axis_name`` (one name or a tuple of them) as a tuple."""
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def varying_axes(x: Any, axis_name: Any) -> tuple[Any, ...]:
    """The axes of ``axis_name`` over which ``x`` varies under ``check_vma``.

    Without ``check_vma`` (or outside ``shard_map``) JAX tracks no such type,
    and this is empty.
    """
    vma = _compat.varying_manual_axes(x)
    return tuple(a for a in axes_tuple(axis_name) if a in vma)


def explicit_spec(x: Any):
    """``x``'s PartitionSpec when its type carries one (Explicit axes), else None."""
    spec = getattr(_compat.type_sharding(x), "spec", None)
    if spec is None or all(s is None for s in spec):
        return None
    return spec


def explicit_axes(*arrays: Any) -> bool:
    """Whether any of ``arrays`` (``None`` allowed) is split over an Explicit
    mesh axis in its type."""
    return any(a is not None and explicit_spec(a) is not None for a in arrays)


def explicit_mesh(*arrays: Any):
    """The mesh named by the first of ``arrays`` split over Explicit axes."""
    for a in arrays:
        if a is not None and explicit_spec(a) is not None:
            return jax.typeof(a).sharding.mesh
    raise ValueError("no array is split over an Explicit mesh axis")


def reshard_to(x: jax.Array, spec: Any, mesh: Any) -> jax.Array:
    """``x`` placed on ``mesh`` as ``spec`` says, moved only if it is not."""
    ndim = jax.typeof(x).ndim
    have = tuple(explicit_spec(x) or ())
    have += (None,) * (ndim - len(have))
    want = tuple(spec) + (None,) * (ndim - len(spec))
    if have == want:
        return x
    return _compat.reshard(x, jax.sharding.NamedSharding(mesh, spec))


def class_axis_in_type(x: Any) -> bool:
    """Whether ``x``'s last (class) axis is split over an Explicit mesh axis.

    There a gather along the class axis cannot be typed without moving data,
    so the kernel reads the label's logit by a masked reduction instead.
    """
    spec = explicit_spec(x)
    return spec is not None and len(spec) == jax.typeof(x).ndim and spec[-1] is not None


def vocab_may_be_split() -> bool:
    """Whether GSPMD may split ``w``'s vocabulary in the program being traced
    without its type saying so.

    Not with one device, nor where every mesh axis is Manual (inside a
    ``shard_map``, each value is a device's block) or Explicit (types say how
    arrays are split, and a split ``w`` runs in a ``shard_map``:
    ``_linear.explicit``). With several devices and no mesh in context, or an
    ``Auto`` axis, a sharding the trace cannot see may split it.
    """
    if jax.device_count() == 1:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    auto = jax.sharding.AxisType.Auto
    return mesh.empty or any(t == auto for t in mesh.axis_types)


def like(ct: jax.Array, primal: Any) -> jax.Array:
    """``ct`` with the sharding in ``primal``'s type (a custom_vjp must return
    cotangents typed like its inputs; under Explicit axes the cotangent of a
    replicated label array computed from sharded logits is sharded)."""
    want, have = _compat.type_sharding(primal), _compat.type_sharding(ct)
    if _compat.reshard is None or want is None or have is None:
        return ct
    if explicit_spec(primal) is None and explicit_spec(ct) is None:
        return ct
    if tuple(want.spec) == tuple(have.spec):
        return ct
    return _compat.reshard(ct, want)


def match_varying(ct: jax.Array, primal: Any) -> jax.Array:
    """``ct`` with the varying axes of ``primal``'s type (``check_vma=True``).

    A custom_vjp's cotangent must vary over exactly the axes its input varies
    over. Where ``ct`` varies over more (``dw`` from examples split over a data
    axis, for a ``w`` replicated there), the input was implicitly broadcast and
    the transpose of that broadcast is a ``psum`` over those axes, as JAX's own
    autodiff does. Without ``check_vma`` no axes are tracked and this is a
    no-op.
    """
    extra = extra_varying(ct, primal)
    if extra:
        ct = jax.lax.psum(ct, extra)
    return varying_like(ct, primal)


def cotangent(ct: jax.Array, primal: Any) -> jax.Array:
    """A custom_vjp's cotangent for ``primal``: its dtype, shape and sharding,
    summed over the axes ``primal`` was replicated over (:func:`like`,
    :func:`match_varying`)."""
    ct = ct.astype(jnp.result_type(primal)).reshape(jnp.shape(primal))
    return match_varying(like(ct, primal), primal)


def zeros(shape, dtype, *refs: Any) -> jax.Array:
    """An accumulator of zeros varying like ``refs`` (:func:`varying_like`)."""
    return varying_like(jnp.zeros(shape, dtype), *refs)


def check_reduction_axes(axis_name: Any, reduction_axis_name: Any) -> None:
    """``reduction_axis_name`` (data parallelism) must not name a class axis."""
    if axis_name is None or reduction_axis_name is None:
        return
    shared = set(axes_tuple(axis_name)) & set(axes_tuple(reduction_axis_name))
    if shared:
        # The per-example losses are replicated over the class axes: a psum
        # there would count every example once per device.
        raise ValueError(
            f"reduction_axis_name names the data-parallel axes; {sorted(shared)} "
            "split the classes (axis_name), over which the per-example losses "
            "are already complete."
        )


def varying_like(tree: Any, *refs: Any) -> Any:
    """``tree``'s arrays, marked varying over every axis any array in ``refs``
    (pytrees, ``None`` allowed) varies over (no data moves; a no-op without
    ``check_vma``)."""
    vma = _compat.varying_manual_axes
    axes = frozenset().union(*(vma(r) for r in jax.tree.leaves(refs)))

    def cast(a):
        return _compat.to_varying(a, tuple(x for x in axes if x not in vma(a)))

    return jax.tree.map(cast, tree)


def extra_varying(ct: Any, primal: Any) -> tuple[Any, ...]:
    """The axes ``ct`` varies over and ``primal`` does not."""
    vma = _compat.varying_manual_axes
    return tuple(a for a in vma(ct) if a not in vma(primal))
