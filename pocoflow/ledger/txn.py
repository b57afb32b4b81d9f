"""One transaction with retries: how every ledger call touches the database.

SQLite serialises writers with a file lock. ``busy_timeout`` already makes a writer wait
inside SQLite; when even that runs out we retry a few times with a short backoff and then
raise ``LedgerLockedError`` naming the database and run. PostgreSQL aborts a transaction
to resolve a serialization failure or a deadlock (SQLSTATE 40001 / 40P01); those are
retried the same way (``LedgerConflictError`` when they never clear). A failed try has
rolled back, so retrying never writes half a step.

A connection dropped by the server (PostgreSQL restart, ``pg_terminate_backend``) is
retried once on a fresh connection. Dropped *during COMMIT*, the outcome is unknown: the
commit may have landed. The retry then runs into its own write (its compare-and-set
misses), so a call that can tell its own write from another's passes ``confirm``, which
looks at the rows after such a retry and corrects the answer (defect 7 of issue 6).
"""

from __future__ import annotations

import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from pocoflow.ledger import pipeline
from pocoflow.ledger.combine import GroupAborted, Unit, fail
from pocoflow.ledger.engine import LedgerEngine
from pocoflow.ledger.errors import (
    LedgerConflictError,
    LedgerLockedError,
    is_conflict,
    is_locked,
    is_lost_statement,
)

T = TypeVar("T")
#: libpq's PQTRANS_IDLE: no transaction open on the connection.
_PG_IDLE = 0

#: One DEBUG record per lock retry (``extra``: ``ledger_retry``, the retry number from 1,
#: and ``ledger_run_id``), emitted before the backoff sleep: the contention is visible in
#: logs, and tests can see that a writer really retried.
_log = logging.getLogger("pocoflow.ledger.txn")

LOCK_RETRIES = 4
"""Tries after the first when SQLite reports the database locked."""
LOCK_BACKOFF_S = 0.02
"""First pause between those tries; doubled each time."""
CONFLICT_RETRIES = 6
"""Tries after the first when PostgreSQL aborted the transaction for a serialization
failure or a deadlock; the pause doubles from ``LOCK_BACKOFF_S`` with jitter, because two
transactions that deadlocked once and retry in step would deadlock again."""


# Because a write that starts deferred and later needs the write lock can fail with
# SQLITE_BUSY without waiting; IMMEDIATE takes the lock up front, so busy_timeout applies.
# Reads stay deferred: in WAL they never wait for a writer.
_SQLITE_BEGIN = {True: "BEGIN IMMEDIATE", False: "BEGIN"}


class Abort(Exception):
    """Raised inside a transaction to roll it back and make the call return ``value``."""

    def __init__(self, value: object = None) -> None:
        super().__init__(value)
        self.value = value


def run(
    ledger: LedgerEngine,
    fn: Callable[[Connection], T],
    *,
    write: bool,
    what: str,
    run_id: str | None = None,
    confirm: Callable[[Connection, T], T] | None = None,
    batched: bool = False,
    grouped: bool = False,
) -> T:
    """Run ``fn(conn)`` in one transaction, committed if it returns, rolled back if it raises.

    ``batched``: ``fn`` starts with a ``pipeline`` batch: what the claim and the commit
    of every step do. On PostgreSQL its BEGIN then goes out inside that batch instead of
    in a round trip of its own (psycopg sends and syncs a BEGIN alone before a
    pipeline's first statement; see ``_begin_in_batch``). On SQLite ``fn`` gets a
    driver connection without SQLAlchemy's Connection and Transaction around it
    (``_on_raw_sqlite``), so it may use only what ``pipeline`` and the driver need.

    ``write`` asks SQLite for the write lock at BEGIN (so waiting for it is orderly). On
    SQLite the pool's connections run with the driver's transaction handling off
    (``engine``), so the BEGIN here is what makes the calls inside one transaction.
    Reads on PostgreSQL run in autocommit (``LedgerEngine.reader``). ``what`` and
    ``run_id`` only name the operation in a lock error.

    ``grouped`` (with ``batched``): on SQLite, ``fn`` may share its transaction with the
    grouped calls of other threads of this process that wait for the write lock at the
    same moment, each in a savepoint of its own (``_run_grouped``): what every map item's
    claim and commit does. The same outcome for each call as alone; one BEGIN, COMMIT
    and lock hand-over for all of them.

    ``confirm(conn, result)`` runs (in a read after the retry) only when a try lost
    its connection during COMMIT: ``result`` is what the retry returned (or its ``Abort``
    value), and ``confirm`` returns the true answer, e.g. True where the retry's
    compare-and-set missed because the first try's write, recognised by a value only this
    call wrote, had landed. Free on every other call.
    """
    engine = ledger.engine if write else ledger.reader
    begin = _SQLITE_BEGIN[write] if ledger.dialect == "sqlite" else None
    in_batch = batched and write and ledger.dialect == "postgresql"
    raw_sqlite = batched and write and begin is not None
    # Because SQLite's busy handler polls a held write lock with sleeps of 1, 2, 5, 10 ms
    # and more: the threads of one process (a threads pool running map items) queue on a
    # Python lock instead, woken the moment the writer before them commits, and only
    # another process's writer makes one poll.
    queue = ledger.writers if write and begin is not None else contextlib.nullcontext()
    delay = LOCK_BACKOFF_S
    tries = 0
    unknown = False  # a COMMIT was sent on a connection that then died
    reconnected = False  # the one retry on a fresh connection is spent (not a lock's)
    started = time.monotonic()
    while True:
        tries += 1
        committing = False
        pipeline.COMMIT_SENT.set(False)
        try:
            if raw_sqlite and grouped:
                assert begin is not None
                result = _run_grouped(ledger, begin, fn)
            elif raw_sqlite:
                assert begin is not None
                with queue:
                    result = _on_raw_sqlite(ledger, begin, fn)
            else:
                with queue, engine.connect() as conn:
                    # SQLAlchemy's transaction first, so commit() reaches the driver even
                    # when fn only used the driver connection (pipeline) or nothing at all.
                    conn.begin()
                    if begin is not None:
                        # Straight to the driver: cheaper than a statement through
                        # SQLAlchemy, whose transaction (begun above) issues the COMMIT.
                        conn.connection.driver_connection.execute(begin)  # type: ignore[union-attr]
                    if in_batch:
                        with _begin_in_batch(conn):
                            result = fn(conn)
                            committing = True
                            conn.commit()
                    else:
                        result = fn(conn)
                        committing = True
                        conn.commit()
        except Abort as abort:
            result = abort.value  # type: ignore[assignment]
        except GroupAborted:
            continue  # nothing was written: run it again
        except Exception as exc:
            if isinstance(exc, DBAPIError) and exc.connection_invalidated and not reconnected:
                reconnected = True
                unknown = committing or pipeline.COMMIT_SENT.get()
                if unknown:
                    _log.warning(
                        "Ledger %s: connection lost during COMMIT while %s%s; the outcome is "
                        "unknown, retrying",
                        ledger.label,
                        what,
                        f" for run {run_id!r}" if run_id is not None else "",
                    )
                continue
            if is_lost_statement(exc) and tries <= CONFLICT_RETRIES:
                continue  # the batch prepares its statements again; none of it landed
            conflict = is_conflict(exc)
            if not (conflict or is_locked(exc)):
                raise
            if tries > (CONFLICT_RETRIES if conflict else LOCK_RETRIES):
                raise _exhausted(ledger, what, run_id, tries, started, conflict) from exc
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(
                    "Ledger %s %s while %s%s; retry %d in %.0f ms",
                    ledger.label,
                    "conflict (serialization failure or deadlock)" if conflict else "locked",
                    what,
                    f" for run {run_id!r}" if run_id is not None else "",
                    tries,
                    delay * 1000,
                    extra={"ledger_retry": tries, "ledger_run_id": run_id},
                )
            time.sleep(delay * random.uniform(0.5, 1.5) if conflict else delay)
            delay *= 2
            continue
        if unknown and confirm is not None:
            return _confirmed(ledger, confirm, result, what, run_id)
        return result


def _on_raw_sqlite(ledger: LedgerEngine, begin: str, fn: Callable[[Connection], T]) -> T:
    """``fn`` in one SQLite transaction straight through the driver, on a connection the
    ledger lends outside its pool (``LedgerEngine.borrow``): SQLAlchemy's Connection and
    Transaction objects, and the pool's checkout, cost more than a step commit's
    statements, and a batched body needs none of them. Same transaction as the other
    path: ``begin`` (BEGIN IMMEDIATE) first, COMMIT if ``fn`` returns, ROLLBACK if it
    raises; driver errors come out as SQLAlchemy's, as everywhere in the ledger."""
    loan = ledger.borrow()
    raw = loan.driver_connection
    try:
        try:
            raw.execute(begin)
            result = fn(loan)  # type: ignore[arg-type]
            raw.commit()
            return result
        except BaseException:
            if raw.in_transaction:
                raw.rollback()
            raise
    except sqlite3.Error as exc:  # BEGIN, COMMIT or ROLLBACK (the batch wraps its own)
        raise DBAPIError.instance(begin, None, exc, sqlite3.Error) from exc
    finally:
        ledger.give_back(loan)


def _run_grouped(ledger: LedgerEngine, begin: str, fn: Callable[[Connection], T]) -> T:
    """``fn`` on SQLite, in one transaction with the grouped calls that queued meanwhile
    (``combine``), each in a savepoint of its own (``_run_units``), its leader holding
    the process's ``writers`` lock.

    Because on a threads-pool worker each map item's claim and commit was a transaction
    of its own, and the BEGIN, COMMIT and the hand-over of the write lock (the process's
    ``writers`` queue, then SQLite's file lock between processes) cost more than its
    statements."""
    run_units = lambda units: _run_units(ledger, begin, units)  # noqa: E731
    return ledger.grouped.run(Unit(fn), run_units, ledger.writers)  # type: ignore[no-any-return]


def _run_units(ledger: LedgerEngine, begin: str, units: list[Unit]) -> None:
    """Run ``units`` in one SQLite transaction (``_run_grouped``), each with its result
    or its error; what fails the whole transaction fails each unit (``combine``)."""
    if len(units) == 1:  # alone: the plain transaction, no savepoint
        (unit,) = units
        try:
            unit.result = _on_raw_sqlite(ledger, begin, unit.work)
        except BaseException as exc:
            unit.error = exc
    else:
        _run_together(ledger, begin, units)


def _run_together(ledger: LedgerEngine, begin: str, units: list[Unit]) -> None:
    """Several units, each in a savepoint of one transaction (``_run_units``), on the
    ledger's kept connection (``LedgerEngine.borrow``; the caller holds ``writers``).
    Raises only what ``borrow`` raised; every other failure is recorded on the units."""
    loan = ledger.borrow()
    try:
        raw = loan.driver_connection
        sql = begin
        culprit: Unit | None = None  # the unit whose BaseException aborted the group
        try:
            raw.execute(sql)
            for unit in units:
                sql = "SAVEPOINT pf_unit"
                raw.execute(sql)
                try:
                    unit.result = unit.work(loan)  # type: ignore[arg-type]
                except Exception as exc:  # Abort too: this call's writes only are undone
                    unit.error = exc
                    sql = "ROLLBACK TO pf_unit"
                    raw.execute(sql)
                except BaseException:
                    culprit = unit
                    raise
                sql = "RELEASE pf_unit"
                raw.execute(sql)
            sql = "COMMIT"
            raw.commit()
        except BaseException as exc:
            if raw.in_transaction:
                raw.rollback()
            if isinstance(exc, sqlite3.Error):
                exc = DBAPIError.instance(sql, None, exc, sqlite3.Error)
            fail(units, exc, culprit)
    finally:
        ledger.give_back(loan)


@contextmanager
def _begin_in_batch(conn: Connection) -> Iterator[None]:
    """The transaction's BEGIN goes out with the first ``pipeline`` batch.

    The driver connection runs in autocommit for the transaction, so psycopg sends no
    BEGIN of its own; ``pipeline`` puts ``BEGIN`` first in its batch, and from then the
    server is in a transaction, which ``commit()`` (or a rollback) ends as usual. On the
    way out the connection is put back as the pool lends it (no transaction, autocommit
    off); one that cannot be is invalidated, so no later call runs without a BEGIN.
    """
    raw = conn.connection.driver_connection
    raw.autocommit = True  # type: ignore[union-attr]
    token = pipeline.BEGIN_OWED.set(raw)
    try:
        yield
    finally:
        pipeline.BEGIN_OWED.reset(token)
        try:
            if raw.pgconn.transaction_status != _PG_IDLE:  # type: ignore[union-attr]
                raw.rollback()  # type: ignore[union-attr]  # the error path (an Abort...)
            raw.autocommit = False  # type: ignore[union-attr]
        except Exception:  # a dead connection: never lend it again
            conn.invalidate()


def _confirmed(
    ledger: LedgerEngine,
    confirm: Callable[[Connection, T], T],
    result: T,
    what: str,
    run_id: str | None,
) -> T:
    """``confirm``'s verdict on ``result``, read after the retry committed (or aborted)."""
    return run(ledger, lambda conn: confirm(conn, result), write=False, what=what, run_id=run_id)


def _exhausted(
    ledger: LedgerEngine,
    what: str,
    run_id: str | None,
    tries: int,
    started: float,
    conflict: bool,
) -> Exception:
    waited = time.monotonic() - started
    run_part = f" for run {run_id!r}" if run_id is not None else ""
    if conflict:
        return LedgerConflictError(
            f"Ledger database {ledger.label} kept aborting the transaction while {what}"
            f"{run_part} (serialization failure or deadlock, {tries} tries over "
            f"{waited:.1f}s); nothing was written. Another process keeps writing the same "
            "rows: look for a stuck or looping writer."
        )
    return LedgerLockedError(
        f"Ledger database {ledger.label} stayed locked by another writer while "
        f"{what}{run_part} ({tries} tries over {waited:.1f}s); nothing was "
        "written. Find the process holding the lock (a long transaction, an "
        "open sqlite3 shell) or raise busy_timeout."
    )
