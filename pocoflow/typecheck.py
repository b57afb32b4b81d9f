"""``isinstance`` for the types people write in a Store schema.

0.2 schemas held classes or tuples of classes and were checked with ``isinstance``;
that stays exactly so (``int`` still accepts ``True``). On top, a schema may now say
what it means: ``list[str]``, ``dict[str, int]``, ``tuple[int, ...]``, ``X | None``,
``Literal["a", "b"]``, ``Any``, ``typing.List[...]``, ``Annotated[...]``. Containers
are checked all the way down, because a wrong element found at write time names the
key; found three nodes later it names nothing.

A schema type is compiled once into a checker (``checker``) so a Store write costs one
call; ``matches`` is the one-off form.
"""

from __future__ import annotations

import collections.abc as abc
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

__all__ = ["checker", "describe", "describe_value", "matches", "registered_types"]

Check = Callable[[Any], bool]

_NoneType = type(None)
_UNION_ORIGINS = (typing.Union, types.UnionType)
_WRAPPER_ORIGINS = (typing.Annotated, typing.Final, typing.ClassVar)
_EMPTY_TUPLES = (tuple[()], typing.Tuple[()])  # noqa: UP006 - the typing spelling too


def matches(value: Any, expected: Any) -> bool:
    """Whether ``value`` fits ``expected`` (class, tuple of classes or typing form)."""
    return checker(expected)(value)


def _always(_: Any) -> bool:
    return True


def _is_none(value: Any) -> bool:
    return value is None


def checker(expected: Any) -> Check:
    """A one-argument predicate for ``expected``; raises ``TypeError`` for a form it
    cannot check at runtime (a string forward reference, a bare ``Protocol``...), so a
    bad schema fails when the Store is built, not on some later write."""
    try:
        return _cached_checker(expected)
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        return _compile(expected)  # e.g. Annotated metadata that is a dict


@functools.lru_cache(maxsize=1024)
def _cached_checker(expected: Any) -> Check:
    return _compile(expected)


def _isinstance_of(cls: type | tuple[type, ...]) -> Check:
    def check(value: Any) -> bool:
        return isinstance(value, cls)

    return check


def _compile(expected: Any) -> Check:
    if expected is Any or expected is object:
        return _always
    if expected is None or expected is _NoneType:
        return _is_none
    if isinstance(expected, tuple):
        if all(isinstance(e, type) and typing.get_origin(e) is None for e in expected):
            return _isinstance_of(expected)  # 0.2: isinstance(value, (A, B))
        return _any_of([_compile(e) for e in expected])
    origin = typing.get_origin(expected)
    if origin is None:
        return _compile_plain(expected)
    args = typing.get_args(expected)
    if origin in _UNION_ORIGINS:
        return _any_of([_compile(a) for a in args])
    if origin in _WRAPPER_ORIGINS:
        return _compile(args[0])
    if origin is typing.Literal:
        return _literal(args)
    if origin is type:
        return _subclass_of(args[0] if args else Any)
    if origin is abc.Callable:
        return callable
    if not isinstance(origin, type):
        raise TypeError(f"cannot check values against schema type {expected!r}")
    return _compile_generic(expected, origin, args)


def _compile_plain(expected: Any) -> Check:
    if isinstance(expected, type):
        if typing.is_typeddict(expected):
            return _isinstance_of(dict)
        if getattr(expected, "_is_protocol", False) and not getattr(
            expected, "_is_runtime_protocol", False
        ):
            raise TypeError(
                f"schema type {expected.__qualname__} is a Protocol; decorate it with "
                "@typing.runtime_checkable to use it in a schema"
            )
        return _isinstance_of(expected)
    if isinstance(expected, typing.TypeVar):
        if expected.__constraints__:
            return _compile(expected.__constraints__)
        return _compile(expected.__bound__) if expected.__bound__ is not None else _always
    supertype = getattr(expected, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return _compile(supertype)
    raise TypeError(
        f"cannot check values against schema type {expected!r}; use a class, a tuple of "
        "classes or a typing form such as list[str] or int | None"
    )


def _any_of(checks: list[Check]) -> Check:
    if _always in checks:
        return _always

    def check(value: Any) -> bool:
        return any(c(value) for c in checks)

    return check


def _literal(options: tuple[Any, ...]) -> Check:
    # Same type as well as equal: Literal[1] must refuse True and 1.0.
    allowed = [(type(o), o) for o in options]

    def check(value: Any) -> bool:
        t = type(value)
        return any(t is ot and value == o for ot, o in allowed)

    return check


def _subclass_of(expected: Any) -> Check:
    if expected is Any:
        return _isinstance_of(type)
    targets = (
        typing.get_args(expected) if typing.get_origin(expected) in _UNION_ORIGINS else (expected,)
    )
    classes = tuple(t for t in targets if isinstance(t, type))

    def check(value: Any) -> bool:
        return isinstance(value, type) and issubclass(value, classes)

    return check


def _compile_generic(expected: Any, origin: type, args: tuple[Any, ...]) -> Check:
    is_origin = _isinstance_of(origin)
    if origin is tuple:
        if expected in _EMPTY_TUPLES:
            return lambda value: isinstance(value, tuple) and not value
        if not args:
            return is_origin
        if len(args) == 2 and args[1] is Ellipsis:
            return _each(is_origin, _compile(args[0]))
        return _fixed_tuple([_compile(a) for a in args])
    if not args:
        return is_origin
    if issubclass(origin, abc.Mapping):
        key_check = _compile(args[0])
        value_check = _compile(args[1]) if len(args) > 1 else _always
        return _mapping(origin, key_check, value_check)
    if issubclass(origin, abc.Collection) and not issubclass(origin, (str, bytes, bytearray)):
        return _each(is_origin, _compile(args[0]))
    # Iterators, generators, user generics: looking inside would consume or guess.
    return is_origin


def _each(is_container: Check, item: Check) -> Check:
    if item is _always:
        return is_container

    def check(value: Any) -> bool:
        if not is_container(value):
            return False
        return all(map(item, value))  # map: the loop runs in C

    return check


def _fixed_tuple(items: list[Check]) -> Check:
    n = len(items)

    def check(value: Any) -> bool:
        if not isinstance(value, tuple) or len(value) != n:
            return False
        return all(c(x) for c, x in zip(items, value))

    return check


def _mapping(origin: Any, key: Check, value_check: Check) -> Check:
    def check(value: Any) -> bool:
        if not isinstance(value, origin):
            return False
        return all(map(key, value.keys())) and all(map(value_check, value.values()))

    return check


# ── messages ──────────────────────────────────────────────────────────────────


def describe(expected: Any) -> str:
    """How a schema type reads in an error message: ``list[str]``, ``int | None``."""
    if expected is Any:
        return "Any"
    if expected is None or expected is _NoneType:
        return "None"
    if expected is Ellipsis:
        return "..."
    if isinstance(expected, tuple):
        return " | ".join(describe(e) for e in expected)
    if isinstance(expected, list):  # Callable[[A, B], R]
        return "[" + ", ".join(describe(e) for e in expected) + "]"
    origin = typing.get_origin(expected)
    if origin is None:
        if isinstance(expected, type):
            return expected.__qualname__
        return getattr(expected, "__name__", None) or repr(expected)
    args = typing.get_args(expected)
    if origin in _UNION_ORIGINS:
        return " | ".join(describe(a) for a in args)
    if origin in _WRAPPER_ORIGINS:
        return describe(args[0])
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    name = getattr(origin, "__qualname__", None) or repr(origin)
    if expected in _EMPTY_TUPLES:
        return "tuple[()]"
    if not args:
        return name
    return f"{name}[{', '.join(describe(a) for a in args)}]"


def describe_value(value: Any) -> str:
    """The runtime type of ``value`` one level deep (``list[int | str]``), so a failed
    ``list[str]`` check says what was inside without printing the (maybe secret) data."""
    t = type(value)
    if t in (list, set, frozenset) and value:
        return f"{t.__name__}[{_union_of(value)}]"
    if t is tuple and value:
        if len(value) <= 4:
            return f"tuple[{', '.join(type(x).__qualname__ for x in value)}]"
        return f"tuple[{_union_of(value)}, ...]"
    if t is dict and value:
        return f"dict[{_union_of(value.keys())}, {_union_of(value.values())}]"
    return t.__qualname__


def _union_of(items: Any) -> str:
    names = sorted({type(x).__qualname__ for x in items})
    if len(names) > 5:
        names = [*names[:5], "..."]
    return " | ".join(names)


# ── codec registration ────────────────────────────────────────────────────────


def registered_types(expected: Any) -> Iterator[type]:
    """The dataclasses, pydantic models and enums a schema type mentions, including
    dataclasses nested in dataclass fields: what a Store registers with the codec so its
    values can be checkpointed without a manual ``register_type``."""
    yield from _walk(expected, set())


def _walk(expected: Any, seen: set[Any]) -> Iterator[type]:
    if isinstance(expected, (tuple, list)):
        for e in expected:
            yield from _walk(e, seen)
        return
    origin = typing.get_origin(expected)
    if origin is not None:
        args = typing.get_args(expected)
        if origin is typing.Literal:
            for a in args:
                if isinstance(a, Enum):
                    yield from _walk(type(a), seen)
            return
        if origin is typing.Annotated:
            args = args[:1]
        yield from _walk(args, seen)
        return
    if not isinstance(expected, type) or expected in seen:
        return
    seen.add(expected)
    if issubclass(expected, Enum):
        if expected.__module__ != "enum":
            yield expected
    elif hasattr(expected, "model_validate") and hasattr(expected, "model_dump"):
        # pydantic validates its own nested models; only the outer class needs a name.
        if not expected.__module__.startswith("pydantic"):
            yield expected
    elif dataclasses.is_dataclass(expected):
        yield expected
        try:
            hints = typing.get_type_hints(expected)
        except Exception:  # unresolvable string annotations: nested ones stay manual
            return
        for f in dataclasses.fields(expected):
            if f.name in hints:
                yield from _walk(hints[f.name], seen)
