"""The fused loss under Explicit mesh axes ("sharding in types").

With Explicit mesh axes every array's type says how it is split, and the
kernel's slicing of split axes cannot be typed; inside ``shard_map`` it runs
on each device's block instead, exactly as under ``axis_name`` (the axes that
split ``w``'s vocabulary), with the examples split as ``x``'s leading axes
are. Inputs placed otherwise (``w`` or ``x`` split over ``D``, labels placed
unlike ``x``) are resharded first.
"""

from __future__ import annotations

import dataclasses

import jax

from xent_jax import _sharding


def in_shard_map(per_example, x, w, bias, labels, class_weights, opts, rows: bool):
    """``per_example(x, w, bias, labels, class_weights, opts)`` (per-example
    outputs with ``x``'s leading shape) run inside ``jax.shard_map`` over the
    mesh of the inputs' Explicit sharding types, with ``opts.axis_name`` the
    axes that split the vocabulary. ``w`` is ``[V, D]`` when ``rows``."""
    arrays = (x, w, bias, class_weights, *labels)
    mesh = _sharding.explicit_mesh(*arrays)
    x_spec = tuple(_sharding.explicit_spec(x) or ())
    batch = (x_spec[: x.ndim - 1] + (None,) * x.ndim)[: x.ndim - 1]
    vocab = (tuple(_sharding.explicit_spec(w) or ()) + (None, None))[0 if rows else 1]
    P = jax.sharding.PartitionSpec
    specs = (
        P(*batch, None),
        P(vocab, None) if rows else P(None, vocab),
        P(vocab),
        type(labels)(*(P(*batch),) * len(labels)),
        P(vocab),
    )
    placed = [
        None if a is None else _sharding.reshard_to(a, spec, mesh)
        for a, spec in zip((x, w, bias), specs, strict=False)
    ]
    placed.append(
        type(labels)(*(_sharding.reshard_to(f, P(*batch), mesh) for f in labels))
    )
    placed.append(
        None
        if class_weights is None
        else _sharding.reshard_to(class_weights, P(vocab), mesh)
    )
    inner = dataclasses.replace(opts, axis_name=vocab)
    return jax.shard_map(
        lambda *a: per_example(*a, inner),
        mesh=mesh,
        in_specs=specs,
        out_specs=P(*batch),  # every per-example output
    )(*placed)
