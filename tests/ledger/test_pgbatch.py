"""``pgbatch``: a PostgreSQL batch sent in one write and read back whole (what every
claim and commit of the ledger goes through on PostgreSQL).

Its edges, on a real server: a batch far larger than the socket buffers (results read
while sending, or the two sides wait on each other for ever), each statement prepared
once per connection, a server error mid-batch (raised as psycopg raises it, and the
connection usable after), and a batch stopped half queued (the connection dropped, never
lent again in that state)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError

from pocoflow.db import WorkflowDB
from pocoflow.ledger import pgbatch, pipeline, txn
from pocoflow.ledger.tables import pf_workers
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.ledger


@pytest.fixture
def pg_url(database_url: str) -> Iterator[str]:
    with fresh_postgres_database(database_url) as url:
        yield url


def libpq(pg_url: str) -> str:
    from pocoflow.ledger.engine import resolve_url

    return resolve_url(pg_url).set(drivername="postgresql").render_as_string(False)


@pytest.fixture
def raw(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq(pg_url), autocommit=True) as conn:
        yield conn


def ours(raw: Any) -> list[str]:
    """The names of this session's prepared statements that pgbatch made."""
    rows = raw.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'pf%'")
    return sorted(name for (name,) in rows.fetchall())


def test_a_batch_larger_than_the_socket_buffers_goes_through(raw: Any) -> None:
    """20,000 statements whose replies (about 1 MB) outgrow what the sockets hold while
    the batch is still being sent: the server stops reading until its replies are read,
    so they must be (by libpq when a send would block, and by the send loop)."""
    commands = [pgbatch.Command(b"SELECT $1::int + 1", [n], reads=True) for n in range(20_000)]
    done: list[Any] = []
    sender = threading.Thread(target=lambda: done.append(pgbatch.run(raw, commands)))
    sender.start()
    sender.join(60.0)
    assert not sender.is_alive(), "the batch never came back"
    [outcomes] = done
    assert [o.rows for o in outcomes[:2]] == [[(1,)], [(2,)]] and len(outcomes) == 20_000
    assert outcomes[-1] == pgbatch.Outcome(1, [(20_000,)])


def test_each_statement_is_prepared_once_per_connection(raw: Any) -> None:
    for n in range(30):
        batch = [pgbatch.Command(b"SELECT $1::text", [f"v{n}"], reads=True), pgbatch.Command(b"BEGIN"),
                 pgbatch.Command(b"SELECT $1::int", [n], reads=True), pgbatch.Command(b"COMMIT")]  # fmt: skip
        outcomes = pgbatch.run(raw, batch)
        assert (outcomes[0].rows, outcomes[2].rows) == ([(f"v{n}",)], [(n,)])
    assert ours(raw) == ["pf_1", "pf_2"]
    assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_server_error_mid_batch_is_raised_and_leaves_the_connection_usable(raw: Any) -> None:
    raw.execute("CREATE TABLE t (k int PRIMARY KEY)")
    batch = [pgbatch.Command(b"BEGIN"), pgbatch.Command(b"INSERT INTO t VALUES ($1)", [1]),
             pgbatch.Command(b"INSERT INTO t VALUES ($1)", [1]),  # a duplicate key
             pgbatch.Command(b"INSERT INTO t VALUES ($1)", [2]), pgbatch.Command(b"COMMIT")]  # fmt: skip
    with pytest.raises(psycopg.errors.UniqueViolation) as raised:
        pgbatch.run(raw, batch)
    assert raised.value.diag.constraint_name == "t_pkey"
    assert raw.pgconn.pipeline_status == 0  # out of pipeline mode
    raw.rollback()  # the transaction the batch opened failed: the caller ends it
    assert raw.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert pgbatch.run(raw, [pgbatch.Command(b"INSERT INTO t VALUES ($1)", [3])])[0].rowcount == 1
    assert raw.execute("SELECT k FROM t").fetchall() == [(3,)]


def test_failing_batches_leave_no_prepared_statements_behind(raw: Any) -> None:
    """A prepare that ran stays known after its batch failed (the session keeps it
    whatever the transaction did): a batch that keeps failing prepares nothing again."""
    raw.execute("CREATE TABLE t (k int PRIMARY KEY)")
    raw.execute("INSERT INTO t VALUES (1)")
    for _ in range(20):
        batch = [pgbatch.Command(b"BEGIN"), pgbatch.Command(b"INSERT INTO t VALUES ($1)", [1]),
                 pgbatch.Command(b"SELECT $1::int", [7], reads=True)]  # fmt: skip
        with pytest.raises(psycopg.errors.UniqueViolation):
            pgbatch.run(raw, batch)
        raw.execute("ROLLBACK")
    assert ours(raw) == ["pf_1"]  # the SELECT after the failure was never prepared


def test_a_batch_on_a_connection_not_in_autocommit_is_in_its_transaction(pg_url: str) -> None:
    """As psycopg's own rule: a batch on a connection outside autocommit (how the pool
    lends them) opens its transaction, which the caller's rollback undoes and commit keeps."""
    db = WorkflowDB(pg_url)
    try:
        row = {"worker_id": "w1", "host": "h", "pid": 1, "started_at": 1.0, "beat_at": 1.0}
        for worker, end in (("w1", "rollback"), ("w2", "commit")):
            with db._ledger.engine.connect() as conn:
                conn.begin()
                assert pipeline.run(
                    conn, [pipeline.Op(insert(pf_workers), {**row, "worker_id": worker})]
                )
                getattr(conn, end)()
        with db._ledger.engine.connect() as conn:
            assert conn.execute(select(pf_workers.c.worker_id)).scalars().all() == ["w2"]
    finally:
        db.close()


def test_statements_psycopg_deallocated_are_prepared_again(pg_url: str) -> None:
    """psycopg sends DEALLOCATE ALL after a rollback on a connection where it prepared
    statements of its own (after 5 runs of one): the next batch meets a statement the
    session no longer has, fails without running it, and the one after prepares again."""
    with psycopg.connect(libpq(pg_url)) as conn:
        select_one = [pgbatch.Command(b"SELECT $1::int", [1], reads=True)]
        assert pgbatch.run(conn, select_one)[0].rows == [(1,)]
        conn.commit()
        for _ in range(6):
            conn.execute("SELECT 1").fetchall()  # psycopg prepares it
        conn.rollback()  # ROLLBACK, then psycopg's DEALLOCATE ALL
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            pgbatch.run(conn, select_one)
        conn.rollback()
        assert pgbatch.run(conn, select_one)[0].rows == [(1,)]


def test_the_ledger_retries_a_transaction_whose_statements_were_deallocated(
    pg_url: str,
) -> None:
    db = WorkflowDB(pg_url)
    try:
        row = {"worker_id": "w1", "host": "h", "pid": 1, "started_at": 1.0, "beat_at": 1.0}

        def write(worker: str) -> bool:
            op = pipeline.Op(insert(pf_workers), {**row, "worker_id": worker})
            body = lambda conn: pipeline.run(conn, [op])  # noqa: E731
            return txn.run(db._ledger, body, write=True, what="test batch", batched=True)

        def backend() -> int:
            with db._ledger.engine.connect() as conn:
                return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())

        assert write("w1")
        pid = backend()
        with db._ledger.engine.connect() as conn:  # the same pooled connection
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == pid
            for _ in range(6):
                conn.exec_driver_sql("SELECT 1").all()  # psycopg prepares it
            conn.rollback()  # and deallocates everything, pgbatch's statements included
        assert write("w2") and backend() == pid
        with db._ledger.engine.connect() as conn:
            assert conn.execute(select(pf_workers.c.worker_id)).scalars().all() == ["w1", "w2"]
    finally:
        db.close()


def test_a_statement_that_does_not_prepare_is_prepared_afresh_once_fixed(raw: Any) -> None:
    with pytest.raises(psycopg.errors.UndefinedTable):
        pgbatch.run(raw, [pgbatch.Command(b"SELECT k FROM later WHERE k = $1", [1], reads=True)])
    raw.execute("CREATE TABLE later (k int)")
    raw.execute("INSERT INTO later VALUES (1)")
    outcome = pgbatch.run(raw, [pgbatch.Command(b"SELECT k FROM later WHERE k = $1", [1], True)])
    assert outcome == [pgbatch.Outcome(1, [(1,)])]


def test_a_batch_stopped_half_queued_closes_its_connection(raw: Any) -> None:
    batch = [pgbatch.Command(b"SELECT $1::int", [1]), pgbatch.Command(b"SELECT $1", [object()])]
    with pytest.raises(psycopg.ProgrammingError, match="object"):
        pgbatch.run(raw, batch)
    assert raw.closed  # not left in pipeline mode with a statement queued


def test_a_batch_stopped_half_queued_drops_its_connection_not_the_pool(pg_url: str) -> None:
    """A value psycopg cannot adapt stops the batch after its first statements were
    queued: that connection is closed (never lent again half in pipeline mode), the
    call fails with a clear error, and the ledger goes on on a fresh connection."""
    db = WorkflowDB(pg_url)
    try:
        row = {"worker_id": "w1", "host": "h", "pid": 1, "started_at": 1.0, "beat_at": 1.0}
        bad = {**row, "worker_id": "w2", "host": object()}

        def body(conn: Any) -> None:
            pipeline.run(
                conn, [pipeline.Op(insert(pf_workers), row), pipeline.Op(insert(pf_workers), bad)]
            )

        with pytest.raises(DBAPIError, match="object"):
            txn.run(db._ledger, body, write=True, what="test batch", batched=True)
        with db._ledger.engine.connect() as conn:  # nothing of it landed
            assert conn.execute(select(pf_workers.c.worker_id)).all() == []
        ok = lambda conn: pipeline.run(conn, [pipeline.Op(insert(pf_workers), row)])  # noqa: E731
        assert txn.run(db._ledger, ok, write=True, what="test batch", batched=True)
        with pytest.raises(IntegrityError):  # the same row again: the server's error
            txn.run(db._ledger, ok, write=True, what="test batch", batched=True)
    finally:
        db.close()
