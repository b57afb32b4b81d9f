"""Schema and engine: migrations (fresh, 0.2.1 in place, concurrent), pragmas, locking."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from pocoflow.db import WorkflowDB
from pocoflow.ledger import LedgerLockedError, SchemaVersionError, migrate, txn
from pocoflow.ledger.tables import metadata
from pocoflow.usage import UsageReport
from tests.helpers import wait_until
from tests.ledger.test_ledger_commit import make_commit

pytestmark = pytest.mark.ledger

# pocoflow 0.2.1's DDL, verbatim (pocoflow/db.py of that release).
V021_DDL = """
PRAGMA journal_mode=WAL;

CREATE TABLE IF NOT EXISTS pf_runs (
    run_id       TEXT PRIMARY KEY,
    flow_name    TEXT NOT NULL DEFAULT '',
    status       TEXT NOT NULL DEFAULT 'running'
        CHECK(status IN ('queued','running','paused','completed','failed')),
    started_at   TEXT NOT NULL,
    completed_at TEXT,
    total_steps  INTEGER,
    current_node TEXT,
    error_msg    TEXT
);

CREATE TABLE IF NOT EXISTS pf_checkpoints (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT NOT NULL,
    step        INTEGER NOT NULL,
    node_name   TEXT NOT NULL,
    store_json  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE(run_id, step),
    FOREIGN KEY (run_id) REFERENCES pf_runs(run_id)
);

CREATE TABLE IF NOT EXISTS pf_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id      TEXT NOT NULL,
    step        INTEGER,
    node_name   TEXT,
    event       TEXT NOT NULL,
    action      TEXT,
    elapsed_ms  REAL,
    error_msg   TEXT,
    ts          TEXT NOT NULL,
    FOREIGN KEY (run_id) REFERENCES pf_runs(run_id)
);
"""


def build_v021_database(path) -> None:
    """A database as pocoflow 0.2.1 left it: its DDL, rows written the way it wrote them."""
    conn = sqlite3.connect(path)
    conn.executescript(V021_DDL)
    conn.executemany(
        "INSERT INTO pf_runs (run_id, flow_name, status, started_at, completed_at, "
        "total_steps, current_node, error_msg) VALUES (?,?,?,?,?,?,?,?)",
        [
            ("old-1", "etl", "completed", "2025-01-01T00:00:00+00:00", "2025-01-01T00:01:00+00:00", 2, "B", None),
            ("old-2", "etl", "failed", "2025-01-02T00:00:00+00:00", None, 1, "A", "boom"),
            ("old-3", "", "running", "2025-01-03T00:00:00+00:00", None, None, None, None),
        ],
    )  # fmt: skip
    conn.executemany(
        "INSERT INTO pf_checkpoints (run_id, step, node_name, store_json, created_at) "
        "VALUES (?,?,?,?,?)",
        [
            ("old-1", 0, "A", '{"x": 1, "msg": "hi"}', "2025-01-01T00:00:10+00:00"),
            ("old-1", 1, "B", '{"x": 2, "msg": "hi", "obj": "<non-serialisable: Lock>"}', "2025-01-01T00:00:20+00:00"),
            ("old-2", 0, "A", '{"x": 1}', "2025-01-02T00:00:10+00:00"),
        ],
    )  # fmt: skip
    conn.executemany(
        "INSERT INTO pf_events (run_id, step, node_name, event, action, elapsed_ms, error_msg, ts) "
        "VALUES (?,?,?,?,?,?,?,?)",
        [
            ("old-1", None, "A", "flow_start", None, None, None, "2025-01-01T00:00:00+00:00"),
            ("old-1", 0, "A", "node_end", "default", 12.5, None, "2025-01-01T00:00:10+00:00"),
            ("old-2", 0, "A", "node_error", None, None, "boom", "2025-01-02T00:00:10+00:00"),
            ("gone", None, None, "flow_start", None, None, None, "2025-01-04T00:00:00+00:00"),
        ],
    )  # fmt: skip
    conn.commit()
    conn.close()


def table_rows(path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_v021_database_is_upgraded_in_place_without_losing_rows(tmp_path):
    path = tmp_path / "old.db"
    build_v021_database(path)
    before = {
        t: table_rows(path, f"SELECT * FROM {t} ORDER BY rowid")
        for t in ("pf_runs", "pf_checkpoints", "pf_events")
    }

    db = WorkflowDB(path)

    assert table_rows(path, "SELECT version_num FROM pf_alembic_version") == [(migrate.HEAD,)]
    runs_after = table_rows(path, "SELECT run_id, flow_name, status, started_at, completed_at, total_steps, current_node, error_msg FROM pf_runs ORDER BY rowid")  # fmt: skip
    assert runs_after == before["pf_runs"]
    ckpt_after = table_rows(path, "SELECT id, run_id, step, node_name, store_json, created_at FROM pf_checkpoints ORDER BY id")  # fmt: skip
    assert ckpt_after == before["pf_checkpoints"]
    events_after = table_rows(path, "SELECT id, run_id, step, node_name, event, action, elapsed_ms, error_msg, ts FROM pf_events ORDER BY id")  # fmt: skip
    assert events_after == before["pf_events"]
    assert table_rows(path, "PRAGMA integrity_check") == [("ok",)]

    # The 0.2 API reads the old rows...
    assert [r["run_id"] for r in db.list_runs()] == ["old-3", "old-2", "old-1"]
    assert [c["step"] for c in db.get_checkpoints("old-1")] == [0, 1]
    assert db.load_checkpoint("old-1", 1).as_dict() == {
        "x": 2,
        "msg": "hi",
        "obj": "<non-serialisable: Lock>",
    }
    assert db.get_events("old-1")[1]["elapsed_ms"] == 12.5
    _store, manifest, texts = db.load_store("old-1", 1)
    assert (manifest, texts) == ({}, {})  # nothing in pf_values: the next commit writes all
    # ...and the new schema accepts what 0.2.1 refused, and new steps on old runs.
    db.update_run("old-3", status="cancelled")
    assert db.get_run("old-3")["status"] == "cancelled"
    commit = make_commit("old-2", 1, {}, {"x": 5})
    assert db.commit_step(commit) is True
    assert db.load_checkpoint("old-2", 1).as_dict() == {"x": 5}
    db.create_run("new-1", "etl", initial_store={"a": 1})
    assert db.load_checkpoint("new-1", -1)["a"] == 1
    db.close()


def test_fresh_database_goes_to_head_and_reopening_does_not_migrate(ledger_url, monkeypatch):
    WorkflowDB(ledger_url).close()
    engine = create_engine(ledger_url)
    with engine.connect() as conn:
        assert migrate.schema_version(conn) == (migrate.HEAD, True)
    engine.dispose()

    def refuse(ledger):  # pragma: no cover - only runs if the check is broken
        raise AssertionError("an up-to-date database must not load the migration machinery")

    monkeypatch.setattr(migrate, "_migrate", refuse)
    other = WorkflowDB(ledger_url, busy_timeout=1.25)  # another engine: checks, finds head
    other.create_run("r1")
    other.close()


def test_head_constant_matches_the_revision_scripts():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(migrate.MIGRATIONS_DIR))
    scripts = ScriptDirectory.from_config(cfg)
    assert scripts.get_current_head() == migrate.HEAD
    assert sorted(r.revision for r in scripts.walk_revisions()) == list(migrate.REVISIONS)


def test_migrations_build_exactly_the_tables_module(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db._ledger.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": migrate.VERSION_TABLE}
        )
        assert compare_metadata(context, metadata) == []


def test_newer_schema_is_refused_with_a_clear_error(ledger_url):
    WorkflowDB(ledger_url).close()
    engine = create_engine(ledger_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="9999"):
        WorkflowDB(ledger_url, busy_timeout=2.5)


def _open_and_write(url: str, barrier, index: int) -> None:
    barrier.wait(30)
    db = WorkflowDB(url)
    db.create_run(f"p{index}", initial_store={"i": index})
    db.close()


def test_processes_opening_a_fresh_database_at_once_all_succeed(ledger_url):
    ctx = multiprocessing.get_context("spawn")
    count = 3
    barrier = ctx.Barrier(count)
    procs = [
        ctx.Process(target=_open_and_write, args=(ledger_url, barrier, i)) for i in range(count)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * count
    db = WorkflowDB(ledger_url)
    assert sorted(r["run_id"] for r in db.list_runs()) == [f"p{i}" for i in range(count)]
    db.close()


# ── SQLite engine settings ───────────────────────────────────────────────────


def pragma(db: WorkflowDB, name: str):
    with db._ledger.engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_sqlite_pragmas(tmp_path, monkeypatch):
    db = WorkflowDB(tmp_path / "a.db")
    assert pragma(db, "journal_mode") == "wal"
    assert pragma(db, "synchronous") == 1  # NORMAL
    assert pragma(db, "foreign_keys") == 1
    assert pragma(db, "busy_timeout") == 5000
    assert pragma(WorkflowDB(tmp_path / "a.db", synchronous="full"), "synchronous") == 2
    monkeypatch.setenv("POCOFLOW_SQLITE_SYNCHRONOUS", "FULL")
    assert pragma(WorkflowDB(tmp_path / "b.db"), "synchronous") == 2
    monkeypatch.setenv("POCOFLOW_SQLITE_SYNCHRONOUS", "SOMETIMES")
    with pytest.raises(ValueError, match="POCOFLOW_SQLITE_SYNCHRONOUS"):
        WorkflowDB(tmp_path / "c.db")


def test_instances_on_one_database_share_an_engine(tmp_path):
    first, second = WorkflowDB(tmp_path / "a.db"), WorkflowDB(f"sqlite:///{tmp_path}/a.db")
    assert first._ledger is second._ledger
    assert WorkflowDB(tmp_path / "a.db", synchronous="FULL")._ledger is not first._ledger


class _LockRetries(logging.Handler):
    """Sees the ledger's lock retries (txn's DEBUG records) from the writer's thread.

    With ``hold``, the writer stops inside its first retry until :meth:`resume`: the test
    then acts while the writer is provably between two tries, whatever the scheduling."""

    def __init__(self, hold: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.retries: list[int] = []
        self._hold = hold
        self._resumed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        retry = getattr(record, "ledger_retry", None)
        if retry is None:
            return
        self.retries.append(retry)
        if self._hold:
            self._resumed.wait(timeout=30)

    def resume(self) -> None:
        self._resumed.set()


@contextlib.contextmanager
def lock_retries(hold: bool = False) -> Iterator[_LockRetries]:
    logger = logging.getLogger("pocoflow.ledger.txn")
    handler, level = _LockRetries(hold), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        handler.resume()
        logger.removeHandler(handler)
        logger.setLevel(level)


def hold_write_lock(path) -> sqlite3.Connection:
    """Another connection mid-write (as another process would be): holds the write lock."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE pf_runs SET error_msg = 'holder' WHERE run_id = 'r1'")
    return holder


def checkpoint_rows(path) -> list[tuple]:
    return table_rows(path, "SELECT step FROM pf_checkpoints WHERE run_id = 'r1' AND step >= 0")


def test_locked_sqlite_retries_then_names_the_database_and_run(tmp_path):
    path = tmp_path / "locked.db"
    db = WorkflowDB(path, busy_timeout=0.05)
    db.create_run("r1", initial_store={"n": 0})
    holder = hold_write_lock(path)
    try:
        with lock_retries() as seen, pytest.raises(LedgerLockedError) as info:
            db.commit_step(make_commit("r1", 0, {"n": -1}, {"n": 1}))
        assert str(path) in str(info.value) and "'r1'" in str(info.value)
        assert seen.retries == list(range(1, txn.LOCK_RETRIES + 1))  # retried, then gave up
        assert db.get_run("r1")["error_msg"] is None  # readers are not blocked (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert checkpoint_rows(path) == []  # nothing half-written
    assert table_rows(path, "PRAGMA integrity_check") == [("ok",)]
    db.commit_step(make_commit("r1", 0, {"n": -1}, {"n": 1}))  # and the ledger still works
    assert db.load_checkpoint("r1", 0)["n"] == 1
    db.close()


def test_a_lock_released_while_retrying_lets_the_write_land_once(tmp_path):
    path = tmp_path / "locked.db"
    db = WorkflowDB(path, busy_timeout=0.05)
    db.create_run("r1", initial_store={"n": 0})
    holder = hold_write_lock(path)
    outcome: dict[str, object] = {}

    def write() -> None:
        try:
            outcome["committed"] = db.commit_step(make_commit("r1", 0, {"n": -1}, {"n": 1}))
        except BaseException as exc:  # surfaced by the asserts below
            outcome["error"] = exc

    with lock_retries(hold=True) as seen:
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            # Synchronise on state: the writer has failed a try on the lock and is paused
            # inside its first retry, so it cannot run out of retries meanwhile.
            wait_until(lambda: seen.retries, timeout=30)
            assert writer.is_alive() and checkpoint_rows(path) == []
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            seen.resume()
        writer.join(timeout=30)
    assert not writer.is_alive()
    assert outcome == {"committed": True}
    assert seen.retries[0] == 1
    assert checkpoint_rows(path) == [(0,)]  # landed, exactly once
    assert db.load_checkpoint("r1", 0)["n"] == 1
    assert db.get_run("r1")["error_msg"] is None  # the holder's write was rolled back
    assert table_rows(path, "PRAGMA integrity_check") == [("ok",)]
    db.close()


def upgrade_to(conn, revision: str) -> None:
    """Migrate the database of ``conn`` to ``revision`` only (an older ledger)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrate.MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


def test_0014_clears_received_marks_of_started_rows_and_keeps_held_ones(tmp_path):
    """Before 0014 a step's claim left ``received_by`` set: the upgrade clears it on rows
    no longer queued, so the new held-messages index starts without the history, and
    keeps it on queued rows, whose receiver's death the sweeper must still see."""
    path = tmp_path / "at0013.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        upgrade_to(conn, "0013")
        conn.execute(text("INSERT INTO pf_runs (run_id, started_at) VALUES ('r', 'x')"))
        for step, status in ((0, "committed"), (1, "running"), (2, "queued")):
            conn.execute(
                text(
                    "INSERT INTO pf_steps (run_id, step, node_id, status, queued_at, "
                    "created_at, received_by) VALUES ('r', :s, 'n', :st, 0, 0, 'host:1')"
                ),
                {"s": step, "st": status},
            )
    engine.dispose()

    WorkflowDB(path).close()

    marks = table_rows(path, "SELECT step, received_by FROM pf_steps ORDER BY step")
    assert marks == [(0, None), (1, None), (2, "host:1")]
    (index_sql,) = table_rows(
        path, "SELECT sql FROM sqlite_master WHERE name = 'ix_pf_steps_received_by'"
    )[0]
    assert "WHERE received_by IS NOT NULL" in index_sql


def test_0015_drops_autoincrement_keeping_rows_and_growing_ids(tmp_path):
    """SQLite: pf_events and pf_checkpoints lose AUTOINCREMENT (a page fewer per step's
    commit); rows survive, and new ids follow the old."""
    path = tmp_path / "at0014.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        upgrade_to(conn, "0014")
        conn.execute(text("INSERT INTO pf_runs (run_id, started_at) VALUES ('r', 'x')"))
        for step in range(3):
            conn.execute(
                text(
                    "INSERT INTO pf_checkpoints (run_id, step, node_name, created_at, "
                    "manifest) VALUES ('r', :s, 'n', 't', '{}')"
                ),
                {"s": step},
            )
            conn.execute(
                text("INSERT INTO pf_events (run_id, step, event, ts) VALUES ('r', :s, 'e', 't')"),
                {"s": step},
            )
            conn.execute(
                text("INSERT INTO pf_values VALUES ('r', :s, 'k', :v)"), {"s": step, "v": str(step)}
            )
    engine.dispose()

    db = WorkflowDB(path)
    db.save_event("r", "later")
    db.close()

    ddl = dict(table_rows(path, "SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert "AUTOINCREMENT" not in ddl["pf_events"] + ddl["pf_checkpoints"]
    sequences = table_rows(path, "SELECT name FROM sqlite_sequence")
    assert ("pf_events",) not in sequences and ("pf_checkpoints",) not in sequences
    assert table_rows(path, "SELECT id, step FROM pf_checkpoints") == [(1, 0), (2, 1), (3, 2)]
    assert table_rows(path, "SELECT id, step, event FROM pf_events ORDER BY id") == [
        (1, 0, "e"), (2, 1, "e"), (3, 2, "e"), (4, None, "later")
    ]  # fmt: skip
    assert table_rows(path, "SELECT step, value_json FROM pf_values") == [
        (0, "0"), (1, "1"), (2, "2")
    ]  # fmt: skip
    indexes = {
        name for (name,) in table_rows(path, "SELECT name FROM sqlite_master WHERE type = 'index'")
    }
    assert {"ix_pf_events_run_id", "sqlite_autoindex_pf_checkpoints_1"} <= indexes


def test_0016_backfills_run_usage_totals_from_the_usage_rows(ledger_url):
    """A ledger that had usage rows at 0015: the upgrade sums them onto each run row
    (tokens = input + output, an unknown cost counts 0; a run without rows: 0), and the
    next report adds to the backfilled totals."""
    engine = create_engine(ledger_url)
    with engine.begin() as conn:
        upgrade_to(conn, "0015")
        for run_id in ("r1", "r2", "r3"):
            conn.execute(
                text("INSERT INTO pf_runs (run_id, started_at) VALUES (:r, 'x')"), {"r": run_id}
            )
        for run_id, tokens_in, tokens_out, cost in (
            ("r1", 100, 20, 0.5),
            ("r1", 7, 3, None),
            ("r1", 1, 1, 0.25),
            ("r2", 40, 2, 0.125),
        ):
            conn.execute(
                text(
                    "INSERT INTO pf_usage (run_id, step, attempt, node_name, model, "
                    "input_tokens, output_tokens, cost_usd, ts) "
                    "VALUES (:r, 0, 1, 'n', 'm', :i, :o, :c, 't')"
                ),
                {"r": run_id, "i": tokens_in, "o": tokens_out, "c": cost},
            )
    engine.dispose()

    db = WorkflowDB(ledger_url)
    try:
        assert db.usage_totals("r1") == (132, 0.75)
        assert db.usage_totals("r2") == (42, 0.125)
        assert (db.get_run("r3")["used_tokens"], db.get_run("r3")["used_cost_usd"]) == (0, 0.0)
        db.add_usage(UsageReport("r1", 1, 1, "n", None, "m", 5, 5, 0.25))
        assert db.usage_totals("r1") == (142, 1.0)
    finally:
        db.close()


def test_0016_backfills_a_row_whose_token_sum_passes_int32(ledger_url):
    """Each of input_tokens / output_tokens fits pf_usage's INTEGER, their sum does not.
    ``add_usage`` adds such a row fine (Python int -> BIGINT); the backfill must too,
    or (PostgreSQL) the migration fails and no command can open the ledger."""
    engine = create_engine(ledger_url)
    with engine.begin() as conn:
        upgrade_to(conn, "0015")
        conn.execute(text("INSERT INTO pf_runs (run_id, started_at) VALUES ('r1', 'x')"))
        conn.execute(
            text(
                "INSERT INTO pf_usage (run_id, step, attempt, node_name, model, "
                "input_tokens, output_tokens, cost_usd, ts) "
                "VALUES ('r1', 0, 1, 'n', 'm', 2000000000, 2000000000, NULL, 't')"
            )
        )
    engine.dispose()
    db = WorkflowDB(ledger_url)
    try:
        assert db.usage_totals("r1") == (4_000_000_000, 0.0)
        db.add_usage(UsageReport("r1", 1, 1, "n", None, "m", 2_000_000_000, 2_000_000_000, None))
        assert db.usage_totals("r1") == (8_000_000_000, 0.0)
    finally:
        db.close()
