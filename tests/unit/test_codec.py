"""pocoflow.codec: every supported value round-trips exactly; everything else says why."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import pickle
import subprocess
import sys
import uuid
import zoneinfo
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pocoflow import codec
from pocoflow.codec import CodecError, decode, encode, register_type
from tests.helpers import stable_id

ROOT = Path(__file__).resolve().parents[2]


def assert_identical(a: Any, b: Any) -> None:
    """Equal, and of the same type all the way down (== alone takes 1 for True)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
        return
    if isinstance(a, float):
        assert math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_identical(a[k], b[k])
    elif isinstance(a, Decimal):
        assert str(a) == str(b)  # NaN != NaN; str also pins exponent and sign
    elif isinstance(a, (datetime, time)):
        assert a == b and a.tzinfo == b.tzinfo and a.fold == b.fold
        assert (a.tzinfo and a.tzinfo.tzname(None)) == (b.tzinfo and b.tzinfo.tzname(None))
    else:
        assert a == b


def roundtrip(value: Any) -> Any:
    text = encode(value, key="k")
    json.loads(text, parse_constant=_no_constants)  # always strict, standard JSON
    back = decode(text, key="k")
    assert_identical(value, back)
    return back


def _no_constants(name: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {name}")


# ── types under test ──────────────────────────────────────────────────────────


@register_type
@dataclasses.dataclass
class Point:
    x: int
    y: float = 0.0
    tags: tuple[str, ...] = ()


@register_type(name="test.frozen")
@dataclasses.dataclass(frozen=True)
class Frozen:
    when: datetime
    points: list[Point]
    computed: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "computed", len(self.points))


@register_type
@dataclasses.dataclass(slots=True)
class Slotted:
    data: bytes


@register_type
class Color(enum.Enum):
    RED = "red"
    PAIR = (1, 2)


@register_type
class Level(enum.IntEnum):
    LOW = 1


@dataclasses.dataclass
class NotRegistered:
    a: int


class Plain:
    pass


NY = zoneinfo.ZoneInfo("America/New_York")

PLAIN_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    10**30,
    1.5,
    -0.0,
    1e-320,
    "",
    'héllo \n\t"quoted" \\ \x00\x1f 🙂',
    [],
    {},
    [1, "a", None, True, 2.5, [], {}],
    {"a": {"b": [1, {"c": None}]}, "": 0},
]

TAGGED_VALUES = [
    (),
    (1, "a", (2.0, None)),
    {1, 2, 3},
    set(),
    frozenset({"b", "a"}),
    {("a", 1), ("b", 2)},
    {1, "a", (2,)},  # mixed types: sorted by text
    b"",
    b"\x00\xff" * 100,
    bytearray(b"abc"),
    float("inf"),
    float("-inf"),
    datetime(2024, 2, 29, 13, 45, 1, 123456),
    datetime(2024, 1, 1, tzinfo=UTC),
    datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
    datetime(2021, 11, 7, 1, 30, tzinfo=NY),
    datetime(2021, 11, 7, 1, 30, tzinfo=NY, fold=1),
    datetime(2021, 11, 7, 1, 30, fold=1),
    date(1, 1, 1),
    time(23, 59, 59, 999999),
    time(12, tzinfo=timezone(timedelta(hours=2))),
    time(12, tzinfo=NY),
    timedelta(days=-3, seconds=5, microseconds=7),
    Decimal("1.10"),
    Decimal("-0"),
    Decimal("NaN"),
    Decimal("1E+3"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {"__pf__": "tuple", "v": [1]},  # a user dict that looks like a tag
    {"x": {"__pf__": 1, "y": (1,)}},
    Point(1, 2.5, ("a",)),
    Frozen(datetime(2020, 1, 1), [Point(1), Point(2)]),
    Slotted(b"\x01"),
    Color.RED,
    Color.PAIR,
    Level.LOW,
    [Point(1), {"p": Point(2, tags=("x", "y"))}, (Color.RED, {Level.LOW})],
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=stable_id)
def test_plain_json_values_pass_through_untouched(value: Any) -> None:
    text = encode(value, key="k")
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    roundtrip(value)


@pytest.mark.parametrize("value", TAGGED_VALUES, ids=stable_id)
def test_tagged_values_round_trip_exactly(value: Any) -> None:
    roundtrip(value)


def test_everything_nested_in_one_value_round_trips() -> None:
    roundtrip({"plain": PLAIN_VALUES, "tagged": TAGGED_VALUES, "t": tuple(TAGGED_VALUES[:20])})


def test_bool_and_int_and_float_stay_distinct() -> None:
    back = roundtrip([True, 1, 1.0, False, 0, 0.0, -0.0])
    assert [type(x) for x in back] == [bool, int, float, bool, int, float, float]


def test_nan_round_trips_as_strict_json() -> None:
    text = encode([float("nan"), 1.0], key="k")
    assert "NaN" not in text
    back = decode(text, key="k")
    assert math.isnan(back[0]) and back[1] == 1.0


def test_tuple_is_tagged_and_readable() -> None:
    assert encode((1, 2), key="k") == '{"__pf__":"tuple","v":[1,2]}'


def test_sets_encode_in_a_stable_order() -> None:
    # str hashes are salted per process; the tracker compares texts across processes.
    assert encode({"b", "c", "a"}, key="k") == '{"__pf__":"set","v":["a","b","c"]}'
    code = "from pocoflow.codec import encode; print(encode(set('abcdefgh'), key='k'))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            cwd=ROOT,
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(outputs) == 1


def test_dataclass_init_false_field_and_post_init_state_survive() -> None:
    value = Frozen(datetime(2020, 1, 1), [Point(1)])
    back = roundtrip(value)
    assert back.computed == 1


def test_registered_dataclass_text_names_the_registered_name() -> None:
    text = encode(Frozen(datetime(2020, 1, 1), []), key="k")
    assert json.loads(text)["t"] == "test.frozen"
    assert codec.registered_name(Point) == f"{__name__}.Point"


# ── large strings ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "text",
    [
        "x" * 1_000_000,
        ('line with "quotes" and \\ and \t tab\n' * 40_000),
        "".join(chr(i) for i in range(128)) * 500,
        "ascii then é" * 5000,
    ],
    ids=["clean", "escapes", "all-ascii", "non-ascii"],
)
def test_large_strings_encode_exactly_like_json(text: str) -> None:
    encoded = encode(text, key="k")
    assert encoded == json.dumps(text, ensure_ascii=False)
    assert decode(encoded, key="k") == text


# ── refusals ──────────────────────────────────────────────────────────────────


def _error(value: Any, key: str = "doc") -> CodecError:
    with pytest.raises(CodecError) as info:
        encode(value, key=key)
    assert isinstance(info.value, TypeError)
    assert info.value.key == key
    assert repr(key) in str(info.value)
    return info.value


def test_dict_with_non_str_key_is_refused_naming_the_key_type() -> None:
    err = _error({"ok": 1, "bad": {1: "one"}})
    assert "int" in str(err)
    assert err.path == "doc['bad']"


def test_nested_unencodable_value_names_its_path_and_type() -> None:
    err = _error([0, 1, 2, {"x": object()}])
    assert err.path == "doc[3]['x']"
    assert "doc[3]['x']" in str(err)
    assert "object" in str(err)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        (lambda: 1, "function"),
        (print, "builtin_function_or_method"),
        (Plain(), "Plain"),
        (complex(1, 2), "complex"),
        (iter([1]), "list_iterator"),
    ],
)
def test_unsupported_types_are_refused(value: Any, type_name: str) -> None:
    assert type_name in str(_error(value))


def test_subclasses_of_json_types_are_refused_not_flattened() -> None:
    class Name(str):
        pass

    assert "Name" in str(_error(Name("x")))
    assert "Name" in str(_error({"a": [Name("x")]}))


def test_unregistered_dataclass_error_says_how_to_register() -> None:
    err = _error({"items": [NotRegistered(1)]})
    assert "NotRegistered" in str(err)
    assert "pocoflow.codec.register_type(NotRegistered)" in str(err)
    assert err.path == "doc['items'][0]"


def test_dataclass_field_path_uses_attribute_syntax() -> None:
    err = _error(Point(1, tags=(object(),)))  # type: ignore[arg-type]
    assert err.path == "doc.tags[0]"


def test_unregistered_enum_is_refused() -> None:
    class Mood(enum.Enum):
        OK = 1

    assert "Mood" in str(_error(Mood.OK))


def test_named_fixed_offset_timezone_is_refused() -> None:
    cet = timezone(timedelta(hours=1), "CET")
    assert "CET" in str(_error(datetime(2020, 1, 1, tzinfo=cet)))


def test_cycles_and_runaway_nesting_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert "itself" in str(_error(loop))
    looped_tuple: list[Any] = []
    looped_tuple.append((looped_tuple,))
    _error(looped_tuple)


def test_codec_error_pickles_with_key_and_path() -> None:
    err = _error({"x": [object()]})
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.key, back.path) == (CodecError, str(err), "doc", err.path)


# ── decoding ──────────────────────────────────────────────────────────────────


def test_decode_reads_plain_0_2_json_including_nan() -> None:
    assert decode('{"a": [1, 2.5, "x"], "b": null}', key="k") == {"a": [1, 2.5, "x"], "b": None}
    assert math.isnan(decode("NaN", key="k"))
    assert decode(b'{"a": 1}', key="k") == {"a": 1}


def test_decode_of_unregistered_name_asks_for_register_type() -> None:
    text = '{"__pf__":"dataclass","t":"some.module.Missing","v":{}}'
    with pytest.raises(CodecError) as info:
        decode(text, key="order")
    assert "'order'" in str(info.value)
    assert "pocoflow.codec.register_type(Missing)" in str(info.value)


def test_decode_never_imports_a_module_named_by_the_data() -> None:
    text = '{"__pf__":"dataclass","t":"antigravity.Thing","v":{}}'
    with pytest.raises(CodecError):
        decode(text, key="k")
    assert "antigravity" not in sys.modules


@pytest.mark.parametrize(
    "text",
    [
        '{"__pf__":"nope","v":1}',
        '{"__pf__":["x"],"v":1}',
        '{"__pf__":"bytes","v":"not base64!"}',
        '{"__pf__":"tuple"}',
        '{"__pf__":"enum","t":"tests.unit.test_codec.Point","v":1}',
        "{not json",
    ],
)
def test_bad_checkpoint_text_raises_codec_error_naming_the_key(text: str) -> None:
    with pytest.raises(CodecError, match="'broken'"):
        decode(text, key="broken")


def test_jsonable_forms_round_trip_without_touching_the_input() -> None:
    value = {"t": (1, {2}), "p": Point(3), "__pf__": "x"}
    obj = codec.to_jsonable(value, key="k")
    json.dumps(obj, allow_nan=False)
    frozen = json.dumps(obj)
    assert_identical(codec.from_jsonable(obj, key="k"), value)
    assert json.dumps(obj) == frozen


# ── the registry ──────────────────────────────────────────────────────────────


def test_register_type_is_idempotent_and_returns_the_class() -> None:
    assert register_type(Point) is Point
    assert register_type(Point, f"{__name__}.Point") is Point


def test_register_type_refuses_a_taken_name_and_unsupported_classes() -> None:
    @dataclasses.dataclass
    class Other:
        a: int

    with pytest.raises(ValueError, match="already registered"):
        register_type(Other, name="test.frozen")
    with pytest.raises(TypeError, match="dataclass, pydantic model or Enum"):
        register_type(Plain)


def test_a_second_name_keeps_old_checkpoints_readable() -> None:
    @dataclasses.dataclass
    class Renamed:
        a: int

    register_type(Renamed, name="test.renamed.v1")
    old_text = encode(Renamed(1), key="k")
    register_type(Renamed, name="test.renamed.v2")
    assert json.loads(encode(Renamed(1), key="k"))["t"] == "test.renamed.v2"
    assert decode(old_text, key="k") == Renamed(1)


def test_a_reloaded_class_replaces_its_old_definition() -> None:
    def define() -> type:
        @dataclasses.dataclass
        class Reloaded:
            a: int

        return Reloaded

    first, second = define(), define()
    register_type(first)
    register_type(second)
    assert type(decode(encode(second(1), key="k"), key="k")) is second


# ── pydantic, only when used ──────────────────────────────────────────────────


def test_pydantic_models_round_trip_when_registered() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Item(pydantic.BaseModel):
        name: str
        at: datetime
        meta: dict[str, int] = {}

    with pytest.raises(CodecError, match="register_type"):
        encode(Item(name="a", at=datetime(2020, 1, 1)), key="k")
    register_type(Item)
    value = [Item(name="a", at=datetime(2020, 1, 1, tzinfo=UTC), meta={"__pf__": 1})]
    back = roundtrip(value)
    assert back[0].at.tzinfo == UTC


def test_codec_does_not_import_pydantic_for_plain_or_dataclass_values() -> None:
    code = (
        "import sys, dataclasses\n"
        "from pocoflow.codec import encode, decode, register_type\n"
        "@register_type\n"
        "@dataclasses.dataclass\n"
        "class P:\n"
        "    x: int\n"
        "decode(encode({'a': (1, P(2)), 'b': {3}}, key='k'), key='k')\n"
        "print('pydantic' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


def _registered_model(**fields: Any) -> Any:
    pydantic = pytest.importorskip("pydantic")
    model = pydantic.create_model("Lossy", **fields)
    register_type(model, name=f"tests.Lossy{id(model)}")
    return model


@pytest.mark.parametrize(
    ("value", "type_name", "became"),
    [
        ((1, 2), "tuple", "list"),
        (date(2026, 1, 2), "datetime.date", "str"),
        ({1, 2}, "set", "list"),
        (Decimal("1.5"), "decimal.Decimal", "str"),
    ],
)
def test_pydantic_model_that_would_not_round_trip_is_refused_naming_key_field_and_type(
    value: Any, type_name: str, became: str
) -> None:
    # An ``Any`` field dumps a tuple as a list and a date as a str; model_validate then
    # keeps them so: the checkpoint would silently hand back a different value.
    model = _registered_model(x=(Any, None), y=(float, 0.0))
    err = _error({"m": [model(x=value)]})
    assert err.path == "doc['m'][0].x"
    assert f"of type {type_name}" in str(err)
    assert f"comes back as {became}" in str(err)
    with pytest.raises(CodecError):
        codec.to_jsonable(model(x=value), key="doc")


def test_pydantic_model_whose_dump_fails_names_the_model_type() -> None:
    model = _registered_model(x=(Any, None))
    err = _error(model(x=b"\xff"))
    assert "Lossy" in str(err) and "model_dump" in str(err)


def test_pydantic_model_with_exact_field_types_still_round_trips() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Exact(pydantic.BaseModel):
        pair: tuple[int, int]
        day: date
        tags: frozenset[str] = frozenset()
        score: float = 0.0
        extra: Any = None

    register_type(Exact)
    roundtrip(Exact(pair=(1, 2), day=date(2026, 1, 2), tags=frozenset({"a"}), extra=[1]))
    # NaN != NaN, but it does come back: not a reason to refuse.
    back = decode(
        encode(Exact(pair=(1, 2), day=date(2026, 1, 2), score=math.nan), key="k"), key="k"
    )
    assert math.isnan(back.score)
    roundtrip(Exact(pair=(1, 2), day=date(2026, 1, 2), score=math.inf))


def test_pydantic_private_attribute_that_would_be_lost_is_refused() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Cached(pydantic.BaseModel):
        x: int
        _memo: int = pydantic.PrivateAttr(default=0)

    register_type(Cached)
    roundtrip(Cached(x=1))
    value = Cached(x=1)
    value._memo = 5
    err = _error(value)
    assert "_memo" in str(err) and "Cached" in str(err)


@pytest.mark.parametrize(
    "value", [10**5000, -(10**5000), {"a": [1, 10**5000]}], ids=["int", "negative", "nested"]
)
def test_int_over_the_str_digit_limit_is_refused_naming_the_key(value: Any) -> None:
    err = _error(value)
    assert "digits" in str(err) and "of type int" in str(err)
    with pytest.raises(CodecError, match="'doc'"):
        codec.to_jsonable(value, key="doc")
    roundtrip(10**4000)  # under the limit: fine
