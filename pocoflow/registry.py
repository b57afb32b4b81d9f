"""Named flow builders: the only way a worker finds a graph (G7).

A step message names a flow; the worker looks the name up here and never imports a module
because a message named it. Modules are imported only from the worker's own
configuration (``--flows`` / ``POCOFLOW_FLOWS``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pocoflow.flow import Flow

Builder = TypeVar("Builder", bound=Callable[..., Flow])

_BUILDERS: dict[str, Callable[..., Flow]] = {}


class UnknownFlowError(LookupError):
    """A flow name that no imported module registered."""


def register_flow(name: str, builder: Callable[..., Flow]) -> Callable[..., Flow]:
    """Register ``builder`` under ``name``; every Flow it builds gets ``flow_name == name``.

    Returns the wrapped builder (same signature). Registering another builder under a
    taken name raises ``ValueError``; re-registering the same function (a module reloaded)
    is allowed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A flow name must be a non-empty str, got {name!r}")
    existing = _BUILDERS.get(name)
    if existing is not None and _qualified(existing) != _qualified(builder):
        raise ValueError(
            f"Flow name {name!r} is already registered by {_qualified(existing)}; "
            f"{_qualified(builder)} must use another name"
        )

    @functools.wraps(builder)
    def build(*args: Any, **kwargs: Any) -> Flow:
        built = builder(*args, **kwargs)
        if not isinstance(built, Flow):
            raise TypeError(
                f"Builder of flow {name!r} ({_qualified(builder)}) must return a Flow, "
                f"got {type(built).__name__}"
            )
        built.flow_name = name
        built.name = name
        return built

    build.flow_name = name  # type: ignore[attr-defined]
    _BUILDERS[name] = build
    return build


def flow(name: str) -> Callable[[Builder], Builder]:
    """Decorator form of ``register_flow``: ``@flow("summarise")``."""

    def decorate(builder: Builder) -> Builder:
        return register_flow(name, builder)  # type: ignore[return-value]

    return decorate


def get_builder(name: str) -> Callable[..., Flow]:
    try:
        return _BUILDERS[name]
    except KeyError:
        known = ", ".join(sorted(_BUILDERS)) or "none"
        raise UnknownFlowError(
            f"Flow {name!r} is not registered in this process (registered: {known}). "
            "Start the worker with --flows MODULE (or POCOFLOW_FLOWS) naming the module "
            "that defines it with @flow"
        ) from None


def build_flow(name: str) -> Flow:
    return get_builder(name)()


def registered_flows() -> list[str]:
    return sorted(_BUILDERS)


def import_flow_modules(modules: Iterable[str] | str | None) -> list[str]:
    """Import the configured flow modules (comma-separated or a list); returns their names."""
    if modules is None:
        return []
    if isinstance(modules, str):
        modules = modules.split(",")
    imported = []
    for module in (m.strip() for m in modules):
        if module:
            importlib.import_module(module)
            imported.append(module)
    return imported


def _qualified(func: Callable[..., Any]) -> str:
    inner = getattr(func, "__wrapped__", func)
    return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', repr(inner))}"
