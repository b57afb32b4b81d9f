"""One transaction with retries: how every ledger call touches the database.

SQLite serialises writers with a file lock. ``busy_timeout`` already makes a writer wait
inside SQLite; when even that runs out we retry a few times with a short backoff and then
raise ``LedgerLockedError`` naming the database and run. A failed try has rolled back, so
retrying never writes half a step. A connection dropped by the server (PostgreSQL restart)
is retried once on a fresh connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from pocoflow.ledger.engine import LedgerEngine
from pocoflow.ledger.errors import LedgerLockedError, is_locked

T = TypeVar("T")

#: One DEBUG record per lock retry (``extra``: ``ledger_retry``, the retry number from 1,
#: and ``ledger_run_id``), emitted before the backoff sleep: the contention is visible in
#: logs, and tests can see that a writer really retried.
_log = logging.getLogger("pocoflow.ledger.txn")

LOCK_RETRIES = 4
"""Tries after the first when SQLite reports the database locked."""
LOCK_BACKOFF_S = 0.02
"""First pause between those tries; doubled each time."""


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
) -> T:
    """Run ``fn(conn)`` in one transaction, committed if it returns, rolled back if it raises.

    ``write`` asks SQLite for the write lock at BEGIN (so waiting for it is orderly). On
    SQLite the pool's connections run with the driver's transaction handling off
    (``engine``), so the BEGIN here is what makes the calls inside one transaction.
    Reads on PostgreSQL run in autocommit (``LedgerEngine.reader``). ``what`` and
    ``run_id`` only name the operation in a lock error.

    A connection the server dropped is retried once; if it dropped during COMMIT the
    commit may have landed, and the retry then sees its own row (``commit_step`` returns
    False, the outbox row of the successor is already there for the sweeper).
    """
    engine = ledger.engine if write else ledger.reader
    begin = _SQLITE_BEGIN[write] if ledger.dialect == "sqlite" else None
    delay = LOCK_BACKOFF_S
    tries = 0
    started = time.monotonic()
    while True:
        tries += 1
        try:
            with engine.connect() as conn:
                # SQLAlchemy's transaction first, so commit() reaches the driver even when
                # fn only used the driver connection (pipeline) or nothing at all.
                conn.begin()
                if begin is not None:
                    # Straight to the driver: cheaper than a statement through SQLAlchemy,
                    # whose transaction (begun above) then issues this one's COMMIT.
                    conn.connection.driver_connection.execute(begin)  # type: ignore[union-attr]
                result = fn(conn)
                conn.commit()
                return result
        except Abort as abort:
            return abort.value  # type: ignore[return-value]
        except Exception as exc:
            if isinstance(exc, DBAPIError) and exc.connection_invalidated and tries == 1:
                continue
            if not is_locked(exc):
                raise
            if tries > LOCK_RETRIES:
                waited = time.monotonic() - started
                run_part = f" for run {run_id!r}" if run_id is not None else ""
                raise LedgerLockedError(
                    f"Ledger database {ledger.label} stayed locked by another writer while "
                    f"{what}{run_part} ({tries} tries over {waited:.1f}s); nothing was "
                    "written. Find the process holding the lock (a long transaction, an "
                    "open sqlite3 shell) or raise busy_timeout."
                ) from exc
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(
                    "Ledger %s locked while %s%s; retry %d of %d in %.0f ms",
                    ledger.label,
                    what,
                    f" for run {run_id!r}" if run_id is not None else "",
                    tries,
                    LOCK_RETRIES,
                    delay * 1000,
                    extra={"ledger_retry": tries, "ledger_run_id": run_id},
                )
            time.sleep(delay)
            delay *= 2
