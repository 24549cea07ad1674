"""Every use of JAX internals or of version-dependent JAX API, in one place.

Each entry has a fallback that keeps results exact (only speed or a
convenience is lost), and ``BRANCHES`` records which branch this JAX took;
``tests/test_compat.py`` asserts it for the pinned version and the floor, so
an upgrade that silently switches to a fallback fails CI instead.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import jax
import jax.extend

BRANCHES: dict[str, str] = {}

# --- checkify's private rule table -------------------------------------------
# The traced label check is a primitive of its own (see _labels); only
# checkify's interpreter gives it a meaning, through this table. Without it
# the check falls back to checkify.debug_check, which costs an effect.
# jax 0.12 passes each rule a CheckifyContext first (the code numbering of
# the checks), and assert_func takes it too: "rule_table_ctx".
try:
    from jax._src import checkify as checkify_internals

    CHECKIFY_RULES = all(
        hasattr(checkify_internals, name)
        for name in ("error_checks", "assert_func", "FailedCheckError", "get_traceback")
    )
    _CHECKIFY_CONTEXT = CHECKIFY_RULES and (
        next(iter(inspect.signature(checkify_internals.assert_func).parameters))
        == "ctx"
    )
except ImportError:  # pragma: no cover - depends on the jax version
    checkify_internals = None
    CHECKIFY_RULES = _CHECKIFY_CONTEXT = False
BRANCHES["checkify"] = (
    ("rule_table_ctx" if _CHECKIFY_CONTEXT else "rule_table")
    if CHECKIFY_RULES
    else "debug_check"
)


def register_identity_primitive(name: str, failure):
    """A primitive that is the identity on its one operand, has no effect and
    lowers to nothing; under ``checkify`` (where the rule table exists) it
    fails where ``failure(x, **params)``, which returns ``(predicate,
    message)``, says so: a user check, the kind ``checkify.debug_check``
    makes."""
    from jax.interpreters import ad, batching, mlir

    prim = jax.extend.core.Primitive(name)
    prim.def_impl(lambda x, **_: x)
    prim.def_abstract_eval(lambda x, **_: x)
    mlir.register_lowering(prim, lambda ctx, x, **_: [x])
    batching.primitive_batchers[prim] = lambda args, dims, **p: (
        prim.bind(*args, **p),
        dims[0],
    )
    ad.primitive_jvps[prim] = lambda primals, tangents, **p: (
        prim.bind(*primals, **p),
        tangents[0],
    )
    if CHECKIFY_RULES:
        checkify_internals.error_checks[prim] = _checkify_rule(failure)
    return prim


def _checkify_rule(failure):
    """The rule table's entry for an identity primitive failing by ``failure``,
    in the signature this JAX calls it with."""

    def fail_if(context, error, enabled_errors, x, params):
        failed = checkify_internals.FailedCheckError
        if failed not in enabled_errors:
            return error, x
        predicate, message = failure(x, **params)
        check = failed(checkify_internals.get_traceback(), message)
        assert_args = (context,) if _CHECKIFY_CONTEXT else ()
        error = checkify_internals.assert_func(*assert_args, error, predicate, check)
        return error, x

    if _CHECKIFY_CONTEXT:
        return lambda ctx, error, enabled, x, **p: fail_if(ctx, error, enabled, x, p)
    return lambda error, enabled, x, **p: fail_if(None, error, enabled, x, p)


# --- shard_map's varying-manual-axes types (check_vma) -----------------------


def varying_manual_axes(x: Any) -> frozenset:
    """The ``shard_map`` axes over which ``x`` varies (empty without
    ``check_vma`` or outside ``shard_map``)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(() if manual is None else manual.varying)


def to_varying(x: jax.Array, axes: tuple[Any, ...]) -> jax.Array:
    """Marks an invariant value as varying over ``axes`` (no data moves)."""
    return jax.lax.pcast(x, axes, to="varying") if axes else x


# --- sharding in types (Explicit mesh axes) ----------------------------------

reshard = getattr(jax.sharding, "reshard", None)
BRANCHES["reshard"] = "jax.sharding.reshard" if reshard else "unavailable"


def type_sharding(x: Any):
    """The sharding in ``x``'s type (``None`` where types carry none)."""
    return getattr(jax.typeof(x), "sharding", None)


# --- lowering for a GPU this host does not have ------------------------------

H100 = "NVIDIA H100 80GB HBM3"


# jax 0.12 lowers Pallas Triton kernels for a GPU named by an abstract device;
# before (0.10.0's AbstractDevice has no platform), Pallas lowered for compute
# capability 9.0 without a GPU.
_ABSTRACT_GPU = hasattr(jax.sharding, "use_abstract_mesh") and "platform" in (
    inspect.signature(getattr(jax.sharding, "AbstractDevice", int)).parameters
)
BRANCHES["gpu_lowering"] = "abstract_device" if _ABSTRACT_GPU else "default_target"


def lowering_gpu(device_kind: str = H100):
    """Context in which Pallas Triton kernels lower for ``device_kind`` on a
    host without that GPU (``jax.export(..., platforms=["cuda"])`` from CPU).

    jax 0.12 asks for an abstract device in the abstract mesh; where there is
    none, Pallas lowers for its default target (an H100's) and this does
    nothing.
    """
    if not _ABSTRACT_GPU:
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=None, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


# --- symbolic shapes (jax.export) ---------------------------------------------


def is_static(dim: Any) -> bool:
    """Whether an array dimension is a known integer (not a symbolic one of
    ``jax.export``)."""
    return isinstance(dim, int)


# --- the producer of a traced value -------------------------------------------


def is_transpose_output(w: Any) -> bool:
    """Whether ``w`` is, under tracing, the output of a transpose swapping its
    last two axes (a tied embedding passed as ``emb.T``).

    Reads the tracer's producing equation, a JAX internal
    (``DynamicJaxprTracer.parent``), through autodiff (``primal``) and vmap
    (``val``) tracers. Only a choice of layout depends on it: when it cannot
    tell (eager arrays, other tracers, other jax versions) it says no, and the
    default layout runs with the same results.
    """
    try:
        t = w
        for _ in range(16):
            inner = getattr(t, "primal", None)
            if inner is None:
                inner = getattr(t, "val", None)
            if not isinstance(inner, jax.core.Tracer):
                break
            t = inner
        eqn = getattr(t, "parent", None)
        if eqn is None or getattr(eqn, "primitive", None) is not jax.lax.transpose_p:
            return False
        perm = tuple(eqn.params["permutation"])
        n = len(perm)
        return n >= 2 and perm == tuple(range(n - 2)) + (n - 1, n - 2)
    except Exception:  # noqa: BLE001 (jax internals: never fail here)
        return False


def _probe_transpose_detection() -> str:
    seen = []

    def f(a):
        seen.append(is_transpose_output(a.T))
        return a

    jax.make_jaxpr(f)(jax.numpy.zeros((2, 3)))
    return "tracer_parent" if seen == [True] else "unavailable"


BRANCHES["transpose_detection"] = _probe_transpose_detection()


# --- float64 -------------------------------------------------------------------


def enable_x64():
    """Context manager enabling float64 (``jax.enable_x64``)."""
    return jax.enable_x64(True)
