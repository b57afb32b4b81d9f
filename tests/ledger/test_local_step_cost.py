"""What a local step asks of the ledger, pinned by mechanism (issue 6: the SQLite ledger's
cost per local step at most 3x raw sqlite3 doing the same writes).

One transaction per step: on PostgreSQL the run's cancel/pause request comes back with
the commit's pipeline (the run UPDATE's RETURNING), not from a statement of its own."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
from sqlalchemy import bindparam, event, insert, select

from pocoflow.db import WorkflowDB
from pocoflow.ledger import pipeline, txn
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
