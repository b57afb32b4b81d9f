"""pocoflow.typecheck: 0.2 isinstance semantics, plus typing generics checked deeply."""

from __future__ import annotations

import collections
import collections.abc as abc
import dataclasses
import enum
import typing
from typing import Any, Literal, Optional, Union

import pytest

from pocoflow.typecheck import checker, describe, describe_value, matches, registered_types
from tests.helpers import stable_id


class Base:
    pass


class Child(Base):
    pass


class Mode(enum.Enum):
    FAST = "fast"


UserId = typing.NewType("UserId", int)
Num = typing.TypeVar("Num", int, float)
Bounded = typing.TypeVar("Bounded", bound=Base)


class Movie(typing.TypedDict):
    title: str


@typing.runtime_checkable
class HasLen(typing.Protocol):
    def __len__(self) -> int: ...


CASES: list[tuple[Any, Any, bool]] = [
    # 0.2: classes and tuples of classes, plain isinstance
    (1, int, True),
    (True, int, True),  # isinstance(True, int), as 0.2 did
    (1, float, False),
    ("x", (int, str), True),
    (None, (int, str), False),
    (Child(), Base, True),
    (Base(), Child, False),
    ([1], list, True),
    # Any / object / None
    (object(), Any, True),
    (None, None, True),
    (0, None, False),
    # lists, deeply
    (["a", "b"], list[str], True),
    ([], list[str], True),
    (["a", 1], list[str], False),
    (("a",), list[str], False),
    ([["a"], ["b"]], list[list[str]], True),
    ([["a"], [2]], list[list[str]], False),
    (["a"], typing.List[str], True),  # noqa: UP006
    ([1], typing.List, True),  # noqa: UP006
    # dicts
    ({"a": 1}, dict[str, int], True),
    ({"a": "1"}, dict[str, int], False),
    ({1: 1}, dict[str, int], False),
    ({"a": [1, 2]}, dict[str, list[int]], True),
    ({"a": [1, "2"]}, dict[str, list[int]], False),
    ({"a": 1}, typing.Dict[str, Any], True),  # noqa: UP006
    ({"a": 1}, abc.Mapping[str, int], True),
    (collections.OrderedDict(a=1), dict[str, int], True),
    # sets
    ({1, 2}, set[int], True),
    ({1, "2"}, set[int], False),
    (frozenset({1}), set[int], False),
    (frozenset({1}), frozenset[int], True),
    ({1}, abc.Set[int], True),
    # tuples
    ((1, "a"), tuple[int, str], True),
    ((1, 2), tuple[int, str], False),
    ((1, "a", 3), tuple[int, str], False),
    ((1, 2, 3), tuple[int, ...], True),
    ((), tuple[int, ...], True),
    ((1, "2"), tuple[int, ...], False),
    ([1, 2], tuple[int, ...], False),
    ((), tuple[()], True),
    ((1,), tuple[()], False),
    ((1,), typing.Tuple[int], True),  # noqa: UP006
    # unions and optionals
    (None, Optional[int], True),  # noqa: UP045
    (3, Optional[int], True),  # noqa: UP045
    ("3", Optional[int], False),  # noqa: UP045
    (None, int | None, True),
    ("a", Union[int, str], True),  # noqa: UP007
    ([1, None], list[int | None], True),
    (["x"], list[str] | None, True),
    ([1], list[str] | None, False),
    ("x", (int, list[str]), False),
    (["x"], (int, list[str]), True),
    # literals: equal and same type
    ("a", Literal["a", "b"], True),
    ("c", Literal["a", "b"], False),
    (1, Literal[1], True),
    (True, Literal[1], False),
    (1.0, Literal[1], False),
    (Mode.FAST, Literal[Mode.FAST], True),
    ("fast", Literal[Mode.FAST], False),
    # wrappers and the rest of typing
    (1, typing.Annotated[int, "meta"], True),
    ("1", typing.Annotated[int, {"unhashable": []}], False),
    (5, UserId, True),
    ("5", UserId, False),
    (1.5, Num, True),
    ("x", Num, False),
    (Child(), Bounded, True),
    (1, Bounded, False),
    (int, type[int], True),
    (bool, type[int], True),
    (str, type[int], False),
    (1, type[int], False),
    (str, type[int | str], True),
    (len, abc.Callable[[Any], int], True),
    (1, abc.Callable[[Any], int], False),
    ({"title": "x"}, Movie, True),
    ([1], HasLen, True),
    (1, HasLen, False),
    (iter([1]), abc.Iterator[str], True),  # not consumed, so not inspected
    ("abc", abc.Sequence[str], True),
    (b"ab", abc.Sequence[int], True),  # bytes: isinstance only
]


@pytest.mark.parametrize(("value", "expected", "ok"), CASES, ids=stable_id)
def test_matches(value: Any, expected: Any, ok: bool) -> None:
    assert matches(value, expected) is ok


def test_iterators_are_not_consumed() -> None:
    it = iter([1, 2])
    assert matches(it, abc.Iterator[str])
    assert list(it) == [1, 2]


def test_checkers_are_compiled_once_per_type() -> None:
    assert checker(list[str]) is checker(list[str])


@pytest.mark.parametrize(
    "bad",
    ["int", typing.ForwardRef("int"), 3, typing.Protocol, typing.NoReturn],
    ids=stable_id,
)
def test_unsupported_schema_types_fail_when_compiled(bad: Any) -> None:
    with pytest.raises(TypeError):
        checker(bad)


def test_non_runtime_protocol_says_how_to_fix() -> None:
    class Sized(typing.Protocol):
        def size(self) -> int: ...

    with pytest.raises(TypeError, match="runtime_checkable"):
        checker(Sized)


@pytest.mark.parametrize(
    ("expected", "text"),
    [
        (int, "int"),
        (Child, "Child"),
        ((int, str), "int | str"),
        (list[str], "list[str]"),
        (typing.List[str], "list[str]"),  # noqa: UP006
        (dict[str, list[int]], "dict[str, list[int]]"),
        (tuple[int, ...], "tuple[int, ...]"),
        (tuple[()], "tuple[()]"),
        (Optional[int], "int | None"),  # noqa: UP045
        (int | None, "int | None"),
        (Literal["a", 1], "Literal['a', 1]"),
        (Any, "Any"),
        (None, "None"),
        (typing.Annotated[int, "x"], "int"),
        (UserId, "UserId"),
        (abc.Callable[[int], str], "Callable[[int], str]"),
        (abc.Sequence[str], "Sequence[str]"),
    ],
    ids=stable_id,
)
def test_describe(expected: Any, text: str) -> None:
    assert describe(expected) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1, "int"),
        ([], "list"),
        ([1, "a", 2], "list[int | str]"),
        ({"a": 1}, "dict[str, int]"),
        ((1, "a"), "tuple[int, str]"),
        (tuple(range(10)), "tuple[int, ...]"),
        ({1.0}, "set[float]"),
        (list(range(3)) + [str(i) * 1 for i in range(3)] + [1.0, None, b"", ()], None),
    ],
)
def test_describe_value_shows_types_not_data(value: Any, text: str | None) -> None:
    described = describe_value(value)
    if text is not None:
        assert described == text
    else:
        assert described.endswith("...]")  # capped


# ── registered_types ──────────────────────────────────────────────────────────


@dataclasses.dataclass
class Leaf:
    n: int


@dataclasses.dataclass
class Branch:
    leaves: list[Leaf]
    mode: Mode
    parent: Branch | None = None


def test_registered_types_finds_classes_inside_generics_and_dataclass_fields() -> None:
    found = list(registered_types(dict[str, list[Branch] | None]))
    assert found == [Branch, Leaf, Mode]


def test_registered_types_ignores_plain_classes_and_base_classes() -> None:
    assert list(registered_types((int, str, list[dict[str, Any]]))) == []
    assert list(registered_types(enum.Enum)) == []


def test_registered_types_finds_enums_in_literals() -> None:
    assert list(registered_types(Literal[Mode.FAST, "x"])) == [Mode]


def test_registered_types_finds_pydantic_models_but_not_basemodel() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Doc(pydantic.BaseModel):
        leaf: Leaf

    assert list(registered_types(Optional[Doc])) == [Doc]  # noqa: UP045
    assert list(registered_types(pydantic.BaseModel)) == []
    assert matches(Doc(leaf=Leaf(1)), Doc)
    assert not matches({"leaf": {"n": 1}}, Doc)
