"""StoreTracker: the manifest and the changed values of each checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest

from pocoflow import codec, delta
from pocoflow.codec import CodecError, decode, encode
from pocoflow.delta import StoreTracker


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The keys the tracker encoded, in order."""
    calls: list[str] = []

    def counting_encode(value: Any, *, key: str) -> str:
        calls.append(key)
        return encode(value, key=key)

    monkeypatch.setattr(delta, "encode", counting_encode)
    yield calls


def test_first_diff_writes_every_key() -> None:
    data = {"a": 1, "b": [1, 2], "c": (1,)}
    manifest, changed = StoreTracker().diff(data, -1)
    assert manifest == {"a": -1, "b": -1, "c": -1}
    assert changed == {k: encode(v, key=k) for k, v in data.items()}


def test_untouched_immutable_values_are_not_even_encoded(encoded: list[str]) -> None:
    big = "x" * 1_000_000
    data: dict[str, Any] = {
        "doc": big,
        "n": 10**40,
        "when": datetime(2020, 1, 1),
        "price": Decimal("1.5"),
        "frozen": (1, "a", (None, b"b")),
        "fs": frozenset({1, 2}),
        "none": None,
    }
    tracker = StoreTracker()
    tracker.diff(data, 0)
    assert sorted(encoded) == sorted(data)
    encoded.clear()
    manifest, changed = tracker.diff(data, 1)
    assert encoded == []
    assert changed == {}
    assert set(manifest.values()) == {0}


def test_equal_but_new_objects_are_encoded_and_found_unchanged(encoded: list[str]) -> None:
    tracker = StoreTracker()
    tracker.diff({"s": "".join(["ab", "c"])}, 0)
    manifest, changed = tracker.diff({"s": "".join(["a", "bc"])}, 1)
    assert encoded == ["s", "s"]
    assert changed == {} and manifest == {"s": 0}


def test_in_place_mutation_is_detected() -> None:
    history: list[dict[str, str]] = [{"role": "user"}]
    data = {"history": history, "cfg": {"k": 1}}
    tracker = StoreTracker()
    tracker.diff(data, 0)
    history.append({"role": "assistant"})
    manifest, changed = tracker.diff(data, 1)
    assert manifest == {"history": 1, "cfg": 0}
    assert decode(changed["history"], key="history") == history
    assert list(changed) == ["history"]
    data["cfg"]["k"] = 2
    manifest, changed = tracker.diff(data, 2)
    assert manifest == {"history": 1, "cfg": 2} and list(changed) == ["cfg"]


def test_mutation_inside_a_tuple_is_detected() -> None:
    inner: list[int] = []
    data = {"t": (1, inner)}
    tracker = StoreTracker()
    tracker.diff(data, 0)
    inner.append(1)
    assert tracker.diff(data, 1) == ({"t": 1}, {"t": encode((1, [1]), key="t")})


def test_mutated_dataclass_is_detected() -> None:
    @codec.register_type
    @dataclasses.dataclass
    class Counter:
        n: int

    c = Counter(0)
    tracker = StoreTracker()
    tracker.diff({"c": c}, 0)
    assert tracker.diff({"c": c}, 1)[1] == {}
    c.n = 1
    assert tracker.diff({"c": c}, 2) == ({"c": 2}, {"c": encode(Counter(1), key="c")})


def test_deleted_keys_vanish_and_come_back_as_new() -> None:
    tracker = StoreTracker()
    tracker.diff({"a": 1, "b": 2}, 0)
    assert tracker.diff({"b": 2}, 1) == ({"b": 0}, {})
    manifest, changed = tracker.diff({"b": 2, "a": 1}, 2)
    assert manifest == {"b": 0, "a": 2}
    assert changed == {"a": "1"}


def test_a_replaced_value_gets_the_new_step() -> None:
    tracker = StoreTracker()
    tracker.diff({"a": "old"}, 0)
    assert tracker.diff({"a": "new"}, 1) == ({"a": 1}, {"a": '"new"'})
    assert tracker.diff({"a": "new"}, 2) == ({"a": 1}, {})
    assert tracker.manifest == {"a": 1}


def test_seed_from_a_loaded_checkpoint(encoded: list[str]) -> None:
    # What a worker does: load manifest + texts, decode into the Store, seed, run a node.
    manifest = {"doc": 3, "items": 5, "gone": 1}
    texts = {"doc": encode("x" * 10_000, key="doc"), "items": "[1,2]", "gone": "0"}
    store = {"doc": decode(texts["doc"], key="doc"), "items": decode("[1,2]", key="items")}
    tracker = StoreTracker()
    tracker.seed(manifest, texts, store)
    store["new"] = True
    manifest_out, changed = tracker.diff(store, 6)
    assert encoded == ["items", "new"]  # "doc" recognised by identity
    assert manifest_out == {"doc": 3, "items": 5, "new": 6}
    assert changed == {"new": "true"}


def test_seed_without_texts_rewrites_what_it_cannot_prove_unchanged() -> None:
    tracker = StoreTracker()
    items = [1]
    tracker.seed({"items": 2, "n": 2}, {}, {"items": items, "n": 7})
    assert tracker.diff({"items": items, "n": 7}, 3) == ({"items": 3, "n": 2}, {"items": "[1]"})


def test_unencodable_value_names_the_key_and_leaves_the_tracker_as_it_was() -> None:
    tracker = StoreTracker()
    tracker.diff({"a": [1]}, 0)
    with pytest.raises(CodecError) as info:
        tracker.diff({"a": [1, 2], "client": object()}, 1)
    assert info.value.key == "client"
    assert "'client'" in str(info.value)
    assert tracker.manifest == {"a": 0}
    assert tracker.diff({"a": [1, 2]}, 1) == ({"a": 1}, {"a": "[1,2]"})


def test_non_str_keys_are_refused() -> None:
    with pytest.raises(CodecError, match="must be str"):
        StoreTracker().diff({1: "x"}, 0)


def test_returned_manifest_is_a_copy() -> None:
    tracker = StoreTracker()
    manifest, _ = tracker.diff({"a": 1}, 0)
    manifest["a"] = 99
    assert tracker.diff({"a": 1}, 1) == ({"a": 0}, {})
