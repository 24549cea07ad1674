"""Compiling for TPU v5e, TPU v6e and an H100 on a machine without them.

The real XLA:TPU (with Mosaic, from ``libtpu``) and XLA:GPU (with Triton, from
``jax-cuda12-plugin``) compilers run deviceless: a topology description stands
in for the device, ``lower(...).compile()`` runs the whole compiler, and
``memory_analysis()`` reports what the program would allocate on the device.
Nothing runs. Used by ``tests/test_deviceless.py`` and
``benchmarks/bench_accelerator.py --aot``.

Needs ``jax[tpu,cuda12-local]`` at the installed jax's version (the CUDA
plugin without NVIDIA's wheels: compiling needs none of them) and
``jax_platforms="cpu"`` set before any backend starts (:func:`setup` does it).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import jax

TARGETS = ("v5e", "v6e", "h100")
PLATFORM = {"v5e": "tpu", "v6e": "tpu", "h100": "cuda"}
# The Pallas kernel each target compiles (the other one cannot lower there).
KERNEL = {"v5e": "pallas_tpu", "v6e": "pallas_tpu", "h100": "pallas_triton"}
MiB = 2**20

# An H100 SXM as a GpuTargetConfigProto: the device facts of XLA's
# xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb plus the cuDNN and CUDA versions
# (the pattern of jax's tests/deviceless_aot_test.py).
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def missing() -> str | None:
    """Why the deviceless compilers cannot run here (None: they can)."""
    needs = {"libtpu": "libtpu", "jax_plugins.xla_cuda12": "jax-cuda12-plugin"}
    absent = [pkg for mod, pkg in needs.items() if not _importable(mod)]
    if absent:
        return (
            f"{' and '.join(absent)} not installed: pip install "
            f'"jax[tpu,cuda12-local]=={jax.__version__}"'
        )
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def setup() -> None:
    """Keep every backend on the CPU (the plugins must not look for devices),
    and let several processes (pytest-xdist's workers) load libtpu: its
    lockfile otherwise lets only the first one compile."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")


@functools.cache
def device(target: str):
    """The one device of a deviceless single-chip topology for ``target``."""
    from jax.experimental import topologies

    if PLATFORM[target] == "tpu":
        topo = topologies.get_topology_desc(
            topology_name=f"{target}:1x1",
            platform="tpu",
            chips_per_host_bounds=[1, 1, 1],
        )
    else:
        topo = topologies.get_topology_desc(
            platform="cuda", topology="1x1x1", target_config=H100_SXM
        )
    return topo.devices[0]


def specs(target: str, *shapes_and_dtypes) -> list[jax.ShapeDtypeStruct]:
    """``ShapeDtypeStruct``s placed on ``target``'s device."""
    sharding = jax.sharding.SingleDeviceSharding(device(target))
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes_and_dtypes]


def compile_for(target: str, fn, *args):
    """``jax.jit(fn)`` compiled for ``target`` (args from :func:`specs`)."""
    return jax.jit(fn).lower(*args).compile()


def temp_mib(compiled) -> float:
    return compiled.memory_analysis().temp_size_in_bytes / MiB


# An HLO instruction: `%name = type[dims]{layout} opcode(`; tuples and
# scalars do not match, which is what the scan wants.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<dtype>\w+)\[(?P<dims>[\d,]*)\]"
    r"(?:\{[^}]*\})?\s+(?P<op>[\w\-]+)\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_FUSION = re.compile(r"\bfusion\(.*calls=%?(?P<callee>[\w.\-]+)")
_ROOT = re.compile(r"^\s*ROOT\s")
# Opcodes that name a buffer without making a new one.
_VIEWS = frozenset({"parameter", "get-tuple-element", "bitcast", "tuple"})
_COPIES = frozenset({"copy", "copy-start", "copy-done", "transpose"})


def _computations(hlo_text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("{")[0]:
            name = m["name"]
            comps[name] = []
        elif name is not None and line.strip() not in ("", "}"):
            comps[name].append(line)
    return comps


def _itemsize(dtype: str) -> int:
    return int(re.sub(r"\D", "", dtype) or 8) // 8 if dtype != "pred" else 1


def w_copies(hlo_text: str, elements: int, itemsize: int) -> list[str]:
    """Instructions of the optimised HLO that copy or transpose a W-sized
    array, or hold one at another precision than W's (a float32 accumulator
    of a bfloat16 dW, a bfloat16 copy of a float32 W): everything of
    ``elements`` elements that is not an input or dW's own buffer (made once
    and updated in place). A fusion counts by the root of the computation it
    calls (its converts are arithmetic: a v5e computes bf16 in float32)."""
    comps = _computations(hlo_text)
    fused = {
        m["callee"]: None
        for line in hlo_text.splitlines()
        if (m := _FUSION.search(line))
    }
    roots = {}
    for name in fused:
        for line in comps.get(name, ()):
            if _ROOT.match(line) and (m := _INSTRUCTION.match(line)):
                roots[name] = m["op"]
    found = []
    for name, lines in comps.items():
        if name in fused:
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m or m["op"] in _VIEWS or not m["dims"]:
                continue
            size = 1
            for d in m["dims"].split(","):
                size *= int(d)
            if size != elements:
                continue
            op = m["op"]
            if op == "fusion" and (f := _FUSION.search(line)):
                op = roots.get(f["callee"], op)
            if op in _COPIES or _itemsize(m["dtype"]) != itemsize:
                found.append(line.strip())
    return found
