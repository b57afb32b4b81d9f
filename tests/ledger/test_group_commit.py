"""Group commit of map items, on SQLite and PostgreSQL: the claims and commits of one
process's threads that wait for the write lock together share one SQLite transaction,
each in a savepoint of its own, with the same outcome for each as alone. On PostgreSQL
the item commits that come together share one transaction (``items.commit_many``), and
the claims run alone: the same outcomes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pocoflow.ledger import combine, events, pipeline, txn
from pocoflow.ledger.items import ItemClaim
from tests.helpers import wait_until

pytestmark = pytest.mark.ledger

LEASE = 10.0
RUN = "r1"
WAIT_S = 10.0


def _queued_together(db, calls: list[Callable[[], Any]], pg_groups: bool = False) -> list[Any]:
    """Run ``calls`` on threads of their own; on SQLite (on PostgreSQL too: ``pg_groups``,
    item commits), hold the write lock until all of them wait for it, so that the thread
    that gets it next runs them as one group. Returns each call's result (or the
    exception it raised)."""
    ledger = db._ledger
    sqlite = ledger.dialect == "sqlite" or pg_groups
    results: list[Any] = [None] * len(calls)

    def call(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    if sqlite:
        ledger.writers.acquire()
    try:
        for t in threads:
            t.start()
        if sqlite:
            deadline = time.monotonic() + WAIT_S
            while len(ledger.grouped) < len(calls):  # poll with a timeout, no sleep-sync
                assert time.monotonic() < deadline, "the calls never queued as one group"
                time.sleep(0.005)
    finally:
        if sqlite:
            ledger.writers.release()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.fixture
def fanned(db):
    """Run r1 whose step 0 (node M) fanned out into 4 items."""
    db.create_run(RUN, "f", initial_store={}, status="running")
    db.insert_step(RUN, 0, "M", lease_s=LEASE)
    assert db.claim_step(RUN, 0, 1, "w0", LEASE, holder="w0#1")
    assert db.fan_out(RUN, 0, 1, "w0#1", "w0", ['"a"', '"b"', '"c"', '"d"'], [])
    return db


def _c(idx: int, holder: str) -> ItemClaim:
    return ItemClaim(RUN, 0, idx, 1, holder)


def _event_body(name: str, ending: BaseException | None) -> Callable[[Any], str]:
    def write(conn: Any) -> str:
        op = events.insert_op(events.rows_of(RUN, [{"event": name, "step": 0}]))
        assert pipeline.run(conn, [op])
        if ending is not None:
            raise ending
        return name

    return write


def _grouped_call(db, fn: Callable[[Any], Any]) -> Callable[[], Any]:
    return lambda: txn.run(db._ledger, fn, write=True, what="testing", batched=True, grouped=True)


def test_a_group_where_one_compare_and_set_misses_commits_the_others(fanned):
    """Four item commits in one group; item 3's holder lost its claim: its commit writes
    nothing and says so, the three others land with their results and counts."""
    db = fanned
    for idx in range(4):
        assert db.claim_item(_c(idx, f"w{idx}#1"), "M", LEASE)[0]
    holders = {0: "w0#1", 1: "w1#1", 2: "w2#1", 3: "stale#9"}
    calls = [
        (lambda i=i: db.commit_item(_c(i, holders[i]), result_json=f'"R{i}"', lease_s=LEASE))
        for i in range(4)
    ]
    got = _queued_together(db, calls, pg_groups=True)
    assert [g[0] for g in got] == [True, True, True, False]
    assert got[3] == (False, None)
    rows = {r["idx"]: r for r in db.get_items(RUN, 0)}
    assert [(rows[i]["status"], rows[i]["result_json"]) for i in range(3)] == [
        ("done", '"R0"'),
        ("done", '"R1"'),
        ("done", '"R2"'),
    ]
    assert (rows[3]["status"], rows[3]["result_json"], rows[3]["lease_owner"]) == (
        "running",
        None,
        "w3#1",
    )
    join = db.get_join(RUN, 0)
    assert (join["done"], join["total"]) == (3, 4)
    assert db.get_step(RUN, 0)["attempt"] == 1  # not complete: the step stays parked
    # The lost holder's claim is still fenced out, the true one commits and completes.
    assert db.commit_item(_c(3, "w3#1"), result_json='"R3"', lease_s=LEASE)[1]["done"] == 4


def test_the_group_that_completes_a_join_tells_exactly_one_item(fanned):
    """Every item of the step committed in one group, given in reverse order: each is
    counted once, the step is queued once for its join, and exactly one commit is told
    it completed the count (the one that publishes the join)."""
    db = fanned
    for idx in range(4):
        assert db.claim_item(_c(idx, f"w{idx}#1"), "M", LEASE)[0]
    calls = [
        (lambda i=i: db.commit_item(_c(i, f"w{i}#1"), result_json=f'"R{i}"', lease_s=LEASE))
        for i in reversed(range(4))
    ]
    got = _queued_together(db, calls, pg_groups=True)
    assert all(committed for committed, _ in got)
    assert sorted(state["done"] for _, state in got) == [1, 2, 3, 4]
    completer = next(state for _, state in got if state["done"] == state["total"])
    assert (completer["step_status"], completer["step_attempt"]) == ("queued", 2)
    assert completer["lease_owner"] is None
    assert db.get_join(RUN, 0)["done"] == 4
    assert [r["result_json"] for r in db.get_items(RUN, 0)] == ['"R0"', '"R1"', '"R2"', '"R3"']


def test_a_group_spanning_two_steps_counts_each_on_its_own_join(fanned):
    """Items of two fanned-out steps (of two runs) in one group: each join counts its own
    items only, and the one that completes is told so."""
    db = fanned
    db.create_run("r2", "f", initial_store={}, status="running")
    db.insert_step("r2", 0, "M", lease_s=LEASE)
    assert db.claim_step("r2", 0, 1, "w0", LEASE, holder="w0#2")
    assert db.fan_out("r2", 0, 1, "w0#2", "w0", ['"x"'], [])
    other = ItemClaim("r2", 0, 0, 1, "w9#1")
    assert db.claim_item(other, "M", LEASE)[0]
    for idx in range(2):
        assert db.claim_item(_c(idx, f"w{idx}#1"), "M", LEASE)[0]
    calls = [
        lambda: db.commit_item(_c(1, "w1#1"), result_json='"R1"', lease_s=LEASE),
        lambda: db.commit_item(other, result_json='"X"', lease_s=LEASE),
        lambda: db.commit_item(_c(0, "w0#1"), result_json='"R0"', lease_s=LEASE),
    ]
    got = _queued_together(db, calls, pg_groups=True)
    assert [(g[0], g[1]["done"], g[1]["total"]) for g in got] in (
        [(True, 2, 4), (True, 1, 1), (True, 1, 4)],
        [(True, 1, 4), (True, 1, 1), (True, 2, 4)],
    )
    assert got[1][1]["step_status"] == "queued"  # r2's join is complete
    assert (db.get_join(RUN, 0)["done"], db.get_join("r2", 0)["done"]) == (2, 1)
    assert db.get_step(RUN, 0)["attempt"] == 1  # r1's step stays parked


def test_claims_in_one_group_each_get_their_own_answer(fanned):
    """Claims of four items and a duplicate claim of item 0 by another holder, queued
    together: exactly one claim of item 0 wins, each gets its value and try."""
    db = fanned
    calls = [(lambda i=i: db.claim_item(_c(i, f"w{i}#1"), "M", LEASE)) for i in range(4)]
    calls.append(lambda: db.claim_item(_c(0, "dup#1"), "M", LEASE))
    got = _queued_together(db, calls)
    assert [g[0] for g in got[1:4]] == [True, True, True]
    assert [g[2] for g in got[1:4]] == [('"b"', 1), ('"c"', 1), ('"d"', 1)]
    assert sorted([got[0][0], got[4][0]]) == [False, True]  # one of the two holders
    owner = db.get_item(RUN, 0, 0)["lease_owner"]
    assert owner == ("w0#1" if got[0][0] else "dup#1")
    assert all(g[1]["status"] == "running" for g in got)  # the run's guard, read by each


def test_a_call_that_fails_in_a_group_rolls_back_alone(db):
    """Three grouped bodies writing an event each: one returns, one raises an error, one
    aborts. Only the first one's row is written; each caller gets its own outcome."""
    db.create_run(RUN, "f", initial_store={}, status="running")
    got = _queued_together(
        db,
        [
            _grouped_call(db, _event_body("kept", None)),
            _grouped_call(db, _event_body("failed", ValueError("boom"))),
            _grouped_call(db, _event_body("aborted", txn.Abort("refused"))),
        ],
    )
    assert got[0] == "kept"
    assert isinstance(got[1], ValueError) and str(got[1]) == "boom"
    assert got[2] == "refused"
    names = [e["event"] for e in db.get_events(RUN)]
    assert "kept" in names and "failed" not in names and "aborted" not in names


# --- SQLite only: how the group itself fails (a PostgreSQL group is one batch). ---


@pytest.fixture
def sqlite_fanned(tmp_path):
    """``fanned`` on an SQLite ledger: the group's own failures have no PostgreSQL twin."""
    from pocoflow.db import WorkflowDB

    db = WorkflowDB(str(tmp_path / "ledger.db"))
    db.create_run(RUN, "f", initial_store={}, status="running")
    db.insert_step(RUN, 0, "M", lease_s=LEASE)
    assert db.claim_step(RUN, 0, 1, "w0", LEASE, holder="w0#1")
    assert db.fan_out(RUN, 0, 1, "w0#1", "w0", ['"a"', '"b"', '"c"', '"d"'], [])
    yield db
    db.close()


def _stop_stranded(monkeypatch, threads: list[threading.Thread]) -> list[int]:
    """The threads still inside after ``WAIT_S``; those are made to leave (a defect
    would have them loop for ever holding the process's write lock)."""
    for t in threads:
        t.join(WAIT_S)
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    if stuck:

        def stop(*_: Any) -> None:
            raise RuntimeError("stopped by the test")

        monkeypatch.setattr(txn, "_run_units", stop)
        for t in threads:
            t.join(WAIT_S)
    return stuck


def _start_queued(db, calls: list[Callable[[], Any]]) -> tuple[list[threading.Thread], list[Any]]:
    """``calls`` on threads of their own, all queued for the write lock (held here);
    the caller releases ``db._ledger.writers``."""
    ledger = db._ledger
    results: list[Any] = [None] * len(calls)

    def call(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # an interrupt too: the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(calls))]
    ledger.writers.acquire()
    for t in threads:
        t.start()
    deadline = time.monotonic() + WAIT_S
    while len(ledger.grouped) < len(calls):
        assert time.monotonic() < deadline, "the calls never queued as one group"
        time.sleep(0.005)
    return threads, results


@pytest.mark.parametrize("failure", ["pool timeout", "locked"])
def test_a_failed_checkout_fails_each_call_of_the_group_and_strands_none(
    sqlite_fanned, monkeypatch, failure
):
    """The combiner's checkout of a pooled connection fails (pool timeout, a connect
    hook's 'database is locked'): every call of its group ends with that error (a locked
    one retried, and then claimed), and no thread stays inside holding the write lock."""
    from sqlalchemy.exc import OperationalError, TimeoutError as PoolTimeout

    db = sqlite_fanned
    ledger = db._ledger
    real = ledger.engine.raw_connection
    failed: list[int] = []

    def raw_connection() -> Any:
        if not failed:
            failed.append(1)
            if failure == "locked":
                import sqlite3

                raise OperationalError(
                    "connect", None, sqlite3.OperationalError("database is locked")
                )
            raise PoolTimeout("QueuePool limit reached, connection timed out")
        return real()

    ledger.dispose()  # no kept connection (``LedgerEngine.borrow``): the next is checked out
    monkeypatch.setattr(ledger.engine, "raw_connection", raw_connection)
    calls = [(lambda i=i: db.claim_item(_c(i, f"w{i}#1"), "M", LEASE)) for i in range(3)]
    threads, got = _start_queued(db, calls)
    ledger.writers.release()
    assert _stop_stranded(monkeypatch, threads) == [], "calls stranded in the group"
    assert failed
    if failure == "locked":
        assert [g[0] for g in got] == [True, True, True]
    else:
        assert all(isinstance(g, PoolTimeout) for g in got), got
        assert [db.get_item(RUN, 0, i)["status"] for i in range(3)] == ["queued"] * 3  # unclaimed
    assert not ledger.grouped
    assert ledger.writers.acquire(timeout=WAIT_S)  # the next writer of the process gets it
    ledger.writers.release()


def test_a_leader_whose_checkout_fails_leaves_no_second_copy_of_its_call(
    sqlite_fanned, monkeypatch
):
    """Three item commits queued as one group would be, ``MAX_GROUP`` 2: the leader takes
    its own and one more, and its checkout fails with 'locked', which ``run`` retries as
    new calls. No call may stay queued beside its retry: run twice, the second copy's
    compare-and-set misses and its caller hears 'lost' for a result in the ledger."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    db = sqlite_fanned
    ledger = db._ledger
    for i in range(3):
        assert db.claim_item(_c(i, f"w{i}#1"), "M", LEASE)[0]
    monkeypatch.setattr(combine, "MAX_GROUP", 2)
    real_borrow = ledger.borrow  # the leader's connection (kept, else checked out)
    failed: list[int] = []

    def borrow() -> Any:
        if not failed:  # the first (two-call) group
            failed.append(1)
            raise OperationalError("connect", None, sqlite3.OperationalError("database is locked"))
        return real_borrow()

    monkeypatch.setattr(ledger, "borrow", borrow)
    calls = [
        (lambda i=i: db.commit_item(_c(i, f"w{i}#1"), result_json=f'"R{i}"', lease_s=LEASE))
        for i in range(3)
    ]
    threads, got = _start_queued(db, calls)
    ledger.writers.release()
    assert _stop_stranded(monkeypatch, threads) == []
    assert failed
    assert [g[0] for g in got] == [True, True, True], got
    rows = {r["idx"]: r for r in db.get_items(RUN, 0)}
    assert [rows[i]["result_json"] for i in range(3)] == ['"R0"', '"R1"', '"R2"']
    assert db.get_join(RUN, 0)["done"] == 3  # each counted once
    assert not ledger.grouped


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt, SystemExit, a green thread's timeout."""


def test_an_interrupt_in_one_call_is_raised_in_its_thread_only(sqlite_fanned, monkeypatch):
    """A BaseException in one grouped body rolls the group back; its caller gets it, the
    other calls run again and land once each."""
    db = sqlite_fanned
    threads, got = _start_queued(
        db,
        [
            _grouped_call(db, _event_body("a", None)),
            _grouped_call(db, _event_body("b", _Interrupt())),
            _grouped_call(db, _event_body("c", None)),
        ],
    )
    db._ledger.writers.release()
    assert _stop_stranded(monkeypatch, threads) == []
    assert got[0] == "a" and got[2] == "c", got
    assert isinstance(got[1], _Interrupt)
    names = sorted(e["event"] for e in db.get_events(RUN) if e["event"] in "abc")
    assert names == ["a", "c"]


def test_a_group_whose_commit_fails_fails_every_call(sqlite_fanned, monkeypatch):
    """The group's COMMIT fails (a deferred foreign key that one call broke): nothing of
    the group is written and every call fails with it, the one that aborted too (its
    answer rested on a transaction that never was)."""
    from sqlalchemy.exc import IntegrityError

    db = sqlite_fanned

    def orphan(conn: Any) -> str:
        conn.connection.driver_connection.execute("PRAGMA defer_foreign_keys = ON")
        op = events.insert_op(events.rows_of("no-such-run", [{"event": "orphan", "step": 0}]))
        assert pipeline.run(conn, [op])
        return "orphan"

    def refused(conn: Any) -> str:
        raise txn.Abort("refused")

    threads, got = _start_queued(
        db,
        [
            _grouped_call(db, _event_body("e", None)),
            _grouped_call(db, refused),
            _grouped_call(db, orphan),
        ],
    )
    db._ledger.writers.release()
    assert _stop_stranded(monkeypatch, threads) == []
    assert all(isinstance(g, IntegrityError) for g in got), got
    assert all("FOREIGN KEY" in str(g) and "COMMIT" in str(g) for g in got), got
    assert "e" not in [e["event"] for e in db.get_events(RUN)]


def test_a_failed_savepoint_statement_is_named_in_the_error(sqlite_fanned, monkeypatch):
    """A body that released the group's savepoint itself: the group's own RELEASE then
    fails, and the error every call gets names that statement (not the BEGIN)."""
    from sqlalchemy.exc import OperationalError

    db = sqlite_fanned

    def releases_early(conn: Any) -> str:
        conn.connection.driver_connection.execute("RELEASE pf_unit")
        return "released"

    threads, got = _start_queued(
        db, [_grouped_call(db, _event_body("e", None)), _grouped_call(db, releases_early)]
    )
    db._ledger.writers.release()
    assert _stop_stranded(monkeypatch, threads) == []
    assert all(isinstance(g, OperationalError) for g in got), got
    assert all("RELEASE pf_unit" in str(g) and "BEGIN" not in str(g) for g in got), got
    assert "e" not in [e["event"] for e in db.get_events(RUN)]


@pytest.fixture
def pg_fanned(database_url):
    """``fanned`` on a PostgreSQL ledger, with a psycopg DSN to lock rows beside it."""
    from sqlalchemy.engine import make_url

    from pocoflow.db import WorkflowDB
    from tests.conftest import fresh_postgres_database

    with fresh_postgres_database(database_url) as url:
        db = WorkflowDB(url)
        db.create_run(RUN, "f", initial_store={}, status="running")
        db.insert_step(RUN, 0, "M", lease_s=LEASE)
        assert db.claim_step(RUN, 0, 1, "w0", LEASE, holder="w0#1")
        assert db.fan_out(RUN, 0, 1, "w0#1", "w0", ['"a"', '"b"', '"c"', '"d"'], [])
        try:
            yield db, make_url(url).set(drivername="postgresql").render_as_string(False)
        finally:
            db.close()


def test_an_item_commit_waits_for_its_join_row_before_it_locks_its_item(pg_fanned):
    """A resume's ``reopen`` holds the join row and re-opens items whose lease expired;
    an item commit waiting for that join row must not hold its item row meanwhile (the
    two would deadlock: PostgreSQL would abort one of them after ``deadlock_timeout``)."""
    import psycopg

    db, dsn = pg_fanned
    claim = _c(0, "w0#1")
    assert db.claim_item(claim, "M", LEASE)[0]
    got: list[Any] = []
    with psycopg.connect(dsn) as resumer, psycopg.connect(dsn, autocommit=True) as probe:
        resumer.execute("UPDATE pf_joins SET done = done WHERE run_id = %s", [RUN])
        committer = threading.Thread(
            target=lambda: got.append(db.commit_item(claim, result_json='"A"', lease_s=LEASE))
        )
        committer.start()
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        wait_until(lambda: probe.execute(waiting).fetchone()[0] == 1, WAIT_S)
        # The item row is free: the resume may re-open it without waiting.
        row = probe.execute(
            "SELECT idx FROM pf_items WHERE run_id = %s AND idx = 0 FOR UPDATE NOWAIT", [RUN]
        ).fetchone()
        assert row == (0,)
        resumer.commit()
    committer.join(WAIT_S)
    assert got and got[0][0] is True
    assert db.get_join(RUN, 0)["done"] == 1
