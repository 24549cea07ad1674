"""The implementations of each op, under one naming scheme.

Every op (``"softmax"``, ``"sigmoid"``, ``"linear"``) has a ``"reference"``
implementation (its formula under plain autodiff, the oracle of the tests) and
an ``"xla"`` one (the closed-form ``custom_vjp`` kernel, the default on every
platform). Accelerator kernels register under their own names. Adding an
implementation means adding a module that calls :func:`register` and
importing it from the op's ``api`` module.

Older names stay accepted as aliases: ``"custom_vjp"`` (the core losses) and
``"blockwise"`` (the fused loss) both mean ``"xla"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEFAULT = "xla"
ALIASES = {"custom_vjp": "xla", "blockwise": "xla"}
_IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Any]]] = {}


def register(op: str, name: str):
    """Decorator registering ``fn`` as implementation ``name`` of ``op``."""

    def decorate(fn):
        _IMPLEMENTATIONS.setdefault(op, {})[name] = fn
        return fn

    return decorate


def names(op: str) -> tuple[str, ...]:
    """The implementations of ``op``, the default first."""
    impls = _IMPLEMENTATIONS[op]
    return (DEFAULT,) + tuple(sorted(n for n in impls if n != DEFAULT))


def accepted(op: str) -> tuple[str, ...]:
    """Every name ``implementation=`` accepts for ``op`` (aliases included)."""
    impls = _IMPLEMENTATIONS[op]
    aliases = tuple(a for a, n in ALIASES.items() if n in impls)
    return names(op) + aliases


def canonical(op: str, implementation: Any) -> str:
    """The registered name ``implementation`` selects (``None``: the default)."""
    name = DEFAULT if implementation is None else implementation
    name = ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(name, str) or name not in _IMPLEMENTATIONS[op]:
        raise ValueError(
            f"implementation must be one of {(None,) + accepted(op)}; got "
            f"{implementation!r}."
        )
    return name


def lookup(op: str, implementation: Any) -> Callable[..., Any]:
    return _IMPLEMENTATIONS[op][canonical(op, implementation)]
