"""Compiled temporary memory per device of the losses on a device mesh.

For ``jax.value_and_grad`` of the mean loss (compile only: nothing of this
size is allocated), on meshes data x model of 1x1, 1x8 (classes split 8 ways)
and 8x1 (examples split 8 ways), it prints the temporary memory that
``compiled.memory_analysis()`` reports per device for

* the fused ``linear_cross_entropy(x, w, y)``, x on "data" and w on the
  vocabulary ("model"), at N=8192, D=1024, V=131072 (float32), partitioned by
  GSPMD under ``jax.jit``;
* the same inside ``jax.shard_map`` with ``axis_name="model"`` (vocabulary
  parallelism) and ``reduction_axis_name="data"``;
* the core ``softmax_cross_entropy_with_integer_labels(h @ w, y)`` in the same
  setting, where the logits are an intermediate, as bench_xent.py measures it
  on one device.

The core loss's temporaries are the logits and fall as 1/devices along either
axis; the fused loss's are blocks whose size does not depend on V, plus the
partial dx that vocabulary parallelism sums over "model". 8 CPU devices are
simulated (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here
before JAX starts)::

    python benchmarks/bench_sharding.py            # the full shapes
    python benchmarks/bench_sharding.py --smoke    # tiny shapes, seconds (CI)
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import xent_jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sharding_checks  # noqa: E402  (the tests' own step and HLO reader)

FULL = (8192, 1024, 131072)  # N, D, V
SMOKE = (64, 32, 1024)
BYTES_FULL = (8192, 2304, 256000)  # Gemma-2's head, bfloat16
MESHES = ((1, 1), (1, 8), (8, 1))


def _mesh(data: int, model: int) -> jax.sharding.Mesh:
    devices = jax.devices()[: data * model]
    return jax.make_mesh(
        (data, model),
        ("data", "model"),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def _specs(mesh, n: int, d: int, v: int, dtype):
    def spec(shape, *axes, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P(*axes)))

    x = spec((n, d), "data")
    w = spec((d, v), None, "model")
    y = spec((n,), "data", dt=jnp.int32)
    return x, w, y


def temp_bytes(objective, mesh, n: int, d: int, v: int, dtype) -> int:
    """Per-device temporary bytes of value_and_grad(objective) w.r.t. (x, w)."""
    fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    compiled = fn.lower(*_specs(mesh, n, d, v, dtype)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _objectives(mesh) -> dict:
    out = {}
    fused = getattr(xent_jax, "linear_cross_entropy", None)
    if fused is not None:
        out["fused, GSPMD"] = lambda x, w, y: fused(x, w, y, reduction="mean")
        out["fused, shard_map axis_name"] = jax.shard_map(
            lambda x, w, y: fused(
                x, w, y, axis_name="model", reduction_axis_name="data"
            ),
            mesh=mesh,
            in_specs=(P("data"), P(None, "model"), P("data")),
            out_specs=P(),
        )
    out["core loss on x @ w"] = lambda x, w, y: (
        xent_jax.softmax_cross_entropy_with_integer_labels(x @ w, y, reduction="mean")
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    args = parser.parse_args()
    n, d, v = SMOKE if args.smoke else FULL
    dtype = jnp.float32
    assert jax.device_count() >= 8, "needs 8 (simulated) devices"
    if not hasattr(xent_jax, "linear_cross_entropy"):
        print("xent_jax.linear_cross_entropy is not available: core loss only.")
    mib = 2.0**20
    logits = n * v * jnp.dtype(dtype).itemsize
    print(
        f"value_and_grad of the mean loss, N={n} D={d} V={v} {jnp.dtype(dtype).name}; "
        f"the full logits are {logits / mib:,.1f} MiB. Temporary memory per device:"
    )
    print(
        f"{'loss':<30} {'mesh':>6} {'temp MiB':>11} {'vs 1x1':>7} {'vs own logits':>14}"
    )
    for name in _objectives(_mesh(1, 1)):
        base = None
        for data, model in MESHES:
            mesh = _mesh(data, model)
            objective = _objectives(mesh)[name]
            temp = temp_bytes(objective, mesh, n, d, v, dtype)
            base = temp if base is None else base
            own_logits = logits / (data * model)
            print(
                f"{name:<30} {f'{data}x{model}':>6} {temp / mib:>11,.1f} "
                f"{temp / base:>7.3f} {temp / own_logits:>13.3f}x"
            )
    w_bytes = d * v * jnp.dtype(dtype).itemsize
    x_bytes = n * d * jnp.dtype(dtype).itemsize
    print(
        "Beyond the loss's own buffers, data parallelism (8x1) keeps each "
        f"device's partial dW ({w_bytes / mib:,.1f} MiB, W's size) until its "
        "all-reduce over 'data' (the fused loss under shard_map sums dW block by "
        "block instead), and vocabulary parallelism (1x8) each device's partial "
        f"dx ({x_bytes / mib:,.1f} MiB) until its all-reduce over 'model'. The "
        "fused loss's other temporaries are blocks, whose size does not depend on V."
    )


def print_bytes(n: int, d: int, v: int) -> None:
    """The bytes each device sends per training step: the operands of the
    compiled step's collectives, a loop's counted once per iteration (see
    ``sharding_checks.collective_bytes``), beside the logits' and W's size."""
    mib = 2.0**20
    dtype = jnp.bfloat16
    size = jnp.dtype(dtype).itemsize
    print(
        f"\nBytes each device sends per value_and_grad step, N={n} D={d} V={v} "
        f"{jnp.dtype(dtype).name}, 8 devices; logits {n * v * size / mib:,.0f} MiB, "
        f"W {d * v * size / mib:,.0f} MiB:"
    )
    print(f"{'loss':<14} {'split':<20} {'collectives':<40} {'MiB sent':>10}")
    for parallel in sharding_checks.PARALLEL:
        for kind in ("fused", "materialised"):
            hlo = sharding_checks.step_hlo(kind, parallel, n, d, v, dtype)
            found = sharding_checks.collective_bytes(hlo)
            ops = ", ".join(
                f"{count} {op} (largest {largest / mib:,.1f} MiB)"
                for op, (count, _, largest) in found.items()
            )
            total = sum(t for _, t, _ in found.values())
            print(f"{kind:<14} {parallel:<20} {ops:<40} {total / mib:>10,.1f}")


if __name__ == "__main__":
    main()
    print_bytes(*(SMOKE if "--smoke" in sys.argv else BYTES_FULL))
