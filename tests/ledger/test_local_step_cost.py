"""What a local step asks of the ledger, pinned by mechanism (issue 6: the SQLite ledger's
cost per local step at most 3x raw sqlite3 doing the same writes).

One transaction per step: on PostgreSQL the run's cancel/pause request comes back with
the commit's pipeline (the run UPDATE's RETURNING), not from a statement of its own; on
SQLite the step borrows a kept driver connection instead of checking one out of the
pool, and the fork gate still sees every loan and nothing after it."""

from __future__ import annotations

import contextlib
import gc
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, event, insert, select

from pocoflow.db import WorkflowDB
from pocoflow.ledger import pipeline, txn
from pocoflow.ledger.forkgate import gate
from pocoflow.ledger.tables import pf_workers
from tests.helpers import wait_until
from tests.ledger.test_batched_txn import worker_row
from tests.ledger.test_flow_runs import counter_flow

pytestmark = pytest.mark.ledger


def round_trips(db: WorkflowDB, steps: int, ledger_url: str) -> int:
    """libpq's round trips (each Sync or simple Query the client sends) of a local run of
    ``steps`` nodes."""
    engine = db._ledger.engine
    with tempfile.NamedTemporaryFile("w+") as log:

        def trace(dbapi_conn: Any, *_: Any) -> None:
            dbapi_conn.pgconn.trace(log.fileno())

        event.listen(engine, "checkout", trace)
        try:
            counter_flow(ledger_url).run({"n": 0, "until": steps})
        finally:
            event.remove(engine, "checkout", trace)
            db.close()  # traced connections are not lent again
        log.seek(0)
        sent = [line.split("\t") for line in log]
    return sum(1 for p in sent if len(p) > 3 and p[1] == "F" and p[3].startswith(("Sync", "Query")))


def test_a_local_step_on_postgresql_is_one_round_trip(database_url: str) -> None:
    """The pipeline: its BEGIN, the step's statements, the control read and the COMMIT."""
    from tests.conftest import fresh_postgres_database

    with fresh_postgres_database(database_url) as url:
        db = WorkflowDB(url)
        per_step = (round_trips(db, 12, url) - round_trips(db, 2, url)) / 10
        db.close()
    assert per_step == 1


def test_local_steps_on_sqlite_check_out_no_pool_connection(tmp_path) -> None:
    """A run's set-up reads and writes through the pool; its steps do not, whatever their
    number."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db = WorkflowDB(url)
    checkouts: list[object] = []
    counter_flow(url).run({"n": 0, "until": 2})  # the kept connection is made (from the pool)
    event.listen(db._ledger.engine, "checkout", lambda *_: checkouts.append(None))
    counter_flow(url).run({"n": 0, "until": 2})
    short = len(checkouts)
    checkouts.clear()
    counter_flow(url).run({"n": 0, "until": 12})
    assert len(checkouts) == short


def test_the_fork_gate_holds_nothing_once_a_runs_steps_ended(tmp_path) -> None:
    """A kept connection leaves the pool checked out (detached): the gate must forget that
    checkout, or every fork would wait for a connection no transaction uses (for up to
    ``FORK_WAIT_S``, then fork with a warning)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    handle = counter_flow(url).run_background({"n": 0, "until": 5})  # another thread
    assert handle.wait(30)["n"] == 5
    # Polled: another thread of this process (a worker heartbeat an earlier test left
    # beating) may hold a checkout for an instant; a leaked one never goes.
    assert wait_until(lambda: gate._held == {}, 10)


def test_close_closes_the_kept_connection_and_one_lent_meanwhile(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db = WorkflowDB(url)
    counter_flow(url).run({"n": 0, "until": 3})
    ledger = db._ledger
    kept = ledger.kept._loan
    assert kept is not None
    lent = ledger.borrow()  # the kept one
    assert lent is kept
    db.close()
    ledger.give_back(lent)  # lent before close: closed, not kept
    assert ledger.kept._loan is None
    with pytest.raises(sqlite3.ProgrammingError):
        lent.driver_connection.execute("SELECT 1")
    assert counter_flow(url).run({"n": 0, "until": 2})["n"] == 2  # and it lends a new one


def open_files_under(folder: Path) -> list[str]:
    """This process's open file descriptors on files in ``folder`` (Linux)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux /proc")
def test_a_ledger_nobody_uses_leaves_no_file_open(tmp_path) -> None:
    """Ledgers each on a fresh file, each committing a step (on its kept connection) and
    then dropped without ``close``: the last reference gone, the kept connection is closed
    (database, -wal and -shm files) at once, not at the next full garbage collection (off
    here, so it cannot hide a reference cycle)."""
    from tests.ledger.test_ledger_commit import make_commit, start

    gc.collect()
    gc.disable()
    try:
        for i in range(10):
            db = WorkflowDB(f"sqlite:///{tmp_path / f'ledger{i}.db'}")
            assert db.commit_step_read_control(make_commit("r1", 0, start(db), {"n": 1}))[0]
            assert db._ledger.kept._loan is not None
            del db
        assert open_files_under(tmp_path) == []
    finally:
        gc.enable()


def test_a_connection_whose_rollback_failed_is_closed_before_the_fork_gate_hears(
    tmp_path, monkeypatch
) -> None:
    """Still in a transaction when given back: closed, and only then reported back to the
    fork gate, so a fork cannot come between and find it mid-transaction."""
    db = WorkflowDB(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = db._ledger
    loan = ledger.borrow()
    loan.driver_connection.execute("BEGIN IMMEDIATE")
    open_at_checkin: list[bool] = []
    real_checkin = gate.checkin

    def checkin(dbapi_conn: Any, record: Any) -> None:
        if record is loan:
            try:
                loan.driver_connection.execute("SELECT 1")
                open_at_checkin.append(True)
            except sqlite3.ProgrammingError:  # closed
                open_at_checkin.append(False)
        real_checkin(dbapi_conn, record)

    monkeypatch.setattr(gate, "checkin", checkin)
    ledger.give_back(loan)
    assert open_at_checkin == [False]
    assert ledger.kept._loan is None
    db.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is a POSIX call")
def test_a_fork_waits_for_a_connection_lent_to_another_thread(tmp_path) -> None:
    """A loan is a checkout to the fork gate: a fork waits until it is given back, and a
    thread asking for a loan meanwhile waits for the fork."""
    db = WorkflowDB(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = db._ledger
    lent = threading.Event()
    give_back = threading.Event()
    events: list[str] = []

    def holder() -> None:
        loan = ledger.borrow()
        lent.set()
        assert give_back.wait(10)
        events.append("given back")
        ledger.give_back(loan)

    thread = threading.Thread(target=holder)
    thread.start()
    assert lent.wait(10)
    forker = threading.Thread(target=lambda: events.append(f"forked {_fork_and_reap()}"))
    forker.start()
    deadline = time.monotonic() + 10
    while gate._forking is None:  # the fork is pending: it waits for the loan
        assert time.monotonic() < deadline
        time.sleep(0.005)
    late: list[str] = []
    borrower = threading.Thread(target=lambda: late.append(ledger.give_back(ledger.borrow())))
    borrower.start()
    borrower.join(0.2)
    assert borrower.is_alive(), "a new loan went out while a fork was pending"
    assert events == []
    give_back.set()
    for t in (thread, forker, borrower):
        t.join(10)
        assert not t.is_alive()
    assert events == ["given back", "forked 0"]
    db.close()


def _fork_and_reap() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_run_reading_gives_each_ops_rows_at_its_own_index(db: Any) -> None:
    """An empty executemany (a step that changed no key writes no value row) runs nothing;
    the rows of the statements after it stay at their index."""
    read = select(pf_workers.c.worker_id).where(pf_workers.c.worker_id == bindparam("w"))

    def body(conn: Any) -> list[list[tuple[Any, ...]]]:
        pipeline.run(conn, [pipeline.Op(insert(pf_workers), worker_row("w1"))])
        ok, rows = pipeline.run_reading(
            conn, [pipeline.Op(insert(pf_workers), []), pipeline.Op(read, {"w": "w1"})]
        )
        assert ok
        return rows

    rows = txn.run(db._ledger, body, write=True, what="test batch", batched=True)
    assert rows == [[], [("w1",)]]


@pytest.mark.parametrize("n_events", [0, 1, 2, 9])
def test_a_step_reads_its_control_whatever_its_number_of_events(db: Any, n_events: int) -> None:
    """On PostgreSQL one event, or more than a multi-row INSERT takes, go out as an
    executemany of ``insert(pf_events)``, whose SQL carries SQLAlchemy's implicit
    ``RETURNING id``: the batch must not read rows of it ("no result available"), only
    the run UPDATE's asked-for RETURNING."""
    from tests.ledger.test_ledger_commit import make_commit, start

    manifest = start(db)
    db.set_control("r1", "pause")
    events = [{"event": "custom", "step": 0, "node_name": "Node", "i": i} for i in range(n_events)]
    c = make_commit("r1", 0, manifest, {"n": 1}, events=events, run_fields={"total_steps": 1})
    assert db.commit_step_read_control(c) == (True, "pause")
    written = [e for e in db.get_events("r1") if e["event"] == "custom"]
    assert len(written) == n_events


DISPOSES = 300


def test_dispose_racing_loans_leaves_no_connection_open(tmp_path, monkeypatch) -> None:
    """``close`` (``dispose``) on one thread while others borrow and give back: no loan
    is closed by ``dispose`` while lent (taken from the kept slot as ``dispose`` empties
    it), and every connection ever lent ends closed by the last ``dispose``, none dropped
    open from the kept slot by a swap between a give-back's check and its keep."""
    db = WorkflowDB(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = db._ledger
    made: list[sqlite3.Connection] = []
    real = ledger.engine.raw_connection

    def raw_connection() -> Any:
        pooled = real()
        made.append(pooled.driver_connection)
        return pooled

    monkeypatch.setattr(ledger.engine, "raw_connection", raw_connection)
    monkeypatch.setattr(sys, "getswitchinterval", sys.getswitchinterval)
    sys.setswitchinterval(1e-6)  # threads switch between almost any two bytecodes
    stop = threading.Event()
    errors: list[BaseException] = []

    def lend() -> None:
        while not stop.is_set():
            loan = ledger.borrow()
            try:
                loan.driver_connection.execute("SELECT 1")  # not closed under it
            except BaseException as exc:
                errors.append(exc)
            ledger.give_back(loan)

    threads = [threading.Thread(target=lend) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for _ in range(DISPOSES):
            ledger.dispose()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(0.005)
    ledger.dispose()
    still_open = 0
    for conn in made:
        try:
            conn.execute("SELECT 1")
            still_open += 1
        except sqlite3.ProgrammingError:
            pass
    assert errors == []
    assert len(made) > 1 and still_open == 0
