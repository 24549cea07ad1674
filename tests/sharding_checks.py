"""Multi-device checks of xent_jax, on 8 simulated CPU devices.

JAX fixes its device count when it starts, so these run in a fresh process
(``tests/test_sharding.py`` launches one per case); the flag below is set
before JAX is imported. Run by hand::

    python tests/sharding_checks.py            # every case
    python tests/sharding_checks.py gspmd vocab_parallel

Each case compares values and gradients on the meshes (data x model) 8x1, 4x2,
2x4 and 1x8 with the single-device result, raises ``AssertionError`` on a
mismatch, and prints one JSON line ``{"case": ..., ...}`` with what it
measured (largest errors, largest collective in the compiled HLO).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import xent_jax  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
N, C = 16, 48  # batch and classes: divisible by every mesh axis above
RTOL, ATOL = 2e-5, 2e-6


def _mesh(shape, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, ("data", "model"), axis_types=(kind, kind))


def _close(got, want, what, rtol=RTOL, atol=ATOL):
    """Asserts allclose leaf by leaf; returns the largest absolute error."""
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (what, g.shape, w.shape)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=what)
        both = np.isfinite(w)
        if both.any():
            worst = max(worst, float(np.max(np.abs(g - w)[both])))
    return worst


def _data(seed=0, n=N, c=C):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)).astype(np.float32) * 2
    labels = rng.integers(0, c, n).astype(np.int32)
    labels[1] = -100  # ignored
    soft = rng.dirichlet(np.ones(c), n).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, c).astype(np.float32)
    keep = rng.random((n, c)) > 0.25
    keep[np.arange(n), np.maximum(labels, 0)] = True  # labels stay unmasked
    keep[3] = False  # a fully masked row: loss 0, gradient 0
    cot = rng.normal(size=n).astype(np.float32)
    return {
        "logits": jnp.asarray(logits),
        "labels": jnp.asarray(labels),
        "soft": jnp.asarray(soft),
        "weights": jnp.asarray(weights),
        "keep": jnp.asarray(keep),
        "cot": jnp.asarray(cot),
    }


# --- HLO inspection -----------------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>all-gather|all-to-all|all-reduce|"
    r"collective-permute|reduce-scatter|collective-broadcast)(?:-start)?\("
)
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def collectives(hlo: str) -> dict[str, int]:
    """Largest result (in elements) of each kind of collective in ``hlo``."""
    largest: dict[str, int] = {}
    for match in _COLLECTIVE.finditer(hlo):
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dims in _SHAPE.findall(match["type"])
        ]
        op = match["op"]
        largest[op] = max(largest.get(op, 0), max(sizes, default=0))
    return largest


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_TYPED_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def _group_size(line: str) -> int:
    """Devices per replica group of a collective's HLO line (1 if none)."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota[2])
    listed = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    return len(listed[1].split(",")) if listed else 1


def _executions(hlo: str) -> tuple[dict[int, str], dict[str, int]]:
    """``(computation of each line, executions of each computation)``: a
    while loop's body runs its ``known_trip_count`` times per run of the
    computation holding the loop (1 where the count is not known), a called
    computation once per call."""
    owner, parent, trips, current = {}, {}, {}, None
    for number, line in enumerate(hlo.splitlines()):
        head = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            current = head[1]
            continue
        owner[number] = current
        body = re.search(r"\bbody=%([\w.\-]+)", line)
        if body:
            count = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            parent[body[1]], trips[body[1]] = current, int(count[1]) if count else 1
        for called in re.findall(r"\b(?:calls|to_apply)=%([\w.\-]+)", line):
            parent.setdefault(called, current)

    def runs(name, depth=0):
        if name not in parent or depth > 64:
            return 1
        return trips.get(name, 1) * runs(parent[name], depth + 1)

    return owner, {name: runs(name) for name in set(owner.values()) if name}


def collective_bytes(hlo: str) -> dict[str, tuple[int, int, int]]:
    """``{kind: (count, bytes, largest)}`` of the collectives one run of
    ``hlo`` executes, per device: their operands' bytes summed over every
    execution (a loop's body counts its trip count times; an all-gather's
    operand is its result over the group, a reduce-scatter's its result times
    the group, an async start's type holds the operand first), and the
    largest single operand in bytes."""
    owner, runs = _executions(hlo)
    found: dict[str, tuple[int, int, int]] = {}
    for number, line in enumerate(hlo.splitlines()):
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        sizes = [
            _BYTES.get(dtype, 8 if dtype.endswith("64") else 4)
            * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dtype, dims in _TYPED_SHAPE.findall(match["type"])
        ]
        op, group = match["op"], _group_size(line)
        if f"{op}-start(" in line and op != "all-reduce":
            size = sizes[0]
        elif op == "all-gather":
            size = sum(sizes) // group
        elif op == "reduce-scatter":
            size = sum(sizes) * group
        else:
            size = sum(sizes)
        times = runs.get(owner.get(number), 1)
        count, total, largest = found.get(op, (0, 0, 0))
        found[op] = (count + times, total + times * size, max(largest, size))
    return found


def _assert_only_scalars_move(hlo, per_device_logits, what, allow_all_reduce=None):
    """No all-gather / all-to-all of anything near logits-size; all-reduces of
    per-example scalars only (or up to ``allow_all_reduce`` elements)."""
    found = collectives(hlo)
    moving = {k: v for k, v in found.items() if k != "all-reduce"}
    limit = per_device_logits // 4
    assert all(v < limit for v in moving.values()), (what, found)
    if allow_all_reduce is not None:
        assert found.get("all-reduce", 0) <= allow_all_reduce, (what, found)
    return found


# --- cases ----------------------------------------------------------------------


def _softmax_losses(d, axis_name=None, reduction_axis_name=None, keep=None):
    """Integer- and soft-label losses with every option, for each reduction."""
    opts = dict(label_smoothing=0.1, z_loss=1e-3, axis_name=axis_name)
    out = {}
    for reduction in ("none", "sum", "mean"):
        rn = reduction_axis_name if reduction != "none" else None
        out["int_" + reduction] = xent_jax.softmax_cross_entropy_with_integer_labels(
            d["logits"],
            d["labels"],
            where=keep,
            ignore_index=-100,
            class_weights=d["weights"],
            reduction=reduction,
            reduction_axis_name=rn,
            **opts,
        )
        if reduction == "sum":
            continue  # the same reduce_loss path as for integer labels
        out["focal_" + reduction] = xent_jax.softmax_focal_loss(
            d["logits"],
            d["labels"],
            gamma=2.0,
            alpha=d["weights"],
            where=keep,
            ignore_index=-100,
            reduction=reduction,
            axis_name=axis_name,
            reduction_axis_name=rn,
        )
        out["soft_" + reduction] = xent_jax.softmax_cross_entropy(
            d["logits"],
            d["soft"],
            where=keep,
            class_weights=d["weights"],
            reduction=reduction,
            reduction_axis_name=rn,
            **opts,
        )
    return out


def _value_and_grads(fn, d):
    """``fn(d) -> dict of losses``; each output's gradient w.r.t. the logits and
    the soft labels, from one forward pass (one ``jax.vjp``, pulled back once
    per output: compiling a ``jax.grad`` per output is much slower)."""
    values, pullback = jax.vjp(
        lambda logits, soft: fn({**d, "logits": logits, "soft": soft}),
        d["logits"],
        d["soft"],
    )
    grads = {}
    for key, value in values.items():
        # A random per-example cotangent for "none" (a plain sum would hide a
        # wrong per-example gradient), an arbitrary scale for the scalars.
        cot = {k: jnp.zeros_like(v) for k, v in values.items()}
        cot[key] = d["cot"] if value.ndim else jnp.asarray(1.7, value.dtype)
        grads[key] = pullback(cot)
    return values, grads


def case_vocab_parallel():
    """shard_map, classes split over "model" (axis_name) and examples over
    "data" (reduction_axis_name): every option, every reduction."""
    d = _data()
    want = jax.jit(
        lambda d: _value_and_grads(lambda d: _softmax_losses(d, keep=d["keep"]), d)
    )(d)
    errors = {}
    for shape in MESHES:
        mesh = _mesh(shape)
        row, cls = P("data"), P("data", "model")
        specs = {
            "logits": cls,
            "labels": row,
            "soft": cls,
            "weights": P("model"),
            "keep": cls,
            "cot": row,
        }
        out_specs = {k: row if k.endswith("_none") else P() for k in want[0]}

        @functools.partial(
            jax.shard_map, mesh=mesh, in_specs=(specs,), out_specs=out_specs
        )
        def sharded(d):
            return _softmax_losses(
                d, axis_name="model", reduction_axis_name="data", keep=d["keep"]
            )

        got = jax.jit(lambda d, f=sharded: _value_and_grads(f, d))(d)
        errors[f"{shape[0]}x{shape[1]}"] = _close(got, want, f"mesh {shape}")
    return {"max_abs_error": errors}


def case_megatron_smoothing():
    """Regression for Megatron-LM #737 / #7464: under vocabulary parallelism
    label smoothing must spread a/C over the GLOBAL classes. Megatron used
    each shard's C_local, which gives a different (wrong) loss."""
    d = _data(1)
    d["labels"] = jnp.maximum(d["labels"], 0)
    a = 0.2
    want = xent_jax.softmax_cross_entropy_with_integer_labels(
        d["logits"], d["labels"], label_smoothing=a
    )
    results = {}
    for shape in ((1, 8), (2, 4)):
        mesh = _mesh(shape)

        @functools.partial(
            jax.shard_map,
            mesh=mesh,
            in_specs=(P("data", "model"), P("data")),
            out_specs=P("data"),
        )
        def sharded(logits, labels):
            return xent_jax.softmax_cross_entropy_with_integer_labels(
                logits, labels, label_smoothing=a, axis_name="model"
            )

        got = jax.jit(sharded)(d["logits"], d["labels"])
        _close(got, want, f"mesh {shape}")
        # What the local-C formula gives, to show the test would catch it:
        # smoothing mass a/C_local on each of the C classes sums to a*shards.
        c_local = C // shape[1]
        lse = jax.nn.logsumexp(d["logits"], axis=-1)
        nll = lse - jnp.take_along_axis(d["logits"], d["labels"][:, None], 1)[:, 0]
        smooth_local = jnp.sum(lse[:, None] - d["logits"], axis=-1) / c_local
        megatron = (1 - a) * nll + a * smooth_local
        gap = float(jnp.max(jnp.abs(megatron - want)))
        assert gap > 1.0, gap
        results[f"{shape[0]}x{shape[1]}"] = {"megatron_style_gap": gap}
    return results


def case_padded_vocab():
    """C = 45 classes padded to 48 (a multiple of 8 shards) with -inf logits
    masked by ``where``: equals the unpadded single-device loss, smoothing's C
    being 45, under shard_map and under GSPMD."""
    d = _data(2, c=45)
    pad = C - 45
    opts = dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=-100)
    w = d["weights"]
    want_fn = jax.value_and_grad(
        lambda x: jnp.sum(
            d["cot"]
            * xent_jax.softmax_cross_entropy_with_integer_labels(
                x, d["labels"], class_weights=w, **opts
            )
        )
    )
    want = jax.jit(want_fn)(d["logits"])
    logits = jnp.pad(d["logits"], ((0, 0), (0, pad)), constant_values=-jnp.inf)
    weights = jnp.pad(w, (0, pad), constant_values=1.0)
    valid = jnp.broadcast_to(jnp.arange(C) < 45, logits.shape)

    def padded(x, labels, weights, valid, cot, axis_name=None):
        return jnp.sum(
            cot
            * xent_jax.softmax_cross_entropy_with_integer_labels(
                x,
                labels,
                where=valid,
                class_weights=weights,
                axis_name=axis_name,
                **opts,
            )
        )

    errors = {}
    for shape in ((1, 8), (2, 4)):
        mesh = _mesh(shape)

        sharded = jax.shard_map(
            lambda x, labels, weights, cot: _padded_body(
                padded, x, labels, weights, cot
            ),
            mesh=mesh,
            in_specs=(P("data", "model"), P("data"), P("model"), P("data")),
            out_specs=(P(), P("data", "model")),
        )
        value, grad = jax.jit(sharded)(logits, d["labels"], weights, d["cot"])
        key = f"shard_map {shape[0]}x{shape[1]}"
        errors[key] = _close((value, grad[:, :45]), want, key)
        assert np.all(np.asarray(grad[:, 45:]) == 0), "padding got a gradient"

        # GSPMD: the same padded arrays placed on the mesh, no shard_map.
        put = lambda a, *s, mesh=mesh: jax.device_put(a, NamedSharding(mesh, P(*s)))  # noqa: E731
        args = (
            put(logits, "data", "model"),
            put(d["labels"], "data"),
            put(weights, "model"),
            put(valid, "data", "model"),
            put(d["cot"], "data"),
        )
        value, grad = jax.jit(jax.value_and_grad(padded))(*args)
        key = f"gspmd {shape[0]}x{shape[1]}"
        errors[key] = _close((value, grad[:, :45]), want, key)
        assert np.all(np.asarray(grad[:, 45:]) == 0), "padding got a gradient"
    return {"max_abs_error": errors}


def _padded_body(padded, x, labels, weights, cot):
    ids = jax.lax.axis_index("model") * x.shape[-1] + jnp.arange(x.shape[-1])
    valid = jnp.broadcast_to(ids < 45, x.shape)
    value, grad = jax.value_and_grad(padded)(x, labels, weights, valid, cot, "model")
    return jax.lax.psum(value, "data"), grad


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def case_data_parallel():
    """reduction="mean" with reduction_axis_name: the update inside shard_map
    (replicated parameters, examples split over "data", classes over "model"
    for the last layer) equals the one-big-batch update, with check_vma on
    (no explicit psum: JAX sums replicated parameters' gradients) and off
    (the classic explicit psum). Devices get unequal numbers of scored
    examples, so a mean of per-device means would be wrong."""
    rng = np.random.default_rng(3)
    n, f, h = 32, 6, 8
    x = jnp.asarray(rng.normal(size=(n, f)), jnp.float32)
    y = rng.integers(0, C, n).astype(np.int32)
    y[:7] = -100  # all on the first data shard(s): unequal denominators
    y = jnp.asarray(y)
    cw = jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32)
    params = {
        "w1": jnp.asarray(rng.normal(size=(f, h)), jnp.float32),
        "b1": jnp.zeros(h),
        "w2": jnp.asarray(rng.normal(size=(h, C)), jnp.float32),
        "b2": jnp.zeros(C),
    }

    def loss(params, x, y, cw, **kw):
        return xent_jax.softmax_cross_entropy_with_integer_labels(
            _mlp(params, x),
            y,
            ignore_index=-100,
            class_weights=cw,
            label_smoothing=0.1,
            reduction="mean",
            **kw,
        )

    want = jax.jit(jax.value_and_grad(loss))(params, x, y, cw)
    errors = {}
    for shape in MESHES:
        mesh = _mesh(shape)
        # The last layer is split over "model" (vocabulary parallelism).
        pspec = {"w1": P(), "b1": P(), "w2": P(None, "model"), "b2": P("model")}
        # check_vma=False (the classic explicit psum) on the 2-D meshes only.
        for check_vma in (True, False) if 1 not in shape else (True,):

            def step(params, x, y, cw, check_vma=check_vma):
                value, grads = jax.value_and_grad(loss)(
                    params, x, y, cw, axis_name="model", reduction_axis_name="data"
                )
                if not check_vma:
                    # Without vma types nothing sums the per-device shares.
                    grads = jax.lax.psum(grads, "data")
                    # w1, b1 feed every class shard: their shares are per
                    # "model" device too.
                    grads["w1"], grads["b1"] = jax.lax.psum(
                        (grads["w1"], grads["b1"]), "model"
                    )
                return value, grads

            sharded = jax.shard_map(
                step,
                mesh=mesh,
                in_specs=(pspec, P("data"), P("data"), P("model")),
                out_specs=(P(), pspec),
                check_vma=check_vma,
            )
            got = jax.jit(sharded)(params, x, y, cw)
            key = f"{shape[0]}x{shape[1]} check_vma={check_vma}"
            errors[key] = _close(got, want, key)

    # Gradient accumulation: two micro-batches with normalizer = the global
    # denominator add up to the one-big-batch gradient.
    den = jnp.sum(jnp.where(y != -100, cw[jnp.maximum(y, 0)], 0))
    halves = [slice(0, n // 2), slice(n // 2, n)]
    acc = [
        jax.value_and_grad(loss)(params, x[s], y[s], cw, normalizer=den) for s in halves
    ]
    total = jax.tree.map(lambda a, b: a + b, *acc)
    errors["accumulation"] = _close(total, want, "gradient accumulation")
    # ... and the naive mean of micro-batch means is not (the test has teeth).
    naive = jax.tree.map(
        lambda a, b: (a + b) / 2,
        *[jax.value_and_grad(loss)(params, x[s], y[s], cw) for s in halves],
    )
    assert abs(float(naive[0]) - float(want[0])) > 1e-3
    return {"max_abs_error": errors}


def _gspmd_losses():
    losses = {
        "int": lambda x, d: xent_jax.softmax_cross_entropy_with_integer_labels(
            x,
            d["labels"],
            where=d["keep"],
            ignore_index=-100,
            class_weights=d["weights"],
            label_smoothing=0.1,
            z_loss=1e-3,
        ),
        "soft": lambda x, d: xent_jax.softmax_cross_entropy(
            x,
            d["soft"],
            where=d["keep"],
            class_weights=d["weights"],
            label_smoothing=0.1,
            z_loss=1e-3,
        ),
        "bce": lambda x, d: xent_jax.sigmoid_binary_cross_entropy(
            x, d["soft"] * C / 2, weights=d["keep"].astype(jnp.float32)
        ),
    }
    return losses


def _gspmd_objective(loss, x, d):
    out = loss(x, d)
    if out.ndim == 2:
        return jnp.sum(out * d["cot"][:, None]) / out.size
    return jnp.sum(out * d["cot"])


def _placed(d, mesh, soft_spec=("data", "model")):
    cls = NamedSharding(mesh, P("data", "model"))
    row = NamedSharding(mesh, P("data"))
    specs = {
        "logits": cls,
        "labels": row,
        "soft": NamedSharding(mesh, P(*soft_spec)),
        "weights": NamedSharding(mesh, P("model")),
        "keep": cls,
        "cot": row,
    }
    return {k: jax.device_put(v, specs[k]) for k, v in d.items()}


def case_gspmd(explicit=False):
    """jax.jit with NamedSharding inputs (logits on data x model): values and
    gradients (logits, soft labels) equal one device's, and the compiled HLO
    moves only per-example scalars."""
    d = _data(4)
    losses = _gspmd_losses()
    report = {}
    for name, loss in losses.items():
        fn = jax.value_and_grad(
            lambda x, soft, d, loss=loss: _gspmd_objective(
                loss, x, {**d, "soft": soft}
            ),
            argnums=(0, 1),
        )
        want = jax.jit(fn)(d["logits"], d["soft"], d)
        for shape in MESHES:
            mesh = _mesh(shape, explicit)
            # Explicit axes: the soft labels also come replicated over the
            # class axis, whose cotangent must then come back replicated.
            soft_spec = ("data", None) if explicit and shape == (2, 4) else None
            dd = _placed(d, mesh, soft_spec or ("data", "model"))
            # Compiled once: for the values and for the collectives it holds.
            compiled = jax.jit(fn).lower(dd["logits"], dd["soft"], dd).compile()
            got = compiled(dd["logits"], dd["soft"], dd)
            key = f"{name} {shape[0]}x{shape[1]}"
            err = _close(got, want, key)
            hlo = compiled.as_text()
            per_device = N * C // (shape[0] * shape[1])
            if soft_spec is None:
                found = _assert_only_scalars_move(
                    hlo, per_device, key, allow_all_reduce=N // shape[0]
                )
            else:
                # Labels replicated over the classes want their gradient
                # replicated too: that gather is the caller's placement.
                found = collectives(hlo)
            report[key] = {"max_abs_error": err, "collectives": found}
            if not explicit:
                out_sharding = got[1][0].sharding
                assert out_sharding.spec == P("data", "model"), (key, out_sharding)
    return report


def case_gspmd_explicit():
    """The same with Explicit mesh axes (sharding in types, the default of
    ``jax.make_mesh`` in recent jax)."""
    return case_gspmd(explicit=True)


def case_gspmd_linear(explicit=False):
    """linear_cross_entropy under GSPMD: x on "data", w and bias on the
    vocabulary ("model"): no all-gather of W or of the logits."""
    fused = getattr(xent_jax, "linear_cross_entropy", None)
    if fused is None:
        return {"skipped": "xent_jax.linear_cross_entropy is not available"}
    rng = np.random.default_rng(5)
    n, dim, v = 32, 16, 256
    x = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(dim, v)) * 0.3, jnp.float32)
    b = jnp.asarray(rng.normal(size=v) * 0.3, jnp.float32)
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32)

    def fn(x, w, b, y):
        return fused(
            x, w, y, bias=b, label_smoothing=0.1, z_loss=1e-3, reduction="mean"
        )

    vg = jax.value_and_grad(fn, argnums=(0, 1, 2))
    want = jax.jit(vg)(x, w, b, y)
    report = {}
    for shape in MESHES:
        mesh = _mesh(shape, explicit)
        args = (
            jax.device_put(x, NamedSharding(mesh, P("data"))),
            jax.device_put(w, NamedSharding(mesh, P(None, "model"))),
            jax.device_put(b, NamedSharding(mesh, P("model"))),
            jax.device_put(y, NamedSharding(mesh, P("data"))),
        )
        compiled = jax.jit(vg).lower(*args).compile()
        got = compiled(*args)
        key = f"{shape[0]}x{shape[1]}"
        err = _close(got, want, key, rtol=1e-4, atol=1e-5)
        found = collectives(compiled.as_text())
        moving = {k: s for k, s in found.items() if k != "all-reduce"}
        # A W-sized or logits-sized gather is what must not happen. (dW's
        # all-reduce over "data" and dx's over "model" are the matmuls' own.)
        limit = min(dim * v // shape[1], n * v // (shape[0] * shape[1])) // 4
        assert all(s < max(limit, 1) for s in moving.values()), (key, found)
        report[key] = {"max_abs_error": err, "collectives": found}
    return report


def case_linear_vocab_parallel():
    """linear_cross_entropy(axis_name="model") inside shard_map, in a training
    step (a replicated hidden layer, the head's w and bias split over "model",
    examples over "data"): values and gradients equal the one-device loss for
    every option, with check_vma on and off; the vocabulary of 45 classes is
    padded to 48 with random columns that num_classes masks out; only
    per-example scalars (and dx's parts, dW over "data") cross devices."""
    rng = np.random.default_rng(8)
    n, f, h, v = 32, 6, 8, 45
    x = jnp.asarray(rng.normal(size=(n, f)), jnp.float32)
    y = rng.integers(0, v, n).astype(np.int32)
    y[:5] = -100  # unequal denominators across data shards
    y[-1] = v - 1  # a label in the last shard's last real column
    y = jnp.asarray(y)
    cot = jnp.asarray(rng.normal(size=n), jnp.float32)
    params = {
        "w1": jnp.asarray(rng.normal(size=(f, h)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=h) * 0.1, jnp.float32),
        "w": jnp.asarray(rng.normal(size=(h, v)) * 0.5, jnp.float32),
        "b": jnp.asarray(rng.normal(size=v) * 0.1, jnp.float32),
    }
    cw = jnp.asarray(rng.uniform(0.5, 2.0, v), jnp.float32)
    pad = C - v  # 48 columns: divisible by every mesh's "model" axis
    padded = {
        **params,
        "w": jnp.pad(params["w"], ((0, 0), (0, pad)))
        + jnp.pad(
            jnp.asarray(rng.normal(size=(h, pad)) * 5, jnp.float32), ((0, 0), (v, 0))
        ),
        "b": jnp.pad(params["b"], (0, pad), constant_values=3.0),
    }
    cw_padded = jnp.pad(cw, (0, pad), constant_values=7.0)
    # Small blocks: the loops (and the filter's cond) run several steps, whose
    # carries must be typed alike under check_vma.
    variants = {
        "all_options": dict(
            label_smoothing=0.1,
            z_loss=1e-3,
            logit_softcap=4.0,
            class_weights=True,
            block_size=(3, 2),
        ),
        "filtered_exact": dict(
            filter_threshold=0.0, class_weights=True, block_size=(3, 2)
        ),
    }

    def objective(params, x, y, cot, cw, opts, check_vma=True, **kw):
        """The global mean plus per-example terms (a random cotangent on the
        "none" losses and on lse); returns it with its two parts."""
        opts = dict(opts)
        opts["class_weights"] = cw if opts.get("class_weights") else None
        hid = jnp.tanh(x @ params["w1"] + params["b1"])
        common = dict(bias=params["b"], ignore_index=-100, num_classes=v, **opts)
        rn = kw.pop("reduction_axis_name", None)
        mean = xent_jax.linear_cross_entropy(
            hid, params["w"], y, reduction_axis_name=rn, **common, **kw
        )
        none, lse = xent_jax.linear_cross_entropy(
            hid, params["w"], y, reduction="none", return_lse=True, **common, **kw
        )
        local = jnp.sum(cot * none) + 0.1 * jnp.sum(cot * lse)
        if rn is not None and check_vma:
            # A typed shard_map differentiates the sum over devices of a
            # varying output: make the objective invariant over "data".
            local = jax.lax.psum(local, rn)
        return mean + local, (mean, local)

    report = {}
    for name, opts in variants.items():
        opts = tuple(opts.items())
        (_, want_parts), want_grads = jax.jit(
            jax.value_and_grad(objective, has_aux=True), static_argnums=5
        )(params, x, y, cot, cw, opts)
        for shape in MESHES:
            mesh = _mesh(shape)
            pspec = {"w1": P(), "b1": P(), "w": P(None, "model"), "b": P("model")}
            for check_vma in (True, False):

                def step(params, x, y, cot, cw, opts=opts, check_vma=check_vma):
                    (_, (mean, local)), grads = jax.value_and_grad(
                        objective, has_aux=True
                    )(
                        params,
                        x,
                        y,
                        cot,
                        cw,
                        opts,
                        check_vma,
                        axis_name="model",
                        reduction_axis_name="data",
                    )
                    if not check_vma:
                        # Without vma types the caller sums the shares: over
                        # "data" for every parameter, and over "model" for
                        # those before the head (dx's parts), as for x @ w.
                        local = jax.lax.psum(local, "data")
                        grads = jax.lax.psum(grads, "data")
                        grads["w1"], grads["b1"] = jax.lax.psum(
                            (grads["w1"], grads["b1"]), "model"
                        )
                    return (mean, local), grads

                sharded = jax.jit(
                    jax.shard_map(
                        step,
                        mesh=mesh,
                        in_specs=(pspec, P("data"), P("data"), P("data"), P("model")),
                        out_specs=((P(), P()), pspec),
                        check_vma=check_vma,
                    )
                )
                args = (padded, x, y, cot, cw_padded)
                compiled = sharded.lower(*args).compile()  # once: values and HLO
                parts, grads = compiled(*args)
                key = f"{name} {shape[0]}x{shape[1]} check_vma={check_vma}"
                assert np.all(np.asarray(grads["w"][:, v:]) == 0), key
                assert np.all(np.asarray(grads["b"][v:]) == 0), key
                grads = {**grads, "w": grads["w"][:, :v], "b": grads["b"][:v]}
                err = _close(
                    (parts, grads), (want_parts, want_grads), key, rtol=1e-4, atol=1e-5
                )
                hlo = compiled.as_text()
                per_device_logits = n * C // (shape[0] * shape[1])
                # All-reduces: per-example scalars, dx's parts over "model"
                # and the parameter gradients over "data"; nothing else moves.
                largest = max(n // shape[0] * h, h * C // shape[1], f * h)
                found = _assert_only_scalars_move(hlo, per_device_logits, key, largest)
                assert "all-gather" not in found and "all-to-all" not in found, found
                report[key] = {"max_abs_error": err, "collectives": found}
    return report


def case_linear_bfloat16_split_dx():
    """bfloat16 linear_cross_entropy whose dx accumulates in two 16-bit halves
    (``backward.DX_SPLIT_BYTES`` = 0, so at any size): under GSPMD (w on the
    vocabulary) and in shard_map (axis_name, check_vma on and off, where dx's
    parts are summed over devices in float32 before rounding; and with
    skip_unscored, its rows gathered and scattered), every bit of the value
    and the gradients is that of the plain float32 accumulator."""
    from xent_jax._linear import backward, layout

    rng = np.random.default_rng(11)
    n, dim, v = 32, 16, 256
    x = jnp.asarray(rng.normal(size=(n, dim)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(dim, v)) * 0.3, jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    # skip_unscored gathers and scatters the halves by rows: half the labels
    # ignored, on every device
    y_skip = jnp.where(jnp.arange(n) % 4 < 2, -100, y)
    skip = dict(skip_unscored=True, ignore_index=-100)
    # several whole token blocks of 2 on every device (a shorter last block,
    # or a single one, would take the plain accumulator)
    opts = dict(z_loss=1e-3, block_size=(2, 16), reduction="mean")
    splits = []
    split_fn = layout.SplitFloat32.split

    def counted_split(a):
        splits.append(a.shape)
        return split_fn(a)

    def gspmd(mesh):
        specs = (P("data"), P(None, "model"), P("data"))
        args = [
            jax.device_put(a, NamedSharding(mesh, s))
            for a, s in zip((x, w, y), specs, strict=True)
        ]

        def run():
            loss = functools.partial(xent_jax.linear_cross_entropy, **opts)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*args)

        return run

    def sharded(mesh, check_vma, labels=y, **extra):
        def step(x, w, y):
            def loss(x, w):
                out = xent_jax.linear_cross_entropy(
                    x,
                    w,
                    y,
                    axis_name="model",
                    reduction_axis_name="data",
                    **opts,
                    **extra,
                )
                return out if check_vma else out / mesh.shape["data"]

            value, grads = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
            if not check_vma:
                grads = (
                    jax.lax.psum(grads[0], "model"),
                    jax.lax.psum(grads[1], "data"),
                )
            return value, grads

        def run():
            return jax.jit(
                jax.shard_map(
                    step,
                    mesh=mesh,
                    in_specs=(P("data"), P(None, "model"), P("data")),
                    out_specs=(P(), (P("data"), P(None, "model"))),
                    check_vma=check_vma,
                )
            )(x, w, labels)

        return run

    report = {}
    default = backward.DX_SPLIT_BYTES
    for shape in MESHES:
        mesh = _mesh(shape)
        runs = {"gspmd": gspmd(mesh)}
        runs.update({f"vma={c}": sharded(mesh, c) for c in (True, False)})
        runs["skip_unscored vma=True"] = sharded(mesh, True, y_skip, **skip)
        for name, run in runs.items():
            key = f"{name} {shape[0]}x{shape[1]}"
            try:
                backward.DX_SPLIT_BYTES = 0
                layout.SplitFloat32.split = counted_split
                splits.clear()
                split = run()
                assert splits, (key, "the split accumulator was not used")
            finally:
                backward.DX_SPLIT_BYTES = default
                layout.SplitFloat32.split = split_fn
            jax.clear_caches()  # traced again, with the plain accumulator
            plain = run()
            for s, p in zip(
                jax.tree.leaves(split), jax.tree.leaves(plain), strict=True
            ):
                s, p = np.asarray(s, np.float32), np.asarray(p, np.float32)
                assert np.array_equal(s, p), (key, np.max(np.abs(s - p)))
            report[key] = "bitwise equal"
    return report


def case_gspmd_linear_explicit():
    """The same with Explicit mesh axes: the loss runs in a shard_map over the
    mesh of the inputs' types, the vocabulary split as w is."""
    return case_gspmd_linear(explicit=True)


def case_label_range():
    """Under axis_name the range of valid labels is the global [0, C): the
    eager check (concrete labels) and the traced NaN both use it."""
    d = _data(6)
    mesh = _mesh((1, 8))
    labels = np.arange(N, dtype=np.int32) * 3  # 0 .. 45: beyond C_local = 6
    bad = labels.copy()
    bad[5] = C  # the first id past the global range

    def run(labels, concrete):
        def body(x, y):
            y = labels if concrete else y  # closed over: a concrete array
            return xent_jax.softmax_cross_entropy_with_integer_labels(
                x, y, axis_name="model"
            )

        return jax.jit(
            jax.shard_map(
                body, mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P()
            )
        )(d["logits"], jnp.asarray(labels))

    want = xent_jax.softmax_cross_entropy_with_integer_labels(d["logits"], labels)
    _close(run(labels, True), want, "concrete labels")
    _close(run(labels, False), want, "traced labels")
    try:
        run(bad, True)
    except ValueError as e:
        assert "[5]" in str(e) and f"[0, {C})" in str(e), e
    else:
        raise AssertionError("an out-of-range concrete label did not raise")
    out = np.asarray(run(bad, False))
    assert np.isnan(out[5]) and np.isfinite(np.delete(out, 5)).all(), out
    return {"ok": True}


def case_reduction_axis_checks():
    """reduction_axis_name must not name the class axis; BCE's global mean."""
    mesh = _mesh((2, 4))
    d = _data(7)
    try:
        jax.shard_map(
            lambda x, y: xent_jax.softmax_cross_entropy_with_integer_labels(
                x, y, axis_name="model", reduction_axis_name=("data", "model")
            ),
            mesh=mesh,
            in_specs=(P("data", "model"), P("data")),
            out_specs=P(),
        )(d["logits"], d["labels"])
    except ValueError as e:
        assert "reduction_axis_name" in str(e), e
    else:
        raise AssertionError("overlapping axes were accepted")

    # BCE over elements split on both axes: the global mean over all of them.
    def bce(x, y, **kw):
        return xent_jax.sigmoid_binary_cross_entropy(x, y, reduction="mean", **kw)

    want = jax.value_and_grad(bce)(d["logits"], d["soft"])
    got = jax.jit(
        jax.shard_map(
            lambda x, y: jax.value_and_grad(bce)(
                x, y, reduction_axis_name=("data", "model")
            ),
            mesh=mesh,
            in_specs=(P("data", "model"),) * 2,
            out_specs=(P(), P("data", "model")),
        )
    )(d["logits"], d["soft"])
    return {"max_abs_error": _close(got, want, "bce global mean")}


def case_segments_data_parallel():
    """reduction="mean_per_segment" with reduction_axis_name: rows (and so
    their segments) split over "data", the vocabulary over "model" in the fused
    loss: the mean over all segments of all devices, as on one device, value
    and gradients (the core loss and the fused one, with shift=1)."""
    rng = np.random.default_rng(11)
    b, t, dim, v = 8, 12, 6, 16
    hid = jnp.asarray(rng.normal(size=(b, t, dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(dim, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    lengths = rng.integers(1, 6, size=(b, t))  # runs of equal ids: segments
    seg = np.cumsum(np.arange(t)[None, :] % lengths == 0, axis=1)
    seg = jnp.asarray(np.where(rng.random((b, t)) < 0.1, -1, seg), jnp.int32)
    common = dict(reduction="mean_per_segment", shift=1, segment_ids=seg)

    def fused(h, w, y, s, **kw):
        return xent_jax.linear_cross_entropy(
            h, w, y, **(common | dict(segment_ids=s)), **kw
        )

    def core(h, w, y, s, **kw):
        kw = common | dict(segment_ids=s) | kw
        return xent_jax.softmax_cross_entropy_with_integer_labels(h @ w, y, **kw)

    worst = 0.0
    mesh = _mesh((4, 2))
    for name, loss, w_spec, kw in (
        ("fused", fused, P(None, "model"), dict(axis_name="model")),
        ("core", core, P(), {}),
    ):
        want = jax.value_and_grad(loss, argnums=(0, 1))(hid, w, tokens, seg)
        body = functools.partial(loss, reduction_axis_name="data", **kw)
        got = jax.jit(
            jax.shard_map(
                jax.value_and_grad(body, argnums=(0, 1)),
                mesh=mesh,
                in_specs=(P("data"), w_spec, P("data"), P("data")),
                out_specs=(P(), (P("data"), w_spec)),
            )
        )(hid, w, tokens, seg)
        worst = max(worst, _close(got, want, f"{name} mean_per_segment"))
    return {"max_abs_error": worst}


# --- the bytes each step sends (issue 29) -----------------------------------------

PARALLEL = {  # mesh (data, model), x's and w's specs, the loss's axes
    "vocabulary-parallel": ((1, 8), P(), P(None, "model"), dict(axis_name="model")),
    "data-parallel": ((8, 1), P("data"), P(), dict(reduction_axis_name="data")),
}


def step_hlo(kind: str, parallel: str, n: int, d: int, v: int, dtype) -> str:
    """Compiled HLO of value_and_grad (w.r.t. x and w) of the mean loss on 8
    devices: the fused loss under ``shard_map`` with its axes (``kind =
    "fused"``), or optax's on the materialised ``x @ w`` under GSPMD with the
    same shardings (``"materialised"``). Compiled only: nothing this size is
    allocated."""
    import optax

    shape, x_spec, w_spec, axes = PARALLEL[parallel]
    mesh = _mesh(shape)
    y_spec = P("data") if x_spec == P("data") else P()
    if kind == "fused":
        loss = jax.shard_map(
            lambda x, w, y: xent_jax.linear_cross_entropy(x, w, y, **axes),
            mesh=mesh,
            in_specs=(x_spec, w_spec, y_spec),
            out_specs=P(),
        )
    else:

        def loss(x, w, y):
            logits = (x @ w).astype(jnp.float32)
            ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
            return ce.mean()

    def spec(shape_, p, dt=dtype):
        return jax.ShapeDtypeStruct(shape_, dt, sharding=NamedSharding(mesh, p))

    args = (spec((n, d), x_spec), spec((d, v), w_spec), spec((n,), y_spec, jnp.int32))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return fn.lower(*args).compile().as_text()


def case_collective_bytes():
    """Neither way of splitting the fused loss moves anything of the logits'
    size (N V) or W's (D V) between devices, except dW's own all-reduce when
    W is replicated (data-parallel); the materialised loss's collectives are
    reported beside it."""
    n, d, v = 256, 64, 4096
    report = {}
    for parallel in PARALLEL:
        for kind in ("fused", "materialised"):
            found = collective_bytes(step_hlo(kind, parallel, n, d, v, jnp.float32))
            report[f"{kind}, {parallel}"] = found
            if kind != "fused":
                continue
            for op, (_, total, largest) in found.items():
                # dW's own all-reduce (W replicated): once W's bytes in all.
                dw_reduction = parallel == "data-parallel" and op == "all-reduce"
                limit = 4 * (d * v + n if dw_reduction else min(n * v, d * v) // 8)
                assert (total if dw_reduction else largest) <= limit, (parallel, found)
            # Only all-reduces: no reduce-scatter, which gloo corrupted across
            # processes at ~4 MiB (jax#40830).
            assert set(found) == {"all-reduce"}, (parallel, found)
    return report


def case_skip_unscored():
    """``skip_unscored=True`` with half the rows unscored (issue 30), under
    ``shard_map`` on every mesh (vocabulary- and data-parallel at once: each
    device partitions its own rows) and under GSPMD: values and gradients
    equal one device's without it; ``shard_map`` moves only all-reduces, and
    neither moves anything of the logits' or W's size but the gradients'
    own all-reduces (dx's parts, N D, and dW's over "data")."""
    rng = np.random.default_rng(12)
    n, dim, v = 64, 8, 8 * C
    x = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(dim, v)) * 0.5, jnp.float32)
    y = rng.integers(0, v, n).astype(np.int32)
    y[rng.random(n) < 0.5] = -100
    y[:8] = -100  # a data shard with fewer scored rows than the others
    y = jnp.asarray(y)
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, block_size=(4, 2))

    def loss(x, w, y, **kw):
        return xent_jax.linear_cross_entropy(x, w, y, **opts, **kw)

    vg = jax.value_and_grad(loss, argnums=(0, 1))
    want = jax.jit(vg)(x, w, y)
    axes = dict(axis_name="model", reduction_axis_name="data", skip_unscored=True)
    report = {}
    for shape in MESHES:
        mesh = _mesh(shape)
        specs = (P("data"), P(None, "model"), P("data"))
        args = [
            jax.device_put(a, NamedSharding(mesh, s))
            for a, s in zip((x, w, y), specs, strict=True)
        ]
        sharded = jax.shard_map(
            jax.value_and_grad(lambda x, w, y: loss(x, w, y, **axes), argnums=(0, 1)),
            mesh=mesh,
            in_specs=specs,
            out_specs=(P(), (P("data"), P(None, "model"))),
        )
        gspmd = jax.value_and_grad(
            lambda x, w, y: loss(x, w, y, skip_unscored=True), argnums=(0, 1)
        )
        for kind, fn in (("shard_map", sharded), ("gspmd", gspmd)):
            compiled = jax.jit(fn).lower(*args).compile()
            key = f"{kind} {shape[0]}x{shape[1]}"
            err = _close(compiled(*args), want, key, rtol=1e-4, atol=1e-5)
            found = collective_bytes(compiled.as_text())
            for op, (_, _, largest) in found.items():
                own = n * dim + dim * v // shape[1] if op == "all-reduce" else 0
                assert largest <= 4 * max(own, min(n * v, dim * v) // 8), (key, found)
            if kind == "shard_map":
                assert set(found) <= {"all-reduce"}, (key, found)
            report[key] = {"max_abs_error": err, "collectives": found}
    return report


def _contrastive_args(kind, n, d, seed=0):
    rng = np.random.default_rng(seed)
    a, b = (
        jnp.asarray(rng.normal(size=(n, d)) / np.sqrt(d), jnp.float32) for _ in "ab"
    )
    extra = (jnp.float32(4.0),) + ((jnp.float32(-1.5),) if kind == "siglip" else ())
    return (a, b) + extra


def case_contrastive_ring():
    """clip_loss and siglip_loss with the pairs split over the mesh (one axis
    of 8, and both axes of 4x2 named together): the ring equals one device for
    every reduction and implementation, values and the gradients of a, b,
    scale (and bias); the only collectives move column blocks and per-pair
    statistics (``n/P x D``), never a block of the ``N x N`` matrix."""
    n, d = 64, 16
    report = {}
    for kind, fn in (("clip", xent_jax.clip_loss), ("siglip", xent_jax.siglip_loss)):
        args = _contrastive_args(kind, n, d)
        nums = tuple(range(len(args)))
        for shape, axes in (((8, 1), "data"), ((4, 2), ("data", "model"))):
            mesh = _mesh(shape)
            specs = (P(axes), P(axes)) + (P(),) * (len(args) - 2)
            for impl in ("xla", "reference"):
                for reduction in ("mean", "sum", "none"):

                    def local(*x, fn=fn, axes=axes, impl=impl, reduction=reduction):
                        return fn(
                            *x,
                            reduction=reduction,
                            block_size=3,
                            axis_name=axes,
                            implementation=impl,
                        )

                    out = P(axes) if reduction == "none" else P()
                    sharded = jax.shard_map(
                        local, mesh=mesh, in_specs=specs, out_specs=out
                    )

                    def total(*x, f=sharded):
                        return jnp.sum(f(*x) * (1 + jnp.arange(f(*x).size) % 3))

                    def alone(*x, fn=fn, reduction=reduction):
                        v = fn(*x, reduction=reduction)
                        return jnp.sum(v * (1 + jnp.arange(v.size) % 3))

                    step = jax.jit(jax.value_and_grad(total, argnums=nums))
                    key = f"{kind} {impl} {reduction} {shape[0]}x{shape[1]}"
                    want = jax.value_and_grad(alone, argnums=nums)(*args)
                    err = _close(step(*args), want, key, rtol=1e-4, atol=1e-5)
                    found = collective_bytes(step.lower(*args).compile().as_text())
                    if impl == "xla":
                        block = n // 8 * d * 4  # a column block's float32 bytes
                        assert set(found) <= {"collective-permute", "all-reduce"}, (
                            key,
                            found,
                        )
                        for _, (_, _, largest) in found.items():
                            assert largest <= 2 * block, (key, found)
                        report[key] = {"max_abs_error": err, "collectives": found}
        report.update(_contrastive_ring_where(kind, fn, args))
    return report


def _contrastive_ring_where(kind, fn, args):
    """``where`` around the ring: the kept pairs' mask travels with their
    columns (8 devices, every implementation, "mean" and "none")."""
    n = args[0].shape[0]
    keep = jnp.asarray(np.arange(n) % 5 != 2)
    nums = tuple(range(len(args)))
    mesh = _mesh((8, 1))
    specs = (P("data"), P("data")) + (P(),) * (len(args) - 2) + (P("data"),)
    report = {}
    for impl in ("xla", "reference"):
        for reduction in ("mean", "none"):

            def local(*x, impl=impl, reduction=reduction):
                *x, w = x
                return fn(
                    *x,
                    where=w,
                    reduction=reduction,
                    block_size=3,
                    axis_name="data",
                    implementation=impl,
                )

            out = P("data") if reduction == "none" else P()
            sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out)

            def total(*x, f=sharded):
                v = f(*x, keep)
                return jnp.sum(v * (1 + jnp.arange(v.size) % 3))

            def alone(*x, reduction=reduction):
                v = fn(*x, where=keep, reduction=reduction)
                return jnp.sum(v * (1 + jnp.arange(v.size) % 3))

            key = f"{kind} {impl} {reduction} where 8x1"
            got = jax.jit(jax.value_and_grad(total, argnums=nums))(*args)
            want = jax.value_and_grad(alone, argnums=nums)(*args)
            report[key] = {"max_abs_error": _close(got, want, key, 1e-4, 1e-5)}
    return report


def case_distillation_vocab_parallel():
    """linear_distillation_loss with both heads' vocabularies split over
    "model" (axis_name) and the positions over "data" (reduction_axis_name):
    the value and the gradients of x, w, teacher_x and teacher_w equal one
    device's for every divergence, with a hard-label term, a temperature and
    ignored labels; the collectives are all-reduces of per-position scalars,
    of dx's parts over "model" and of dW over "data", never of logits."""
    rng = np.random.default_rng(31)
    n, d, dt, v = N, 6, 5, C
    x = jnp.asarray(rng.normal(size=(n, d)) / np.sqrt(d), jnp.float32)
    xt = jnp.asarray(rng.normal(size=(n, dt)) / np.sqrt(dt), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(dt, v)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32).at[:3].set(-100)
    args = (x, w, xt, wt)
    nums = (0, 1, 2, 3)
    report = {}
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        opts = dict(
            divergence=divergence,
            alpha=0.3,
            temperature=2.0,
            ignore_index=-100,
            teacher_grad=True,
            block_size=2,
        )

        def alone(x, w, xt, wt, opts=opts):
            return xent_jax.linear_distillation_loss(x, w, xt, wt, y, **opts)

        want = jax.value_and_grad(alone, argnums=nums)(*args)
        for shape in MESHES:
            mesh = _mesh(shape)

            def local(x, w, xt, wt, y, opts=opts):
                return xent_jax.linear_distillation_loss(
                    x,
                    w,
                    xt,
                    wt,
                    y,
                    axis_name="model",
                    reduction_axis_name="data",
                    **opts,
                )

            rows, cols = P("data", None), P(None, "model")
            sharded = jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(rows, cols, rows, cols, P("data")),
                out_specs=P(),
            )
            step = jax.jit(
                jax.value_and_grad(lambda *a, f=sharded: f(*a, y), argnums=nums)
            )
            key = f"{divergence} {shape[0]}x{shape[1]}"
            err = _close(step(*args), want, key, rtol=1e-4, atol=1e-5)
            found = collective_bytes(step.lower(*args).compile().as_text())
            assert set(found) <= {"all-reduce"}, (key, found)
            largest = max(b for _, _, b in found.values())
            # dW and dW_t over "data" (XLA merges them, and dx's parts, into
            # one tuple): below one [N, V] logits array, 4 N V bytes.
            assert largest <= 4 * (d * v + dt * v + n * (d + dt)) < 4 * n * v, (
                key,
                found,
            )
            report[key] = {"max_abs_error": err, "collectives": found}
    return report


def case_vocabulary_groups():
    """The fused loss views ``w`` as vocabulary groups only where GSPMD may
    split it (layout.choose): 8 groups under jit on 8 devices and inside a
    shard_map over some of the mesh axes, one inside a shard_map over all of
    them, where each value is a device's block, and one under jit on a mesh
    of Explicit axes, where types say how ``w`` is split."""
    from xent_jax._linear import layout

    def groups():
        return layout.choose(None, 32, 256, 16, False, False).groups

    seen = {"jit": [], "shard_map data": [], "shard_map all": [], "explicit": []}

    def record(key):
        def f(x):
            seen[key].append(groups())
            return x

        return f

    mesh = _mesh((4, 2))
    x = jnp.zeros((8, 4))
    jax.jit(record("jit"))(x)
    for key, axes in (("shard_map data", {"data"}), ("shard_map all", None)):
        kwargs = {} if axes is None else {"axis_names": axes}
        smap = jax.shard_map(
            record(key), mesh=mesh, in_specs=P("data"), out_specs=P("data"), **kwargs
        )
        jax.jit(smap)(x)
    with jax.set_mesh(_mesh((4, 2), explicit=True)):
        jax.jit(record("explicit"))(x)
    want = {"jit": [8], "shard_map data": [8], "shard_map all": [1], "explicit": [1]}
    assert seen == want, seen
    return {"groups": seen}


CASES = {
    name[len("case_") :]: fn
    for name, fn in globals().items()
    if name.startswith("case_")
}


def main(names: list[str]) -> None:
    assert jax.device_count() == 8, jax.devices()
    for name in names or list(CASES):
        start = time.perf_counter()
        result = CASES[name]()
        result = {
            "case": name,
            "seconds": round(time.perf_counter() - start, 2),
            **result,
        }
        print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
