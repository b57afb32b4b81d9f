"""Store values <-> JSON text, losslessly, or a loud error.

Checkpoints are how a run survives a crash and moves between workers, so a value that
comes back different (a tuple turned list, a set turned string, a dataclass turned
dict) is a silent bug in someone else's node. This codec therefore either round-trips a
value exactly or raises :class:`CodecError` naming the Store key, the path inside the
value and the offending type (G7).

Plain JSON values (``str``, ``int``, ``float``, ``bool``, ``None``, ``list``, ``dict``
with ``str`` keys) are written as themselves, so checkpoints stay readable and 0.2
checkpoints decode unchanged. Other supported values are wrapped as
``{"__pf__": TAG, "v": ...}``:

========== ==============================================================
tag        value
========== ==============================================================
tuple      ``tuple`` (``set``/``frozenset`` likewise, items sorted when possible)
bytes      ``bytes`` (and ``bytearray``), base64
float      ``nan``, ``inf``, ``-inf`` (kept out of the text: not JSON)
datetime   ``datetime``/``date``/``time`` (ISO 8601; ``zoneinfo`` zones by key)
timedelta  ``[days, seconds, microseconds]``
decimal    ``Decimal`` as its exact string; ``uuid`` likewise
dict       a dict that has a ``"__pf__"`` key of its own, as ``[key, value]`` pairs
dataclass  a registered dataclass, ``"t"`` = registered name, ``"v"`` = fields
model      a registered pydantic v2 model (``model_dump(mode="json")``, which must
           ``model_validate`` back to an equal model, else refused naming the field)
enum       a registered ``Enum`` member, by value
========== ==============================================================

Decoding never imports anything named by the data: classes come only from the registry
filled by :func:`register_type` (a Store schema registers its types itself), so a
checkpoint cannot make a worker load code.
"""

from __future__ import annotations

import binascii
import dataclasses
import json
import math
import sys
import threading
import zoneinfo
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar, overload
from uuid import UUID

__all__ = [
    "CodecError",
    "decode",
    "encode",
    "from_jsonable",
    "register_type",
    "registered_name",
    "to_jsonable",
]

TAG = "__pf__"

_T = TypeVar("_T", bound=type)

# allow_nan=False: NaN/Infinity are not JSON (PostgreSQL and browsers reject them), and
# the ValueError it raises is how the fast path hands non-finite floats to the tagger.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_dumps = _ENCODER.encode
_loads = json.JSONDecoder().decode


class CodecError(TypeError):
    """A value cannot be checkpointed losslessly (or a checkpoint cannot be read back).

    A ``TypeError`` because that is what 0.2 users catch for bad Store values. ``key``
    is the Store key and ``path`` the place inside the value (``key[3]['x']``).
    """

    def __init__(self, message: str, key: str | None = None, path: str | None = None):
        super().__init__(message)
        self.key = key
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery and multiprocessing pickle exceptions; keep key and path across.
        return (type(self), (self.args[0], self.key, self.path))


class _Unencodable(Exception):
    """Raised deep in the walk; each level adds its path segment while unwinding, so the
    happy path never formats a path."""

    def __init__(self, value: Any, reason: str):
        super().__init__(reason)
        self.type_name = _type_name(type(value))
        self.reason = reason
        self.segments: list[str] = []

    def to_error(self, key: str) -> CodecError:
        path = str(key) + "".join(reversed(self.segments))
        where = f" at {path}" if self.segments else ""
        return CodecError(
            f"Store key {key!r}: cannot checkpoint value{where} of type {self.type_name}: "
            f"{self.reason}",
            key=key,
            path=path,
        )


class _Undecodable(Exception):
    pass


def _type_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


# ── registry ──────────────────────────────────────────────────────────────────

_by_name: dict[str, type] = {}
_by_class: dict[type, tuple[str, str]] = {}  # class -> (name, kind)
_registry_lock = threading.Lock()


def _kind(cls: Any) -> str | None:
    if not isinstance(cls, type):
        return None
    if issubclass(cls, Enum):
        return "enum"
    # Duck typing keeps pydantic unimported until a model is really used.
    if hasattr(cls, "model_validate") and hasattr(cls, "model_dump"):
        return "model"
    if dataclasses.is_dataclass(cls):
        return "dataclass"
    return None


@overload
def register_type(cls: _T, name: str | None = None) -> _T: ...
@overload
def register_type(cls: None = None, name: str | None = None) -> Callable[[_T], _T]: ...
def register_type(cls: Any = None, name: str | None = None) -> Any:
    """Allow instances of ``cls`` (a dataclass, pydantic v2 model or Enum) in checkpoints.

    Use as ``register_type(Order)``, ``@register_type`` or ``@register_type(name="order")``.
    ``name`` (default ``module.QualName``) is what checkpoints record, so pass one that
    outlives renames. Every process that decodes the checkpoint must register the class
    too: importing the module that defines it is enough when registration happens there.
    Registering again is a no-op; a new name keeps the old one readable.
    """
    if isinstance(cls, str) and name is None:
        cls, name = None, cls
    if cls is None:
        return lambda c: register_type(c, name)
    kind = _kind(cls)
    if kind is None:
        raise TypeError(
            f"register_type() takes a dataclass, pydantic model or Enum class, not {cls!r}"
        )
    with _registry_lock:
        current = _by_class.get(cls)
        if name is None:
            if current is not None:
                return cls
            name = _type_name(cls)
        other = _by_name.get(name)
        if other is not None and other is not cls:
            if _type_name(other) != _type_name(cls):
                raise ValueError(
                    f"codec type name {name!r} is already registered for "
                    f"{_type_name(other)}; pass another name= for {_type_name(cls)}"
                )
            # Same qualified name, new class object: a module reload. The new one wins.
            _by_class.pop(other, None)
        _by_name[name] = cls
        _by_class[cls] = (name, kind)
    return cls


def registered_name(cls: type) -> str | None:
    """The name checkpoints record for ``cls``, or None when it is not registered."""
    entry = _by_class.get(cls)
    return entry[0] if entry else None


# ── encoding ──────────────────────────────────────────────────────────────────

_SCALARS = frozenset({str, int, float, bool, type(None)})
_STR = frozenset({str})

# The plain check decides whether json.dumps alone is lossless. Exact types only: a str
# subclass, a tuple or an int dict key would be flattened by json without a word.
# issuperset(map(type, ...)) runs in C, so an all-scalar container costs one C pass.


def _plain_list(v: list[Any]) -> bool:
    if _SCALARS.issuperset(map(type, v)):
        return True
    for x in v:
        t = type(x)
        if t is dict:
            if not _plain_dict(x):
                return False
        elif t is list:
            if not _plain_list(x):
                return False
        elif t not in _SCALARS:
            return False
    return True


def _plain_dict(d: dict[Any, Any]) -> bool:
    if TAG in d or not _STR.issuperset(map(type, d)):
        return False
    values = d.values()
    if _SCALARS.issuperset(map(type, values)):
        return True
    for x in values:
        t = type(x)
        if t is dict:
            if not _plain_dict(x):
                return False
        elif t is list:
            if not _plain_list(x):
                return False
        elif t not in _SCALARS:
            return False
    return True


# A large ASCII string with nothing to escape (no quote, backslash or control
# character) is its own JSON body: one memchr-speed scan per special character beats
# json's per-character escaper about 4x. Commonest specials first, so text that does
# need escaping (LLM output is full of newlines) leaves for json after a few bytes.
_BIG_STR = 1 << 15
_SPECIALS = '\n"\\\t\r' + "".join(chr(i) for i in range(32) if chr(i) not in "\n\t\r")


def _encode_str(s: str) -> str:
    if len(s) >= _BIG_STR and s.isascii():
        for char in _SPECIALS:
            if char in s:
                return _dumps(s)
        return f'"{s}"'
    return _dumps(s)


def _items(values: Any, mark: Callable[[int], str]) -> list[Any]:
    out = []
    for i, x in enumerate(values):
        try:
            out.append(_to_json(x))
        except _Unencodable as e:
            e.segments.append(mark(i))
            raise
    return out


def _index(i: int) -> str:
    return f"[{i}]"


def _member(_: int) -> str:
    return "{*}"


def _dict(d: dict[Any, Any]) -> Any:
    out = {}
    for k, x in d.items():
        if type(k) is not str:
            raise _Unencodable(
                d, f"its key {k!r} ({_type_name(type(k))}) is not a str; dict keys must be str"
            )
        try:
            out[k] = _to_json(x)
        except _Unencodable as e:
            e.segments.append(f"[{k!r}]")
            raise
    if TAG in out:
        return {TAG: "dict", "v": [[k, x] for k, x in out.items()]}
    return out


def _set(v: set[Any] | frozenset[Any]) -> Any:
    # Sorted so equal sets give equal text in every process (str hashes are salted);
    # the tracker compares texts.
    try:
        items = _items(sorted(v), _member)
    except _Unencodable:
        raise
    except Exception:
        items = sorted(_items(v, _member), key=_dumps)
    return {TAG: type(v).__name__, "v": items}


def _fixed_offset(tz: tzinfo) -> bool:
    # ISO 8601 keeps only the offset, and timezone equality ignores the name, so a
    # timezone(offset, "CET") would silently come back named "UTC+01:00".
    if type(tz) is not timezone:
        return False
    return tz.tzname(None) == timezone(tz.utcoffset(None)).tzname(None)


def _tz_fields(value: datetime | time, out: dict[str, Any]) -> None:
    tz = value.tzinfo
    if tz is None or _fixed_offset(tz):
        out["v"] = value.isoformat()
    elif type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
        # Wall time plus zone key (and fold): DST rules survive, not just today's offset.
        out["v"] = value.replace(tzinfo=None).isoformat()
        out["tz"] = tz.key
    else:
        raise _Unencodable(
            value,
            f"its tzinfo {tz!r} cannot be restored exactly; use zoneinfo.ZoneInfo or "
            "an unnamed datetime.timezone",
        )


def _temporal(value: datetime | time) -> Any:
    out: dict[str, Any] = {TAG: type(value).__name__}
    _tz_fields(value, out)
    if value.fold:
        out["fold"] = 1
    return out


def _dataclass(v: Any, name: str) -> Any:
    fields = {}
    for f in dataclasses.fields(v):
        try:
            fields[f.name] = _to_json(getattr(v, f.name))
        except _Unencodable as e:
            e.segments.append(f".{f.name}")
            raise
    return {TAG: "dataclass", "t": name, "v": fields}


def _model(v: Any, name: str) -> Any:
    # model_dump(mode="json") is only lossless when the field types pin the Python types
    # down: an ``Any`` field turns a tuple into a list and a date into a str, and
    # model_validate cannot tell. So the dump must validate back to an equal model (only
    # models pay this), else the write is refused naming the field that changed.
    try:
        dump = v.model_dump(mode="json")
    except Exception as e:
        raise _Unencodable(v, f"model_dump(mode='json') failed: {e}") from None
    try:
        back = type(v).model_validate(dump)
    except Exception as e:
        raise _Unencodable(
            v,
            "model_validate() rejects its own model_dump(mode='json'), so the checkpoint "
            f"could not be read back: {e}",
        ) from None
    if back != v:
        diff = _model_diff(v, back, [])
        if diff is not None:
            segments, was, became, why = diff
            err = _Unencodable(
                was,
                why
                or (
                    f"the pydantic model {_type_name(type(v))} does not round-trip it: "
                    "after model_dump(mode='json') and model_validate() it comes back "
                    f"as {_type_name(type(became))} {became!r:.80}; give the field an "
                    "exact type (e.g. tuple[int, int] or datetime.date rather than Any) "
                    "or store a JSON value"
                ),
            )
            err.segments.extend(reversed(segments))
            raise err
    return {TAG: "model", "t": name, "v": _to_json(dump)}


_Diff = tuple[list[str], Any, Any, str | None]


def _model_diff(a: Any, b: Any, path: list[str]) -> _Diff | None:
    """Where ``b`` (``a`` after a model dump/validate round trip) differs from ``a``: the
    path segments, the original part, what it became and maybe why; None when the same.
    Like ``==``, except that NaN equals NaN (a NaN field must not be refused)."""
    if a is b:
        return None
    ta = type(a)
    if ta is not type(b):
        return path, a, b, None
    if ta is float:
        same = a == b or (math.isnan(a) and math.isnan(b))
        return None if same else (path, a, b, None)
    if ta is Decimal:
        return None if str(a) == str(b) else (path, a, b, None)
    if ta is list or ta is tuple:
        if len(a) != len(b):
            return path, a, b, None
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _model_diff(x, y, [*path, f"[{i}]"])
            if found is not None:
                return found
        return None
    if ta is dict:
        if list(a) != list(b):
            return path, a, b, None
        for k, x in a.items():
            found = _model_diff(x, b[k], [*path, f"[{k!r}]"])
            if found is not None:
                return found
        return None
    if _kind(ta) == "model":
        fields_a, fields_b = a.__dict__, b.__dict__
        extra_a = getattr(a, "__pydantic_extra__", None) or {}
        extra_b = getattr(b, "__pydantic_extra__", None) or {}
        for k in [*ta.model_fields, *extra_a, *(k for k in extra_b if k not in extra_a)]:
            x = fields_a[k] if k in fields_a else extra_a.get(k)
            y = fields_b[k] if k in fields_b else extra_b.get(k)
            found = _model_diff(x, y, [*path, f".{k}"])
            if found is not None:
                return found
        private_a = getattr(a, "__pydantic_private__", None) or {}
        private_b = getattr(b, "__pydantic_private__", None) or {}
        for k, x in private_a.items():
            if _model_diff(x, private_b.get(k), []) is not None:
                why = (
                    f"its private attribute {k} is left out by model_dump() and would "
                    "come back as its default"
                )
                return path, a, b, why
        return None
    try:
        return None if a == b else (path, a, b, None)
    except Exception:
        return path, a, b, None


def _enum(v: Enum, name: str) -> Any:
    try:
        value = _to_json(v.value)
    except _Unencodable as e:
        e.segments.append(".value")
        raise
    return {TAG: "enum", "t": name, "v": value}


_ENCODERS: dict[type, Callable[[Any], Any]] = {
    tuple: lambda v: {TAG: "tuple", "v": _items(v, _index)},
    set: _set,
    frozenset: _set,
    bytes: lambda v: {TAG: "bytes", "v": binascii.b2a_base64(v, newline=False).decode()},
    bytearray: lambda v: {
        TAG: "bytearray",
        "v": binascii.b2a_base64(v, newline=False).decode(),
    },
    datetime: _temporal,
    time: _temporal,
    date: lambda v: {TAG: "date", "v": v.isoformat()},
    timedelta: lambda v: {TAG: "timedelta", "v": [v.days, v.seconds, v.microseconds]},
    Decimal: lambda v: {TAG: "decimal", "v": str(v)},
    UUID: lambda v: {TAG: "uuid", "v": str(v)},
}
_REGISTERED: dict[str, Callable[[Any, str], Any]] = {
    "dataclass": _dataclass,
    "model": _model,
    "enum": _enum,
}


def _to_json(v: Any) -> Any:
    """The JSON-able form of ``v``: plain values as is, the rest tagged."""
    t = type(v)
    if t is int:
        return v if -_INT_SAFE < v < _INT_SAFE else _big_int(v)
    if t is str or t is bool or v is None:
        return v
    if t is float:
        return v if math.isfinite(v) else {TAG: "float", "v": repr(v)}
    if t is list:
        return _items(v, _index)
    if t is dict:
        return _dict(v)
    encoder = _ENCODERS.get(t)
    if encoder is not None:
        return encoder(v)
    entry = _by_class.get(t)
    if entry is not None:
        return _REGISTERED[entry[1]](v, entry[0])
    raise _Unencodable(v, _hint(v))


# Python refuses to turn an int of more than sys.get_int_max_str_digits() digits (4300
# by default, 640 at least) into text, and json.dumps with it: with a bare ValueError
# that names no key. Ints below 640 digits never need the check.
_INT_SAFE = 10**639


def _big_int(v: int) -> int:
    try:
        str(v)  # fails fast (before converting) when over the limit
    except ValueError:
        raise _Unencodable(
            v,
            f"it has more than {sys.get_int_max_str_digits()} digits, Python's int/str "
            "conversion limit (sys.set_int_max_str_digits); store it as a str or bytes",
        ) from None
    return v


def _hint(v: Any) -> str:
    kind = _kind(type(v))
    if kind is not None:
        return (
            f"call pocoflow.codec.register_type({type(v).__qualname__}) where it is "
            "defined, or declare it in the Store schema"
        )
    return (
        "a checkpoint holds JSON types, tuple, set, frozenset, bytes, datetime, date, "
        "time, timedelta, Decimal, UUID and registered dataclasses, pydantic models and "
        "enums; convert it first"
    )


def _fail(key: str, e: BaseException) -> CodecError:
    if isinstance(e, _Unencodable):
        return e.to_error(key)
    if isinstance(e, RecursionError):
        return CodecError(
            f"Store key {key!r}: value is nested too deeply or contains itself", key=key
        )
    return CodecError(f"Store key {key!r}: cannot checkpoint value: {e}", key=key)


def encode(value: Any, *, key: str) -> str:
    """Compact JSON text of ``value``; ``decode`` gives back an equal value of equal type.

    Plain JSON values cost about one ``json.dumps``; ``CodecError`` names ``key`` and the
    path and type of the first part that cannot round-trip.
    """
    try:
        if type(value) is str:
            return _encode_str(value)
        if type(value) in _SCALARS or _is_plain(value):
            try:
                return _dumps(value)
            except ValueError:
                pass  # NaN/inf somewhere (or an int past the digit limit): tag below
        return _dumps(_to_json(value))
    except (_Unencodable, RecursionError, ValueError) as e:
        raise _fail(key, e) from None


def _is_plain(value: Any) -> bool:
    t = type(value)
    if t is list:
        return _plain_list(value)
    if t is dict:
        return _plain_dict(value)
    return False


def to_jsonable(value: Any, *, key: str) -> Any:
    """``value`` as JSON-able objects (tagged like ``encode``), for embedding in a larger
    document such as a snapshot file. May share structure with ``value``: do not mutate."""
    try:
        return _to_json(value)
    except (_Unencodable, RecursionError, ValueError) as e:
        raise _fail(key, e) from None


# ── decoding ──────────────────────────────────────────────────────────────────


def _registered_class(d: dict[str, Any], kind: str) -> Any:
    name = d.get("t")
    cls = _by_name.get(name) if isinstance(name, str) else None
    if cls is None:
        short = str(name).rpartition(".")[2] or "TheClass"
        raise _Undecodable(
            f"type {name!r} is not registered in this process; call "
            f"pocoflow.codec.register_type({short}) in the module that defines it and "
            "import that module before loading the checkpoint"
        )
    if _kind(cls) != kind:
        raise _Undecodable(f"{name!r} is registered as a {_kind(cls)}, not a {kind}")
    return cls


def _decode_dataclass(d: dict[str, Any]) -> Any:
    cls = _registered_class(d, "dataclass")
    stored = d["v"]
    fields = dataclasses.fields(cls)
    obj = cls(**{f.name: stored[f.name] for f in fields if f.init and f.name in stored})
    for f in fields:
        if not f.init and f.name in stored:
            # init=False fields hold state __init__ does not take; frozen classes too.
            object.__setattr__(obj, f.name, stored[f.name])
    return obj


def _decode_temporal(cls: type[datetime] | type[time]) -> Callable[[dict[str, Any]], Any]:
    def decode_one(d: dict[str, Any]) -> Any:
        value = cls.fromisoformat(d["v"])
        if "tz" in d:
            value = value.replace(tzinfo=zoneinfo.ZoneInfo(d["tz"]))
        if d.get("fold"):
            value = value.replace(fold=1)
        return value

    return decode_one


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

_DECODERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tuple": lambda d: tuple(d["v"]),
    "set": lambda d: set(d["v"]),
    "frozenset": lambda d: frozenset(d["v"]),
    "dict": lambda d: {k: v for k, v in d["v"]},
    "bytes": lambda d: binascii.a2b_base64(d["v"], strict_mode=True),
    "bytearray": lambda d: bytearray(binascii.a2b_base64(d["v"], strict_mode=True)),
    "float": lambda d: _NON_FINITE[d["v"]],
    "datetime": _decode_temporal(datetime),
    "time": _decode_temporal(time),
    "date": lambda d: date.fromisoformat(d["v"]),
    "timedelta": lambda d: timedelta(*d["v"]),
    "decimal": lambda d: Decimal(d["v"]),
    "uuid": lambda d: UUID(d["v"]),
    "dataclass": _decode_dataclass,
    "model": lambda d: _registered_class(d, "model").model_validate(d["v"]),
    "enum": lambda d: _registered_class(d, "enum")(d["v"]),
}


def _revive(d: dict[str, Any]) -> Any:
    tag = d.get(TAG)
    if tag is None:
        return d
    decoder = _DECODERS.get(tag) if type(tag) is str else None
    if decoder is None:
        raise _Undecodable(
            f"unknown codec tag {tag!r} (written by a newer pocoflow, or a dict that was "
            "not written by pocoflow.codec)"
        )
    try:
        return decoder(d)
    except _Undecodable:
        raise
    except Exception as e:
        raise _Undecodable(f"malformed {tag!r} value {d!r:.200}: {e}") from e


_loads_tagged = json.JSONDecoder(object_hook=_revive).decode


def decode(text: str | bytes, *, key: str) -> Any:
    """The value ``encode`` was given. Also reads 0.2 checkpoints (plain JSON)."""
    if not isinstance(text, str):
        text = bytes(text).decode("utf-8")
    try:
        # Tagged text always contains the marker literally, and a top-level string has
        # no objects at all (the marker search over a big string is not free).
        if text[:1] == '"' or TAG not in text:
            return _loads(text)
        return _loads_tagged(text)
    except _Undecodable as e:
        raise CodecError(f"Store key {key!r}: cannot restore value: {e}", key=key) from None
    except ValueError as e:
        raise CodecError(f"Store key {key!r}: checkpoint text is not JSON: {e}", key=key) from e


def _revive_tree(o: Any) -> Any:
    t = type(o)
    if t is list:
        return [_revive_tree(x) for x in o]
    if t is dict:
        d = {k: _revive_tree(x) for k, x in o.items()}
        return _revive(d) if TAG in d else d
    return o


def from_jsonable(obj: Any, *, key: str) -> Any:
    """Inverse of ``to_jsonable`` (``obj`` is not modified)."""
    try:
        return _revive_tree(obj)
    except _Undecodable as e:
        raise CodecError(f"Store key {key!r}: cannot restore value: {e}", key=key) from None
