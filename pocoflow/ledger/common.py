"""Small pieces every query module shares: timestamps, the database clock (`NOW`) and the
one dialect-specific insert."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Float,
    Integer,
    Table,
    bindparam,
    cast,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.functions import FunctionElement
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


class DbEpoch(FunctionElement[float]):
    """The database server's clock in epoch seconds."""

    type = Float()
    inherit_cache = True


@compiles(DbEpoch, "postgresql")
def _pg_epoch(element: Any, compiler: Any, **kw: Any) -> str:
    # now() is the transaction's start: one instant for every statement of a claim or commit.
    return "CAST(EXTRACT(EPOCH FROM now()) AS DOUBLE PRECISION)"


@compiles(DbEpoch, "sqlite")
def _sqlite_epoch(element: Any, compiler: Any, **kw: Any) -> str:
    # Julian days to Unix seconds; 'now' is one instant per statement, to the millisecond.
    return "((julianday('now') - 2440587.5) * 86400.0)"


NOW: ColumnElement[float] = func.coalesce(bindparam("now", type_=Float), DbEpoch())
"""The step protocol's clock in SQL: the bound ``now`` when a test injects one, otherwise
the database's own clock. Leases are written and compared by one clock whichever host
runs the worker or the sweeper (a host whose clock is ahead takes over no live step),
and reading it costs no round trip: it is part of the statement that needs it (G3)."""

DB_CLOCK = select(DbEpoch())
"""The database's clock read on its own: for the few callers that must do arithmetic on
it outside SQL (a sweep's countdowns, a resume's write token), once per call, off the
step's path."""


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


#: Keys per unmark statement of a heartbeat: a statement takes at most 65,535 parameters
#: (PostgreSQL) or 32,766 (SQLite's default), and a process may release tens of thousands
#: at once (countdown retries of a big map); one failing beat would fail every later one.
UNMARK_CHUNK = 1000


def unmark_received(
    conn: Any, table: Table, key_columns: Sequence[str], worker: str, keys: Sequence[Any]
) -> None:
    """Clear ``worker``'s received mark on the queued rows of ``table`` whose
    ``key_columns`` are among ``keys`` (its heartbeat's released messages): a statement
    per ``UNMARK_CHUNK`` keys."""
    key = tuple_(*(table.c[name] for name in key_columns))
    for start in range(0, len(keys), UNMARK_CHUNK):
        stmt = (
            update(table)
            .where(
                key.in_(list(keys[start : start + UNMARK_CHUNK])),
                table.c.status == "queued",
                table.c.received_by == worker,
            )
            .values(received_by=None)
        )
        conn.execute(stmt)
