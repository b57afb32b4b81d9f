"""Store: the shared state of a run, dict-like as in 0.2, typed and checkpointable.

The 0.2 API is kept exactly (``s[k]``, ``get``, ``update``, ``as_dict()``, observers,
``snapshot``/``restore``, ``_name``, ``_data``). What changed is what it promises:

* a schema may use typing generics (``list[str]``, ``int | None``, ``Literal``...),
  checked deeply on every write and on the initial data (where None, the usual "not set
  yet" placeholder, passes), so a wrong value fails at the write that made it, naming
  store, key, expected and actual type;
* snapshots go through :mod:`pocoflow.codec`, so a value comes back equal and of the
  same type, or the snapshot refuses with a ``TypeError`` naming the key (0.2 silently
  wrote ``"<non-serialisable: X>"``). 0.2 snapshot files still restore.

Writes with no schema and no observer are a plain dict store: this is the hot path of
every node.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pocoflow import codec, typecheck
from pocoflow.logging import get_logger

__all__ = ["DELETED", "Observer", "Store"]

_log = get_logger("store")

Observer = Callable[[str, Any, Any], None]


class _Deleted:
    """What observers receive as ``new`` when a key is deleted (``None`` is a value)."""

    def __repr__(self) -> str:
        return "<deleted>"

    def __reduce__(self) -> str:
        return "DELETED"


DELETED: Any = _Deleted()


class Store:
    """Shared state container for a PocoFlow pipeline run.

    Parameters
    ----------
    data :
        Initial key-value pairs (copied), checked against ``schema``.
    schema :
        Maps key -> type: a class, a tuple of classes (as in 0.2) or a typing form such
        as ``list[str]``. Listed keys are required by :meth:`validate`. Dataclasses,
        pydantic models and enums named here are registered with the codec.
    name :
        Label shown in messages and kept by snapshots and checkpoints.

    Examples
    --------
    >>> store = Store({"query": "hi"}, schema={"query": str, "hits": list[str] | None})
    >>> store["hits"] = ["a", "b"]
    """

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        schema: Mapping[str, Any] | None = None,
        name: str = "store",
    ):
        self._data: dict[str, Any] = dict(data) if data else {}
        self._schema: dict[str, Any] = dict(schema) if schema else {}
        self._name = name
        self._observers: list[Observer] = []
        # Compiled once: a schema write then costs one predicate call.
        self._checks: dict[str, typecheck.Check] = {
            key: typecheck.checker(expected) for key, expected in self._schema.items()
        }
        for expected in self._schema.values():
            for cls in typecheck.registered_types(expected):
                codec.register_type(cls)
        # None in the initial data is the usual "not set yet" placeholder, and 0.2 never
        # checked initial data at all: let it pass here (restore() too). A later write of
        # None is checked like any other.
        for key, check in self._checks.items():
            value = self._data.get(key)
            if value is not None and not check(value):
                raise self._type_error(key, value)

    # ── identity ──────────────────────────────────────────────────────────────

    @property
    def name(self) -> str:
        return self._name

    @property
    def schema(self) -> Mapping[str, Any]:
        """Read-only: a schema changed after construction would skip codec registration."""
        return MappingProxyType(self._schema)

    def __repr__(self) -> str:
        return f"Store(name={self._name!r}, keys={list(self._data.keys())})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Checkers are closures and observers are usually lambdas: rebuild, don't pickle.
        return (type(self), (self._data, self._schema, self._name))

    # ── dict-like access ──────────────────────────────────────────────────────

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if self._checks:
            check = self._checks.get(key)
            if check is not None and not check(value):
                raise self._type_error(key, value)
        if self._observers:
            old = self._data.get(key)
            self._data[key] = value
            self._notify(key, old, value)
        else:
            self._data[key] = value

    def __delitem__(self, key: str) -> None:
        old = self._data.pop(key)
        if self._observers:
            self._notify(key, old, DELETED)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        # 0.2 had no __len__, so every Store was truthy; ``if store:`` must stay so.
        return True

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def update(
        self, mapping: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), **kw: Any
    ) -> None:
        """Write several keys; every value is checked before any is written, so a bad one
        leaves the Store as it was."""
        items = list(mapping.items() if isinstance(mapping, Mapping) else mapping)
        items.extend(kw.items())
        if self._checks:
            for key, value in items:
                check = self._checks.get(key)
                if check is not None and not check(value):
                    raise self._type_error(key, value)
        data = self._data
        for key, value in items:
            if self._observers:
                old = data.get(key)
                data[key] = value
                self._notify(key, old, value)
            else:
                data[key] = value

    def keys(self) -> KeysView[str]:
        return self._data.keys()

    def values(self) -> ValuesView[Any]:
        return self._data.values()

    def items(self) -> ItemsView[str, Any]:
        return self._data.items()

    def as_dict(self) -> dict[str, Any]:
        """Return the underlying dict (no copy — modifications are reflected)."""
        return self._data

    def copy(self) -> Store:
        """A new Store with the same schema, name and (shallow-copied) data; observers
        are not copied."""
        return type(self)(self._data, self._schema, self._name)

    # ── schema ────────────────────────────────────────────────────────────────

    def validate(self) -> None:
        """Raise ValueError if any schema-required key is missing."""
        missing = [k for k in self._schema if k not in self._data]
        if missing:
            raise ValueError(f"Store[{self._name}]: required key(s) missing: {missing}")

    def _type_error(self, key: str, value: Any) -> TypeError:
        return TypeError(
            f"Store[{self._name}]: key {key!r} expects "
            f"{typecheck.describe(self._schema[key])}, got {typecheck.describe_value(value)}"
        )

    # ── observers ─────────────────────────────────────────────────────────────

    def add_observer(self, callback: Observer) -> None:
        """Register ``callback(key, old, new)``, fired after every write; ``old`` is None
        for a new key and ``new`` is :data:`DELETED` for ``del store[key]``. A failing
        observer is logged and the write stands: tracing must not break a run."""
        self._observers.append(callback)

    def remove_observer(self, callback: Observer) -> None:
        self._observers = [o for o in self._observers if o is not callback]

    def _notify(self, key: str, old: Any, new: Any) -> None:
        for observer in self._observers:
            try:
                observer(key, old, new)
            except Exception as e:
                _log.warning(
                    "Store[%s] observer %r failed on key %r: %s", self._name, observer, key, e
                )

    # ── checkpointing ─────────────────────────────────────────────────────────

    def to_json_dict(self) -> dict[str, Any]:
        """``{"name": ..., "data": {key: JSON value}}`` with values tagged by the codec;
        raises ``TypeError`` (``CodecError``) naming the first key that cannot round-trip."""
        data = {}
        for key, value in self._data.items():
            if type(key) is not str:
                raise codec.CodecError(
                    f"Store[{self._name}]: key {key!r} is a {type(key).__name__}; "
                    "checkpointed keys must be str",
                    key=str(key),
                )
            data[key] = codec.to_jsonable(value, key=key)
        return {"name": self._name, "data": data}

    @classmethod
    def from_json_dict(
        cls, payload: Mapping[str, Any], schema: Mapping[str, Any] | None = None
    ) -> Store:
        """Inverse of :meth:`to_json_dict`; also reads 0.2 payloads (plain JSON values).

        ``schema`` is applied first, so its dataclasses and models are registered before
        the values that need them are decoded."""
        data = payload.get("data") if isinstance(payload, Mapping) else None
        if not isinstance(data, Mapping):
            raise ValueError("not a Store snapshot: expected {'name': ..., 'data': {...}}")
        if schema:
            for expected in schema.values():
                for cls_ in typecheck.registered_types(expected):
                    codec.register_type(cls_)
        values = {key: codec.from_jsonable(value, key=key) for key, value in data.items()}
        return cls(data=values, schema=schema, name=payload.get("name", "store"))

    def snapshot(self, path: str | Path) -> None:
        """Write the store to a JSON file, atomically: a crash mid-write leaves the old
        file, never half a new one."""
        path = Path(path)
        text = json.dumps(self.to_json_dict(), indent=2, ensure_ascii=False, allow_nan=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _log.debug("Store snapshot saved → %s", path)

    @classmethod
    def restore(cls, path: str | Path, schema: Mapping[str, Any] | None = None) -> Store:
        """Read a snapshot written by :meth:`snapshot` (this version or 0.2)."""
        path = Path(path)
        payload = json.loads(path.read_text(encoding="utf-8"))
        try:
            store = cls.from_json_dict(payload, schema=schema)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        _log.debug("Store restored ← %s", path)
        return store
