"""One process of ``tests/test_multiprocess.py``: joins JAX's distributed
runtime on localhost and checks the losses on a mesh spanning every process.

    python tests/multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID LOCAL_DEVICES

Every process makes the same global arrays from one seed, runs each case
sharded over all processes' devices, gathers the results to every host, and
compares them with the one-process result of the default implementation on
its own first device (float32 round-off: the sums run in another order). It
prints ``PASS <case>`` per case; any mismatch raises (exit status 1).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# xent_jax is imported once the runtime is up (main): importing it creates
# arrays, which starts the backend, and initialize must come first.
xj = None

N, D, V = 16, 8, 64
RTOL, ATOL = 2e-5, 2e-6


def _data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, V, N).astype("i4")
    labels[[3, 9]] = -100  # ignore_index
    return dict(
        x=rng.normal(size=(N, D)).astype("f4"),
        w=(0.5 * rng.normal(size=(D, V))).astype("f4"),
        labels=labels,
        segment_ids=np.repeat(np.arange(4), 4).astype("i4"),
        logits=(2 * rng.normal(size=(N, V))).astype("f4"),
        targets=rng.uniform(size=(N, V)).astype("f4"),
    )


DATA = _data()


def _global(mesh, spec, array):
    return jax.make_array_from_callback(
        array.shape, NamedSharding(mesh, spec), lambda index: array[index]
    )


def _gathered(tree):
    """Every output as a host array holding its global value."""
    return jax.tree.map(
        lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree
    )


def _one_process(fn, *args):
    with jax.default_device(jax.local_devices()[0]):
        return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def _check(name, got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=name)
    print(f"PASS {name}", flush=True)


def _fused(reduction, **opts):
    def loss(x, w, labels, segment_ids, **axes):
        extra = dict(segment_ids=segment_ids) if reduction == "mean_per_segment" else {}
        return xj.linear_cross_entropy(
            x,
            w,
            labels,
            ignore_index=-100,
            reduction=reduction,
            **opts,
            **axes,
            **extra,
        )

    return loss


FUSED_OPTIONS = {
    "mean": dict(),
    "sum, smoothing": dict(label_smoothing=0.1),
    "mean_per_segment, z-loss": dict(z_loss=1e-3),
}


def fused_cases(devices):
    """The fused loss vocabulary-parallel, data-parallel, and both on a 2-D
    mesh, under ``shard_map``: value, dx and dW against one process."""
    d = DATA
    meshes = {
        "vocabulary": (jax.make_mesh((devices,), ("v",)), P(), P(None, "v"), "v", None),
        "data": (jax.make_mesh((devices,), ("d",)), P("d"), P(), None, "d"),
        "2-D": (
            jax.make_mesh((2, devices // 2), ("d", "v")),
            P("d"),
            P(None, "v"),
            "v",
            "d",
        ),
    }
    for what, opts in FUSED_OPTIONS.items():
        reduction = what.split(",")[0]
        loss = _fused(reduction, **opts)
        args = (d["x"], d["w"], d["labels"], d["segment_ids"])
        want = _one_process(jax.value_and_grad(loss, argnums=(0, 1)), *args)
        for name, (mesh, rows, cols, axis, batch_axis) in meshes.items():
            if batch_axis is not None and reduction == "mean_per_segment":
                continue  # segments need every example on each device
            axes = dict(axis_name=axis, reduction_axis_name=batch_axis)

            def sharded(x, w, labels, segment_ids, axes=axes, loss=loss):
                return loss(x, w, labels, segment_ids, **axes)

            fn = jax.shard_map(
                sharded,
                mesh=mesh,
                in_specs=(rows, cols, rows, rows),
                out_specs=P(),
            )
            specs = (rows, cols, rows, rows)
            inputs = [_global(mesh, s, a) for s, a in zip(specs, args, strict=True)]
            got = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(*inputs)
            _check(f"fused {name}-parallel, {what}", _gathered(got), want)


def gspmd_cases(devices):
    """Global arrays from each process's own rows
    (``make_array_from_process_local_data``) under plain ``jit``: the fused
    loss, the core softmax and the BCE, batch-sharded by GSPMD."""
    d = DATA
    mesh = jax.make_mesh((devices,), ("d",))
    rows = NamedSharding(mesh, P("d"))
    per_process = N // jax.process_count()
    mine = slice(
        jax.process_index() * per_process, (jax.process_index() + 1) * per_process
    )

    def local(name, sharding=rows):
        array = d[name]
        return jax.make_array_from_process_local_data(
            sharding, array[mine], array.shape
        )

    replicated = NamedSharding(mesh, P())
    w = jax.make_array_from_callback(d["w"].shape, replicated, lambda i: d["w"][i])
    cases = {
        "fused": (
            lambda x, w, y: xj.linear_cross_entropy(x, w, y, ignore_index=-100),
            ("x", "w", "labels"),
        ),
        "softmax": (
            lambda z, y: xj.softmax_cross_entropy_with_integer_labels(
                z, y, ignore_index=-100, reduction="mean", z_loss=1e-3
            ),
            ("logits", "labels"),
        ),
        "bce": (
            lambda z, t: xj.sigmoid_binary_cross_entropy(z, t).mean(),
            ("logits", "targets"),
        ),
    }
    for name, (loss, names) in cases.items():
        fn = jax.value_and_grad(loss, argnums=(0, 1) if name != "softmax" else 0)
        inputs = [w if n == "w" else local(n) for n in names]
        assert np.array_equal(_gathered(inputs[0]), d[names[0]])  # the rows' order
        got = jax.jit(fn)(*inputs)
        want = _one_process(fn, *(d[n] for n in names))
        _check(f"GSPMD batch-sharded {name}", _gathered(got), want)


def core_class_sharded(devices):
    """The core softmax with the classes split over every process's devices
    (``axis_name``), and batch-split (``reduction_axis_name``)."""
    d = DATA
    for name, axis, spec in (("class", "v", P(None, "v")), ("batch", "d", P("d"))):
        mesh = jax.make_mesh((devices,), (axis,))
        axes = dict(axis_name="v") if axis == "v" else dict(reduction_axis_name="d")
        label_spec = P() if axis == "v" else P("d")

        def loss(z, y, axes=axes):
            return xj.softmax_cross_entropy_with_integer_labels(
                z, y, ignore_index=-100, reduction="mean", label_smoothing=0.1, **axes
            )

        fn = jax.shard_map(loss, mesh=mesh, in_specs=(spec, label_spec), out_specs=P())
        inputs = (
            _global(mesh, spec, d["logits"]),
            _global(mesh, label_spec, d["labels"]),
        )
        got = jax.jit(jax.value_and_grad(fn))(*inputs)
        want = _one_process(
            jax.value_and_grad(
                lambda z, y: xj.softmax_cross_entropy_with_integer_labels(
                    z, y, ignore_index=-100, reduction="mean", label_smoothing=0.1
                )
            ),
            d["logits"],
            d["labels"],
        )
        _check(f"softmax {name}-sharded", _gathered(got), want)


def uneven_vocabulary(devices):
    """A vocabulary that the mesh does not divide (V - 2 classes over every
    device): ``shard_map`` refuses ``w`` with JAX's error naming the
    argument and both sizes; padded to a multiple with ``num_classes`` (as
    docs/many_devices.md shows), the loss is the unpadded one-process loss
    and the padding's dW is zero."""
    d = DATA
    v = V - 2
    w, labels = d["w"][:, :v], np.where(d["labels"] < v, d["labels"], 0)
    mesh = jax.make_mesh((devices,), ("v",))

    def loss(x, w, labels, **opts):
        return xj.linear_cross_entropy(
            x, w, labels, ignore_index=-100, label_smoothing=0.1, **opts
        )

    def sharded(w):
        fn = jax.shard_map(
            lambda x, w, y: loss(x, w, y, axis_name="v", num_classes=v),
            mesh=mesh,
            in_specs=(P(), P(None, "v"), P()),
            out_specs=P(),
        )
        return jax.value_and_grad(fn, argnums=(0, 1))(d["x"], w, labels)

    try:
        sharded(w)
    except ValueError as e:
        assert f"does not evenly divide {v}" in str(e) and "'w'" in str(e), e
    else:
        raise AssertionError("shard_map accepted a vocabulary the mesh does not divide")
    print("PASS uneven vocabulary refused by shard_map", flush=True)
    padded = np.pad(w, ((0, 0), (0, V - v)))
    got = jax.jit(sharded)(_global(mesh, P(None, "v"), padded))
    want = _one_process(jax.value_and_grad(loss, argnums=(0, 1)), d["x"], w, labels)
    value, (dx, dw) = _gathered(got)
    assert not dw[:, v:].any(), "the padded columns got a gradient"
    _check("uneven vocabulary padded, num_classes", (value, (dx, dw[:, :v])), want)


def training_loop(devices):
    """Three adamw steps of a small LM head (a tanh layer, then the fused loss
    vocabulary-parallel over every process's devices): every process ends with
    bit-identical parameters, equal to one process's run."""
    import optax

    d = DATA
    rng = np.random.default_rng(1)
    params = dict(
        h=(0.3 * rng.normal(size=(D, D))).astype("f4"), w=d["w"], b=np.zeros(V, "f4")
    )
    optimizer = optax.adamw(1e-2)

    def objective(params, x, labels, **axes):
        z = jnp.tanh(x @ params["h"])
        return xj.linear_cross_entropy(
            z, params["w"], labels, bias=params["b"], ignore_index=-100, **axes
        )

    def train(params, step_loss):
        opt_state = optimizer.init(params)

        @jax.jit
        def step(params, opt_state):
            loss, grads = jax.value_and_grad(step_loss)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        for _ in range(3):
            params, opt_state, loss = step(params, opt_state)
        return params, loss

    mesh = jax.make_mesh((devices,), ("v",))
    specs = dict(h=P(), w=P(None, "v"), b=P("v"))
    sharded = jax.shard_map(
        lambda p, x, y: objective(p, x, y, axis_name="v"),
        mesh=mesh,
        in_specs=(specs, P(), P()),
        out_specs=P(),
    )
    x, y = _global(mesh, P(), d["x"]), _global(mesh, P(), d["labels"])
    start = {k: _global(mesh, specs[k], v) for k, v in params.items()}
    got = _gathered(train(start, lambda p: sharded(p, x, y)))
    multihost_utils.assert_equal(got, "the processes' parameters differ")
    with jax.default_device(jax.local_devices()[0]):
        want = jax.tree.map(
            np.asarray, train(params, lambda p: objective(p, d["x"], d["labels"]))
        )
    _check("adamw on a vocabulary-parallel LM head, 3 steps", got, want)


def main(argv: list[str]) -> None:
    """Joins the runtime (the launcher sets ``XLA_FLAGS`` for the local CPU
    devices) and runs every case; with ``fault`` the last process exits
    right after joining, before any collective; ``wrong-count`` only
    shortens the timeouts (the launcher starts fewer processes than
    ``NUM_PROCESSES``)."""
    port, num_processes, process_id, local_devices = map(int, argv[:4])
    fault = argv[4:] == ["fault"]
    # The bad-setup cases ("fault", "wrong-count") shorten how long a process
    # waits for the others to join (JAX's default: 300 s) and how soon it
    # learns of a dead one (100 s); the passing runs keep long timeouts, so a
    # loaded machine never trips them.
    short = bool(argv[4:])
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=10 if short else 60,
        heartbeat_timeout_seconds=10 if short else 100,
    )
    if fault and process_id == num_processes - 1:
        os._exit(3)  # no shutdown: as a process that dies
    global xj
    import xent_jax as xj

    devices = jax.device_count()
    assert devices == num_processes * local_devices, devices
    fused_cases(devices)
    gspmd_cases(devices)
    core_class_sharded(devices)
    uneven_vocabulary(devices)
    training_loop(devices)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
