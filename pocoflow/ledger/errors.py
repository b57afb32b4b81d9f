"""Ledger errors, and the few questions we ask of a driver error (locked? which constraint?).

Each answer looks at the DBAPI error SQLAlchemy wraps, so the rest of the ledger never
imports ``sqlite3`` or ``psycopg`` to tell errors apart.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_PG_UNIQUE_VIOLATION = "23505"
_PG_FK_VIOLATION = "23503"
# serialization_failure, deadlock_detected: PostgreSQL rolled the transaction back to let
# a concurrent one through; the same transaction run again normally succeeds.
_PG_CONFLICTS = ("40001", "40P01")
_PG_INVALID_STATEMENT_NAME = "26000"


# SQLSTATEs of a PostgreSQL that cannot serve the ledger now, whatever the statement:
# classes 08 (connection), 40 (transaction rolled back: serialization, deadlock), 53
# (insufficient resources), 57 (operator intervention: shutdown, query cancelled), and
# a read-only server (25006: a replica, a failover in progress), a session ended for
# idling in a transaction (25P03), a lock not available (55P03).
_PG_TRANSIENT_CLASSES = ("08", "40", "53", "57")
_PG_TRANSIENT_STATES = ("25006", "25P03", "55P03")


class LedgerError(RuntimeError):
    """A ledger operation could not be done; the message names the database and run."""


class LedgerOpenError(LedgerError, ValueError):
    """The database cannot be opened (not a database, server unreachable, bad URL).

    Also a ``ValueError`` because, like a bad path, it is a configuration problem: the CLI
    reports it as bad input.
    """


class LedgerLockedError(LedgerError):
    """SQLite stayed locked by another writer through every retry; nothing was written."""


class LedgerConflictError(LedgerError):
    """PostgreSQL kept aborting the transaction to resolve a conflict with concurrent ones
    (serialization failure, deadlock) through every retry; nothing was written."""


class SchemaVersionError(LedgerError):
    """The database was migrated by a newer pocoflow than this one."""


def is_locked(exc: BaseException) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED (incl. extended codes): another connection holds a lock."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "database is locked" in str(orig) or "database table is locked" in str(orig)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error (wrapped by SQLAlchemy or not); None for other
    errors, and for a driver error the server never answered (a refused connection)."""
    state = getattr(getattr(exc, "orig", exc), "sqlstate", None)
    return state if isinstance(state, str) else None


def is_transient_state(state: str) -> bool:
    """A PostgreSQL error that says the server cannot serve us now (``_PG_TRANSIENT_*``),
    not that the statement or its data is wrong: by SQLSTATE, since psycopg files several
    of these under ``InternalError`` and some deterministic ones (54000, a value too big
    for its index) under ``OperationalError``."""
    return state[:2] in _PG_TRANSIENT_CLASSES or state in _PG_TRANSIENT_STATES


def is_conflict(exc: BaseException) -> bool:
    """A PostgreSQL serialization failure or deadlock: retry the whole transaction."""
    return getattr(getattr(exc, "orig", exc), "sqlstate", None) in _PG_CONFLICTS


def is_lost_statement(exc: BaseException) -> bool:
    """A prepared statement of a batch (``pgbatch``) the session no longer has: psycopg
    sends DEALLOCATE ALL after a rollback on a connection where it prepared statements
    of its own. Nothing after the missing statement ran: retry the whole transaction,
    which prepares its statements again."""
    return sqlstate(exc) == _PG_INVALID_STATEMENT_NAME


def is_fk_violation(exc: DBAPIError) -> bool:
    """A row named a run id that ``pf_runs`` does not have."""
    orig = exc.orig
    return getattr(
        orig, "sqlstate", None
    ) == _PG_FK_VIOLATION or "FOREIGN KEY constraint failed" in str(orig)


def is_unique_violation(exc: DBAPIError) -> bool:
    orig = exc.orig
    return (
        getattr(orig, "sqlstate", None) == _PG_UNIQUE_VIOLATION
        or "UNIQUE constraint failed" in str(orig)
        or "PRIMARY KEY constraint failed" in str(orig)
    )
