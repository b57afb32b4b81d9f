"""``txn.run(..., batched=True)``: on PostgreSQL its BEGIN goes out inside the first
pipeline batch (the driver connection runs in autocommit for that transaction), on
SQLite the body runs on the raw pooled connection. Either way the transaction is one
transaction (an abort after the batch leaves nothing), and every connection goes back
to the pool as it was lent: no transaction open, PostgreSQL's autocommit off, so a
later plain write transaction is still one transaction."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from pocoflow.ledger import pipeline, txn
from pocoflow.ledger.tables import pf_workers

pytestmark = pytest.mark.ledger


def worker_row(worker: str) -> dict[str, Any]:
    return {"worker_id": worker, "host": "h", "pid": 1, "started_at": 1.0, "beat_at": 1.0}


def batched(db: Any, *workers: str, then: Exception | None = None) -> None:
    def body(conn: Any) -> None:
        pipeline.run(conn, [pipeline.Op(insert(pf_workers), worker_row(w)) for w in workers])
        if then is not None:
            raise then

    txn.run(db._ledger, body, write=True, what="test batch", batched=True)


def workers(db: Any) -> int:
    with db._ledger.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(pf_workers)).scalar_one())


def lent_as_new(pooled: Any, dialect: str) -> bool:
    raw = pooled.driver_connection
    if dialect == "postgresql":
        return raw.autocommit is False and raw.pgconn.transaction_status == 0  # idle
    return not raw.in_transaction


def test_a_batched_transaction_is_one_and_gives_its_connection_back_clean(db: Any) -> None:
    batched(db, "w1")  # committed
    batched(db, "w2", then=txn.Abort())  # rolled back after its batch ran
    with pytest.raises(IntegrityError):
        batched(db, "w3", "w1")  # the batch itself fails (w1 exists)
    with pytest.raises(RuntimeError):
        batched(db, "w4", then=RuntimeError("the body fails after its batch"))
    assert workers(db) == 1  # only w1: each failed transaction left nothing
    engine = db._ledger.engine
    idle = engine.pool.checkedin()
    assert idle >= 1
    lent = [engine.raw_connection() for _ in range(idle)]  # every idle pooled connection
    try:
        assert all(lent_as_new(pooled, db._ledger.dialect) for pooled in lent)
    finally:
        for pooled in lent:
            pooled.close()


@pytest.mark.parametrize("aborts", [True, False])
def test_a_batch_carrying_its_commit_commits_nothing_when_an_aborting_guard_missed(
    db: Any, aborts: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that sends its COMMIT with it (``run_reading(commit=True)``): a guard that
    aborts on a miss (``Op.aborts_on_miss``) keeps the writes before it out of the
    ledger; a plain guard would let them commit on PostgreSQL (which is why the step
    commit's guards abort). The connection goes back to the pool clean either way."""
    from sqlalchemy import update

    batched(db, "w1")
    missed = update(pf_workers).where(pf_workers.c.worker_id == "nobody").values(pid=2)

    def body(conn: Any) -> bool:
        ops = [
            pipeline.Op(insert(pf_workers), worker_row("w2")),
            pipeline.Op(missed, {}, must_hit_one=True, aborts_on_miss=aborts),
            *[pipeline.Op(insert(pf_workers), worker_row(f"w{n}")) for n in range(3, 9)],
        ]
        ok, _rows = pipeline.run_reading(conn, ops, commit=True)
        if not ok:
            raise txn.Abort(False)
        return True

    with caplog.at_level("WARNING", logger="psycopg"):
        assert txn.run(db._ledger, body, write=True, what="test batch", batched=True) is False
    # A missed guard is an answer, not a fault: no "error ignored terminating" warning.
    assert not [r for r in caplog.records if r.name == "psycopg"]
    leaked = db._ledger.dialect == "postgresql" and not aborts
    assert workers(db) == (8 if leaked else 1)
    engine = db._ledger.engine
    lent = [engine.raw_connection() for _ in range(engine.pool.checkedin())]
    try:
        assert all(lent_as_new(pooled, db._ledger.dialect) for pooled in lent)
    finally:
        for pooled in lent:
            pooled.close()


def test_an_aborting_guard_that_changed_two_rows_misses_too(db: Any) -> None:
    """``must_hit_one`` means one: a guarded write that changed two rows aborts the
    transaction as a miss does, on both ledgers."""
    from sqlalchemy import update

    batched(db, "w1", "w2")
    both = update(pf_workers).where(pf_workers.c.host == "h").values(pid=7)  # w1 and w2

    def body(conn: Any) -> bool:
        ops = [
            pipeline.Op(insert(pf_workers), worker_row("w3")),
            pipeline.Op(both, {}, must_hit_one=True, aborts_on_miss=True),
        ]
        if not pipeline.run_reading(conn, ops, commit=True)[0]:
            raise txn.Abort(False)
        return True

    assert txn.run(db._ledger, body, write=True, what="test batch", batched=True) is False
    assert workers(db) == 2
    with db._ledger.engine.connect() as conn:
        assert conn.execute(select(pf_workers.c.pid)).scalars().all() == [1, 1]
