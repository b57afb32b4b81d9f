"""Bring a database to the head schema: fresh, pocoflow 0.2.1, or an older 0.3 revision.

Checked once per engine: one cheap query reads the version, and only a database that is
not at ``HEAD`` loads alembic. A 0.2.1 database (its tables, no version table) is stamped
``0001`` (= the 0.2.1 schema) and upgraded in place, rows kept.

Two processes opening a fresh database at once both get a working schema: on PostgreSQL
the migration runs under a transaction-scoped advisory lock and rechecks the version
inside it; on SQLite it runs in one ``BEGIN IMMEDIATE`` transaction (SQLite DDL is
transactional), so the second process waits for the write lock, rechecks and finds head.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from pocoflow.ledger.engine import LedgerEngine
from pocoflow.ledger.errors import SchemaVersionError, is_locked
from pocoflow.ledger.tables import V02_TABLES

HEAD = "0016"
"""The newest revision in ``migrations/versions`` (a test pins the two together)."""
REVISIONS = (
    "0001",
    "0002",
    "0003",
    "0004",
    "0005",
    "0007",
    "0008",
    "0009",
    "0010",
    "0011",
    "0012",
    "0013",
    "0014",
    "0015",
    "0016",
)
VERSION_TABLE = "pf_alembic_version"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# "pocoflow" as a signed 64-bit int: one advisory lock per database for our migrations.
_PG_LOCK_KEY = int.from_bytes(b"pocoflow", "big", signed=True)
#: How long a process waits for another one migrating the same SQLite file (each try
#: also waits the busy timeout): the whole chain of migrations on a loaded machine.
_RACE_WAIT_S = 120.0

_log = logging.getLogger("pocoflow.ledger.migrate")


def schema_version(conn: Connection) -> tuple[str | None, bool]:
    """(revision recorded in ``pf_alembic_version`` or None, whether 0.2 tables exist)."""
    dialect = conn.dialect
    if dialect.has_table(conn, VERSION_TABLE):
        version = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        return version, True
    return None, all(dialect.has_table(conn, name) for name in V02_TABLES)


def ensure_schema(ledger: LedgerEngine) -> None:
    """Make the database behind ``ledger`` current; a no-op after the first call."""
    if ledger.schema_ready:
        return
    with ledger.lock:
        if ledger.schema_ready:
            return
        deadline = time.monotonic() + _RACE_WAIT_S
        attempt = 0
        while True:
            try:
                _ensure(ledger)
                break
            except OperationalError as exc:
                # Another process creating or migrating the same SQLite file: wait, recheck.
                racing = is_locked(exc) or "already exists" in str(exc.orig)
                if not racing or time.monotonic() > deadline:
                    raise
                attempt += 1
                time.sleep(min(0.05 * attempt, 1.0))
        ledger.schema_ready = True


def _ensure(ledger: LedgerEngine) -> None:
    with ledger.reader.connect() as conn:
        version, _ = schema_version(conn)
    _check_known(version, ledger)
    if version != HEAD:
        _migrate(ledger)


def _check_known(version: str | None, ledger: LedgerEngine) -> None:
    if version is not None and version not in REVISIONS:
        raise SchemaVersionError(
            f"Ledger database {ledger.label} has schema revision {version!r}, newer than "
            f"this pocoflow knows (head {HEAD}); upgrade pocoflow to use it"
        )


def _migrate(ledger: LedgerEngine) -> None:
    if ledger.dialect == "postgresql":
        with ledger.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            _upgrade(conn, ledger)
        return
    with ledger.engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        # Because batch mode rebuilds pf_runs (DROP + RENAME) while other tables point at
        # it; the pragma only takes effect outside a transaction, so it is set here.
        raw.execute("PRAGMA foreign_keys = OFF")
        try:
            # One write transaction for the whole migration (SQLite DDL is transactional).
            raw.execute("BEGIN IMMEDIATE")
            _upgrade(conn, ledger)
            conn.commit()
        except BaseException:
            conn.rollback()
            if raw.in_transaction:
                raw.rollback()
            raise
        finally:
            raw.execute("PRAGMA foreign_keys = ON")


def _upgrade(conn: Connection, ledger: LedgerEngine) -> None:
    """Inside the migration lock: recheck, then stamp a 0.2.1 database and upgrade."""
    version, has_v02 = schema_version(conn)
    _check_known(version, ledger)
    if version == HEAD:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.attributes["connection"] = conn
    if version is None and has_v02:
        _log.info("Ledger %s is a pocoflow 0.2.1 database: upgrading in place", ledger.label)
        command.stamp(cfg, "0001")
    command.upgrade(cfg, HEAD)
    _log.info("Ledger %s migrated to schema %s", ledger.label, HEAD)
