"""What a local step asks of the ledger, pinned by mechanism (issue 6: the SQLite ledger's
cost per local step at most 3x raw sqlite3 doing the same writes).

One transaction per step: on PostgreSQL the run's cancel/pause request comes back with
the commit's pipeline (the run UPDATE's RETURNING), not from a statement of its own; on
SQLite the step borrows a kept driver connection instead of checking one out of the
pool, and the fork gate still sees every loan and nothing after it."""

from __future__ import annotations

import sqlite3
import tempfile
from typing import Any

import pytest
from sqlalchemy import bindparam, event, insert, select

from pocoflow.db import WorkflowDB
from pocoflow.ledger import pipeline, txn
from pocoflow.ledger.forkgate import gate
from pocoflow.ledger.tables import pf_workers
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


def test_a_local_step_on_postgresql_is_two_round_trips(database_url: str) -> None:
    """The pipeline (its BEGIN, the step's statements, the control read) and the COMMIT."""
    from tests.conftest import fresh_postgres_database

    with fresh_postgres_database(database_url) as url:
        db = WorkflowDB(url)
        per_step = (round_trips(db, 12, url) - round_trips(db, 2, url)) / 10
        db.close()
    assert per_step == 2


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
    assert gate._held == {}


def test_close_closes_the_kept_connections_and_those_lent_meanwhile(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db = WorkflowDB(url)
    counter_flow(url).run({"n": 0, "until": 3})
    ledger = db._ledger
    kept = [loan.driver_connection for loan in ledger.loans]
    assert kept
    lent = ledger.borrow()
    db.close()
    ledger.give_back(lent)  # lent before close: closed, not kept
    assert ledger.loans == []
    for conn in [*kept, lent.driver_connection]:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    assert counter_flow(url).run({"n": 0, "until": 2})["n"] == 2  # and it lends new ones


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
