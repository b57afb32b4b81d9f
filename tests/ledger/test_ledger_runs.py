"""The 0.2 WorkflowDB contract (runs, checkpoints, events) and its errors, on every backend."""

from __future__ import annotations

import pytest

from pocoflow.db import WorkflowDB
from pocoflow.store import Store

pytestmark = pytest.mark.ledger


# ── 0.2 behaviour (the test_db_* tests of pocoflow 0.2.1, on both backends) ──


def test_create_and_list_runs(db):
    db.create_run("r1", "my_flow")
    runs = db.list_runs()
    assert len(runs) == 1
    assert runs[0]["run_id"] == "r1"
    assert runs[0]["flow_name"] == "my_flow"
    assert runs[0]["status"] == "running"


def test_list_runs_is_newest_first_and_limited(db):
    for i in range(5):
        db.create_run(f"r{i}")
    assert [r["run_id"] for r in db.list_runs()] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r["run_id"] for r in db.list_runs(limit=2)] == ["r4", "r3"]


def test_run_rows_keep_the_02_column_names(db):
    db.create_run("r1", "f")
    run = db.get_run("r1")
    for column in (
        "run_id",
        "flow_name",
        "status",
        "started_at",
        "completed_at",
        "total_steps",
        "current_node",
        "error_msg",
    ):
        assert column in run
    assert db.get_run("nope") is None


def test_create_run_twice_keeps_the_first(db):
    assert db.create_run("r1", "first") is True
    assert db.create_run("r1", "second", initial_store={"x": 1}) is False
    assert db.get_run("r1")["flow_name"] == "first"
    assert db.latest_checkpoint("r1") is None


def test_update_run(db):
    db.create_run("r1")
    db.update_run("r1", status="completed", total_steps=3)
    run = db.get_run("r1")
    assert run["status"] == "completed"
    assert run["total_steps"] == 3


def test_update_run_accepts_every_new_status(db):
    db.create_run("r1")
    for status in ("queued", "paused", "waiting", "failed", "cancelled", "running"):
        db.update_run("r1", status=status)
        assert db.get_run("r1")["status"] == status


def test_update_run_rejects_unknown_field_status_and_run(db):
    db.create_run("r1")
    with pytest.raises(ValueError, match="bogus"):
        db.update_run("r1", bogus=1)
    with pytest.raises(ValueError, match="'done'"):
        db.update_run("r1", status="done")
    with pytest.raises(KeyError, match="ghost"):
        db.update_run("ghost", status="failed")
    assert db.get_run("r1")["status"] == "running"


def test_save_and_load_checkpoint(db):
    db.create_run("r1")
    store = Store({"x": 42, "msg": "hello"})
    db.save_checkpoint("r1", step=0, node_name="MyNode", store=store)
    checkpoints = db.get_checkpoints("r1")
    assert len(checkpoints) == 1
    assert checkpoints[0]["node_name"] == "MyNode" and checkpoints[0]["step"] == 0
    restored = db.load_checkpoint("r1", step=0)
    assert restored["x"] == 42
    assert restored["msg"] == "hello"


def test_save_checkpoint_again_replaces_the_step(db):
    db.create_run("r1")
    db.save_checkpoint("r1", 0, "A", Store({"x": 1, "gone": True}))
    db.save_checkpoint("r1", 0, "B", Store({"x": 2}))
    assert len(db.get_checkpoints("r1")) == 1
    assert db.get_checkpoints("r1")[0]["node_name"] == "B"
    assert db.load_checkpoint("r1", 0).as_dict() == {"x": 2}
    assert db.count_values("r1") == 1


def test_load_checkpoint_missing_names_run_and_step(db):
    db.create_run("r1")
    with pytest.raises(KeyError, match=r"r1.*99"):
        db.load_checkpoint("r1", step=99)
    with pytest.raises(KeyError, match="r1"):
        db.get_checkpoint("r1", 99)


def test_events(db):
    db.create_run("r1")
    db.save_event("r1", "flow_start", node_name="A")
    db.save_event("r1", "node_end", step=0, node_name="A", action="done", elapsed_ms=42.0)
    db.save_event("r1", "flow_end", step=1)
    events = db.get_events("r1")
    assert len(events) == 3
    assert events[0]["event"] == "flow_start"
    assert events[1]["elapsed_ms"] == 42.0
    assert events[1]["action"] == "done" and events[1]["step"] == 0
    assert events[2]["event"] == "flow_end"
    assert all(e["ts"] for e in events)
    assert [e["event"] for e in db.get_events("r1", after_id=events[0]["id"])] == [
        "node_end",
        "flow_end",
    ]


def test_event_timestamps_and_attempt(db):
    db.create_run("r1")
    db.save_event("r1", "a", ts="2026-01-01T00:00:00+00:00", attempt=3)
    db.save_event("r1", "b", ts=0.0)
    first, second = db.get_events("r1")
    assert first["ts"] == "2026-01-01T00:00:00+00:00" and first["attempt"] == 3
    assert second["ts"].startswith("1970-01-01T00:00:00")


def test_rows_for_an_unknown_run_raise_key_error(db):
    with pytest.raises(KeyError, match="ghost"):
        db.save_event("ghost", "flow_start")
    with pytest.raises(KeyError, match="ghost"):
        db.save_checkpoint("ghost", 0, "A", Store({"x": 1}))
    assert db.list_runs() == []


def test_control_requests(db):
    db.create_run("r1")
    assert db.get_run("r1")["control"] is None
    db.set_control("r1", "pause")
    assert db.get_run("r1")["control"] == "pause"
    db.set_control("r1", None)
    assert db.get_run("r1")["control"] is None
    with pytest.raises(ValueError, match="stop"):
        db.set_control("r1", "stop")
    with pytest.raises(KeyError, match="ghost"):
        db.set_control("ghost", "cancel")


def test_create_run_records_lineage_and_initial_store(db):
    db.create_run(
        "child",
        "f",
        status="queued",
        fingerprint="abc",
        max_steps=7,
        initial_store=Store({"x": 1}, name="inputs"),
        start_node="A",
    )
    run = db.get_run("child")
    assert (run["status"], run["fingerprint"], run["max_steps"]) == ("queued", "abc", 7)
    assert run["store_name"] == "inputs"
    assert db.latest_checkpoint("child") == {
        "step": -1,
        "node_name": "",
        "next_node": "A",
        "action": None,
    }
    assert db.load_checkpoint("child", -1).as_dict() == {"x": 1}
    assert db.get_checkpoints("child") == []  # only nodes that ran
    assert db.count_committed("child") == 0

    db.create_run(
        "fork", "f", initial_store={"x": 5}, initial_step=3, parent_run_id="child",
        forked_from_step=3, start_node="B",
    )  # fmt: skip
    fork = db.get_run("fork")
    assert (fork["parent_run_id"], fork["forked_from_step"]) == ("child", 3)
    assert db.load_checkpoint("fork", 3)["x"] == 5


def test_create_run_with_bad_status_writes_nothing(db):
    with pytest.raises(ValueError, match="'nope'"):
        db.create_run("r1", status="nope")
    assert db.get_run("r1") is None


# ── opening: paths, URLs, secrets ────────────────────────────────────────────


def test_plain_path_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "runs.db"
    db = WorkflowDB(path)
    db.create_run("r1")
    assert path.exists() and db.db_path == path
    assert WorkflowDB(str(path)).get_run("r1")["run_id"] == "r1"
    db.close()


def test_path_under_a_regular_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="file"):
        WorkflowDB(blocker / "sub" / "runs.db")
    with pytest.raises(ValueError, match="directory"):
        WorkflowDB(tmp_path)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="junk.db"):
        WorkflowDB(junk)


def test_unsupported_url_is_rejected_without_its_password():
    with pytest.raises(ValueError) as info:
        WorkflowDB("mysql://user:hunter2@localhost/db")
    assert "hunter2" not in str(info.value) and "mysql" in str(info.value)


def test_password_never_shows_in_repr_or_errors(database_url):
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(password="hunter2", port=1)  # nothing listens on 1
    with pytest.raises(ValueError) as info:
        WorkflowDB(url.render_as_string(hide_password=False))
    assert "hunter2" not in str(info.value)
    assert "127.0.0.1" in str(info.value)


def test_repr_and_url_mask_password(database_url):
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(password="hunter2")  # trust auth: ignored by the server
    db = WorkflowDB(url.render_as_string(hide_password=False))
    assert "hunter2" not in repr(db) and "hunter2" not in db.url
    assert "***" in db.url and "postgresql+psycopg" in repr(db)
    assert db.dialect == "postgresql" and db.db_path is None
    db.close()
