"""Small pieces every query module shares: timestamps and the one dialect-specific insert."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert


def iso_now() -> str:
    """UTC ISO-8601 text, the format of the 0.2 time columns."""
    return datetime.now(UTC).isoformat()


def iso_ts(value: Any) -> str:
    """An event timestamp as 0.2 stores it: ISO text (a datetime or epoch float is converted)."""
    if value is None:
        return iso_now()
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).isoformat()
    raise TypeError(f"Event timestamp must be ISO text, datetime or epoch seconds, got {value!r}")


def epoch(now: float | None) -> float:
    """The injectable clock of the step-protocol functions (``now=None`` = wall clock)."""
    return time.time() if now is None else now


@cache
def insert_ignore(dialect: str, table: Table, *conflict_cols: str) -> Insert:
    """``INSERT ... ON CONFLICT (cols) DO NOTHING``: the row count (1 or 0) tells who won.

    SQLite and PostgreSQL spell it the same; SQLAlchemy only wants the dialect's own
    construct. No savepoint, no exception, no extra SELECT: a conflict inserts 0 rows.
    On PostgreSQL an explicit RETURNING keeps the driver's row count (SQLAlchemy's
    implicit RETURNING of a serial key would consume the cursor and report -1).
    """
    cols = list(conflict_cols)
    if dialect == "postgresql":
        return (
            postgresql.insert(table)
            .on_conflict_do_nothing(index_elements=cols)
            .returning(table.c[cols[0]])
        )
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=cols)
