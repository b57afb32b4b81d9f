"""Store: the 0.2 API unchanged, generic schemas, observers, lossless snapshots."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest

from pocoflow import codec
from pocoflow.store import DELETED, Store

ROOT = Path(__file__).resolve().parents[2]


# ── 0.2 behaviour (mirrors the 0.2.1 test suite) ──────────────────────────────


def test_store_basic() -> None:
    s = Store({"x": 1})
    assert s["x"] == 1
    s["x"] = 2
    assert s["x"] == 2


def test_store_schema_type_check() -> None:
    s = Store({"x": 1}, schema={"x": int})
    with pytest.raises(TypeError):
        s["x"] = "bad"


def test_store_validate_missing_key() -> None:
    s = Store({}, schema={"required_key": str})
    with pytest.raises(ValueError, match="required_key"):
        s.validate()
    s["required_key"] = "here"
    s.validate()


def test_store_observer() -> None:
    log = []
    s = Store({"x": 0})
    s.add_observer(lambda k, old, new: log.append((k, old, new)))
    s["x"] = 99
    assert log == [("x", 0, 99)]


def test_store_snapshot_restore(tmp_path: Path) -> None:
    s = Store({"a": 1, "b": "hello"}, name="snap_test")
    p = tmp_path / "checkpoint.json"
    s.snapshot(p)
    s2 = Store.restore(p)
    assert s2["a"] == 1
    assert s2["b"] == "hello"
    assert s2._name == "snap_test"


def test_store_contains_and_get() -> None:
    s = Store({"x": 42})
    assert "x" in s
    assert "y" not in s
    assert s.get("y", "default") == "default"
    assert s.get("y") is None


def test_missing_key_raises_key_error() -> None:
    with pytest.raises(KeyError):
        Store()["nope"]


def test_dict_like_views_and_identity() -> None:
    data = {"a": 1, "b": 2}
    s = Store(data, name="n")
    assert s.as_dict() is s.as_dict() is s._data
    assert s.as_dict() is not data  # the constructor copies, as in 0.2
    s.as_dict()["c"] = 3  # no copy: modifications are reflected
    assert s["c"] == 3
    assert list(s.keys()) == ["a", "b", "c"]
    assert list(s.values()) == [1, 2, 3]
    assert list(s.items()) == [("a", 1), ("b", 2), ("c", 3)]
    assert list(s) == ["a", "b", "c"]
    assert len(s) == 3
    assert repr(s) == "Store(name='n', keys=['a', 'b', 'c'])"
    assert s.name == s._name == "n"
    assert dict(s) == {"a": 1, "b": 2, "c": 3}


def test_store_accepts_a_store_or_nothing() -> None:
    assert len(Store()) == 0
    assert Store(Store({"a": 1}))["a"] == 1


def test_update_like_0_2_and_like_dict() -> None:
    s = Store()
    s.update({"a": 1})
    s.update([("b", 2)], c=3)
    s.update(mapping={"d": 4})
    assert s.as_dict() == {"a": 1, "b": 2, "c": 3, "d": 4}


def test_delete_a_key() -> None:
    s = Store({"a": 1, "b": 2})
    del s["a"]
    assert "a" not in s and len(s) == 1
    with pytest.raises(KeyError):
        del s["a"]


# ── schemas ───────────────────────────────────────────────────────────────────


def test_type_error_names_store_key_expected_and_actual_type() -> None:
    s = Store({"hits": []}, schema={"hits": list[str]}, name="search")
    with pytest.raises(TypeError) as info:
        s["hits"] = ["a", 2]
    message = str(info.value)
    assert "Store[search]" in message
    assert "'hits'" in message
    assert "list[str]" in message
    assert "list[int | str]" in message
    assert s["hits"] == []  # the bad write did not land


def test_0_2_tuple_schema_message_lists_alternatives() -> None:
    s = Store(schema={"n": (int, float)})
    s["n"] = 1.5
    with pytest.raises(TypeError, match=r"'n' expects int \| float, got str"):
        s["n"] = "x"


def test_generic_schemas_accept_and_reject_deeply() -> None:
    s = Store(
        schema={
            "tags": set[str],
            "scores": dict[str, float],
            "pair": tuple[int, str],
            "maybe": list[int] | None,
            "mode": Literal["fast", "slow"],
            "anything": Any,
        }
    )
    s.update(tags={"a"}, scores={"x": 1.0}, pair=(1, "a"), maybe=None, mode="fast", anything=s)
    s["maybe"] = [1, 2]
    for key, bad in [
        ("tags", {"a", 1}),
        ("scores", {"x": "1"}),
        ("pair", (1, 2)),
        ("maybe", ["1"]),
        ("mode", "medium"),
    ]:
        with pytest.raises(TypeError, match=repr(key)):
            s[key] = bad


def test_constructor_checks_initial_data() -> None:
    with pytest.raises(TypeError, match=r"Store\[init\]: key 'x' expects int, got str"):
        Store({"x": "1"}, schema={"x": int}, name="init")
    Store({"other": "1"}, schema={"x": int})  # missing keys are validate()'s job


def test_none_in_initial_data_is_a_placeholder_not_a_type_error() -> None:
    # 0.2.1 compatibility: 0.2 never checked initial data, and None means "not set yet".
    s = Store({"result": None, "n": 1}, schema={"result": str, "n": int}, name="init")
    assert s["result"] is None
    s["result"] = "done"
    with pytest.raises(TypeError, match=r"Store\[init\]: key 'result' expects str"):
        s["result"] = None  # a write of None after construction is still checked
    with pytest.raises(TypeError, match="key 'n' expects int"):
        s.update(n=None)
    with pytest.raises(TypeError, match="key 'n' expects int"):
        Store({"result": None, "n": "1"}, schema={"result": str, "n": int})


def test_restore_with_schema_accepts_none_placeholders(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    Store({"result": None, "n": 2}, name="r").snapshot(path)
    s = Store.restore(path, schema={"result": str, "n": int})
    assert s["result"] is None and s["n"] == 2 and s.name == "r"
    Store({"n": "2"}).snapshot(path)
    with pytest.raises(TypeError, match="key 'n' expects int"):
        Store.restore(path, schema={"n": int})


def test_a_store_is_truthy_even_when_empty() -> None:
    # 0.2 had no __len__, so `if store:` was always true; code relies on it.
    assert bool(Store()) is True
    assert Store({}, schema={"x": int})
    assert len(Store()) == 0


def test_unsupported_schema_type_fails_at_construction() -> None:
    with pytest.raises(TypeError):
        Store(schema={"x": "int"})


def test_update_checks_every_value_before_writing_any() -> None:
    s = Store({"a": 0, "b": 0}, schema={"a": int, "b": int})
    with pytest.raises(TypeError, match="'b'"):
        s.update({"a": 1, "b": "x"})
    assert s.as_dict() == {"a": 0, "b": 0}


def test_schema_is_read_only() -> None:
    s = Store(schema={"x": int})
    assert dict(s.schema) == {"x": int}
    with pytest.raises(TypeError):
        s.schema["y"] = str  # type: ignore[index]


# ── observers ─────────────────────────────────────────────────────────────────


def test_failing_observer_is_logged_and_the_write_stands(caplog: pytest.LogCaptureFixture) -> None:
    seen = []

    def boom(key: str, old: Any, new: Any) -> None:
        raise RuntimeError("observer broke")

    s = Store({"x": 0}, name="obs")
    s.add_observer(boom)
    s.add_observer(lambda k, old, new: seen.append(k))
    with caplog.at_level(logging.WARNING, logger="pocoflow.store"):
        s["x"] = 1
    assert s["x"] == 1
    assert seen == ["x"]  # later observers still run
    record = caplog.records[-1]
    assert record.name == "pocoflow.store"
    assert record.levelno == logging.WARNING
    assert "observer broke" in record.getMessage()


def test_remove_observer_and_notifications_for_update_and_delete() -> None:
    log: list[tuple[str, Any, Any]] = []

    def observer(k: str, old: Any, new: Any) -> None:
        log.append((k, old, new))

    s = Store({"a": 1})
    s.add_observer(observer)
    s.update({"a": 2, "b": 3})
    del s["a"]
    s.remove_observer(observer)
    s["c"] = 4
    assert log == [("a", 1, 2), ("b", None, 3), ("a", 2, DELETED)]
    assert repr(DELETED) == "<deleted>"
    assert pickle.loads(pickle.dumps(DELETED)) is DELETED


# ── copies and pickling ───────────────────────────────────────────────────────


def test_copy_is_shallow_and_keeps_schema_and_name() -> None:
    s = Store({"items": [1]}, schema={"items": list[int]}, name="orig")
    s.add_observer(lambda *a: None)
    c = s.copy()
    assert c.name == "orig" and dict(c.schema) == dict(s.schema)
    assert c.as_dict() is not s.as_dict() and c["items"] is s["items"]
    assert c._observers == []
    with pytest.raises(TypeError):
        c["items"] = ["x"]
    assert copy.copy(s).as_dict() == s.as_dict()
    deep = copy.deepcopy(s)
    assert deep["items"] == [1] and deep["items"] is not s["items"]


def test_store_pickles_despite_compiled_checks_and_lambda_observers() -> None:
    s = Store({"x": [1]}, schema={"x": list[int]}, name="p")
    s.add_observer(lambda *a: None)
    back = pickle.loads(pickle.dumps(s))
    assert back.as_dict() == {"x": [1]} and back.name == "p"
    with pytest.raises(TypeError):
        back["x"] = ["no"]


# ── snapshots ─────────────────────────────────────────────────────────────────


@dataclasses.dataclass
class Finding:
    title: str
    at: datetime
    refs: tuple[str, ...] = ()


def test_snapshot_is_lossless_and_registers_schema_types(tmp_path: Path) -> None:
    value = {
        "tuple": (1, "a"),
        "set": {"x", "y"},
        "bytes": b"\x00\x01",
        "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "finding": Finding("t", datetime(2024, 1, 1), ("r1",)),
        "nested": [{"k": (1.5, None)}],
        "nan": float("nan"),
    }
    schema = {"finding": Finding, "findings": list[Finding]}
    s = Store(dict(value, findings=[value["finding"]]), schema=schema, name="lossless")
    assert codec.registered_name(Finding) is not None  # no manual register_type needed
    path = tmp_path / "deep" / "dir" / "snap.json"
    s.snapshot(path)
    text = path.read_text(encoding="utf-8")
    assert "\n  " in text  # human-readable, indented
    assert "NaN" not in text  # strict JSON
    payload = json.loads(text)
    assert set(payload) == {"name", "data"}
    assert payload["data"]["tuple"] == {"__pf__": "tuple", "v": [1, "a"]}
    back = Store.restore(path, schema=schema)
    for key, expected in value.items():
        if key == "nan":
            assert back[key] != back[key]
            continue
        assert back[key] == expected and type(back[key]) is type(expected), key
    assert back["findings"] == [value["finding"]]
    assert back.name == "lossless"


def test_restore_reads_a_0_2_snapshot_file(tmp_path: Path) -> None:
    # Exactly what 0.2's Store.snapshot wrote: indent=2, plain values, NaN allowed,
    # unserialisable values replaced by a marker string.
    path = tmp_path / "step_003_ExecuteSPLNode.json"
    path.write_text(
        '{\n  "name": "spl_pipeline",\n  "data": {\n    "user_input": "héllo",\n'
        '    "count": 3,\n    "ratio": NaN,\n    "history": [{"role": "user"}],\n'
        '    "client": "<non-serialisable: Client>"\n  }\n}',
        encoding="utf-8",
    )
    s = Store.restore(path)
    assert s.name == s._name == "spl_pipeline"
    assert s["user_input"] == "héllo" and s["count"] == 3
    assert s["ratio"] != s["ratio"]
    assert s["history"] == [{"role": "user"}]
    assert s["client"] == "<non-serialisable: Client>"


def test_restore_without_name_defaults_and_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"data": {"a": 1}}', encoding="utf-8")
    assert Store.restore(path).name == "store"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="not a Store snapshot"):
        Store.restore(path)


def test_snapshot_refuses_unencodable_values_and_leaves_no_file(tmp_path: Path) -> None:
    s = Store({"ok": 1, "client": object()}, name="bad")
    path = tmp_path / "snap.json"
    with pytest.raises(TypeError, match="'client'") as info:
        s.snapshot(path)
    assert isinstance(info.value, codec.CodecError)
    assert list(tmp_path.iterdir()) == []


def test_snapshot_of_an_int_over_the_str_digit_limit_names_the_key(tmp_path: Path) -> None:
    s = Store({"ok": 1, "huge": [10**5000]}, name="big")
    path = tmp_path / "snap.json"
    with pytest.raises(codec.CodecError, match="'huge'") as info:
        s.snapshot(path)
    assert info.value.key == "huge" and info.value.path == "huge[0]"
    assert "digits" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_snapshot_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    Store({"v": 1}).snapshot(path)
    Store({"v": 2}).snapshot(path)
    assert Store.restore(path)["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["snap.json"]


def test_non_str_keys_cannot_be_checkpointed() -> None:
    s = Store({1: "one"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="keys must be str"):
        s.to_json_dict()


def test_json_dict_round_trip() -> None:
    s = Store({"t": (1, 2), "d": {"__pf__": "literal"}}, name="j")
    payload = s.to_json_dict()
    json.dumps(payload, allow_nan=False)
    back = Store.from_json_dict(payload)
    assert back.as_dict() == s.as_dict() and back.name == "j"
    assert type(back["t"]) is tuple


# ── import hygiene ────────────────────────────────────────────────────────────


def test_core_modules_import_no_database_broker_or_pydantic() -> None:
    code = (
        "import sys\n"
        "import pocoflow.codec, pocoflow.store, pocoflow.typecheck, pocoflow.delta\n"
        "s = pocoflow.store.Store({'a': (1,)}, schema={'a': tuple[int, ...]})\n"
        "s.to_json_dict()\n"
        "heavy = ('sqlalchemy', 'celery', 'redis', 'pydantic')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"
