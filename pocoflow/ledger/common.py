"""Small pieces every query module shares: timestamps and the one dialect-specific insert."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import JSON, ColumnElement, Integer, Table, cast, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.selectable import TableValuedAlias


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


def json_object_items(
    dialect: str, document: ColumnElement[Any]
) -> tuple[TableValuedAlias, ColumnElement[str], ColumnElement[int], ColumnElement[int]]:
    """The members of a JSON object column as rows: ``(from, key, int value, order)``.

    Lets one query join a checkpoint's manifest with ``pf_values`` inside the database,
    each key an index seek. SQLite's ``json_each`` and PostgreSQL's ``json_each_text``
    differ only in name, value type and how document order is exposed.
    """
    if dialect == "postgresql":
        items = (
            func.json_each_text(cast(document, JSON))
            .table_valued("key", "value", with_ordinality="ord", name="m")
            .render_derived()
        )
        return items, items.c.key, cast(items.c.value, Integer), items.c.ord
    items = func.json_each(document).table_valued("key", "value", "id", name="m")
    return items, items.c.key, items.c.value, items.c.id
