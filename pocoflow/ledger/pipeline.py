"""A batch of statements that succeeds only if each guarded one changes exactly one row.

The step commit is such a batch (fence, checkpoint, values, events, run, outbox). On
SQLite the statements run one by one and stop at the first miss. On PostgreSQL a round
trip costs more than the statement, so the batch goes out in psycopg's pipeline mode
(one round trip for all of it) and the guards are checked when the results are back;
a miss then rolls the whole transaction back, so the outcome is the same.

The SQL is compiled from the same Core statements (once per statement and parameter set)
and executed on the driver's connection; driver errors are re-raised as SQLAlchemy's,
like every other ledger error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import Compiled
from sqlalchemy.sql.expression import Executable


@dataclass(frozen=True, slots=True)
class Op:
    """One statement of a batch; ``params`` is a list for an executemany."""

    stmt: Executable
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    must_hit_one: bool = False


def run(conn: Connection, ops: Sequence[Op], conflicts: tuple[str, ...] = ()) -> bool:
    """Run ``ops`` in the caller's transaction; False if a guard missed or a constraint in
    ``conflicts`` fired. After False the caller must roll back."""
    if conn.dialect.name == "postgresql":
        return _pipelined(conn, ops, conflicts)
    return _sqlite_direct(conn, ops)


def _sqlite_direct(conn: Connection, ops: Sequence[Op]) -> bool:
    """The batch through the sqlite3 cursor with SQL compiled once per statement: the
    Core execute path costs more than SQLite's own insert here (about 20 us a statement),
    and a step commit runs seven of them."""
    import sqlite3

    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    cur = raw.cursor()
    sql = ""
    try:
        for op, compiled, rows, many in _batches(conn, ops):
            sql = compiled.string
            order = getattr(compiled, "positiontup", None) or ()  # qmark order of SQLite
            if many:
                cur.executemany(sql, [_positional(compiled, order, r) for r in rows])
            else:
                cur.execute(sql, _positional(compiled, order, rows[0]))
                if op.must_hit_one and cur.rowcount != 1:
                    return False
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc
    return True


def _batches(
    conn: Connection, ops: Sequence[Op]
) -> Iterator[tuple[Op, Compiled, Sequence[Mapping[str, Any]], bool]]:
    """Each op with its compiled statement and rows; empty executemanys are skipped."""
    for op in ops:
        many = not isinstance(op.params, Mapping)
        rows: Sequence[Mapping[str, Any]] = op.params if many else [op.params]  # type: ignore[assignment, list-item]
        if rows:
            yield op, _compiled(op.stmt, conn.dialect, tuple(rows[0])), rows, many


def _positional(compiled: Compiled, order: Sequence[str], row: Mapping[str, Any]) -> list[Any]:
    params = _params(compiled, row)
    return [params[name] for name in order]


@lru_cache(maxsize=256)
def _compiled(stmt: Executable, dialect: Dialect, keys: tuple[str, ...]) -> Compiled:
    return stmt.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]


def _params(compiled: Compiled, row: Mapping[str, Any]) -> dict[str, Any]:
    """The row plus the statement's own bound values (e.g. ``status='committed'``)."""
    return dict(compiled.construct_params(row) or {})


def _pipelined(conn: Connection, ops: Sequence[Op], conflicts: tuple[str, ...]) -> bool:
    import psycopg

    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    results: list[tuple[psycopg.Cursor[Any], bool]] = []
    sql = ""
    try:
        with raw.pipeline():
            for op, compiled, rows, many in _batches(conn, ops):
                sql = compiled.string
                cur = raw.cursor()
                if many:
                    cur.executemany(sql, [_params(compiled, r) for r in rows])
                else:
                    cur.execute(sql, _params(compiled, rows[0]))
                results.append((cur, op.must_hit_one))
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name in conflicts:
            return False
        raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    except psycopg.Error as exc:
        raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    return all(cur.rowcount == 1 for cur, guarded in results if guarded)
