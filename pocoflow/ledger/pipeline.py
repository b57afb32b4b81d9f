"""A batch of statements that succeeds only if each guarded one changes exactly one row.

The step commit is such a batch (fence, checkpoint, values, events, run, outbox). On
SQLite the statements run one by one and stop at the first miss. On PostgreSQL a round
trip costs more than the statement, so the batch goes out whole in libpq's pipeline mode
(``pgbatch``: one write, one round trip, each statement prepared once per connection)
and the guards are checked when the results are back; a miss then rolls the whole
transaction back, so the outcome is the same.

The SQL is compiled from the same Core statements (once per statement and parameter set)
and executed on the driver's connection; driver errors are re-raised as SQLAlchemy's,
like every other ledger error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from functools import lru_cache
from operator import itemgetter
from typing import Any, NamedTuple

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import Compiled
from sqlalchemy.sql.expression import Executable

#: The driver connection whose transaction's BEGIN the next batch must send (set by
#: ``txn.run(..., batched=True)`` on PostgreSQL, which put it in autocommit for that).
BEGIN_OWED: ContextVar[Any] = ContextVar("pocoflow_begin_owed", default=None)
#: Set once a batch went out with its transaction's COMMIT (``run_reading(commit=True)``):
#: a connection lost from then on leaves the outcome unknown (``txn.run``).
COMMIT_SENT: ContextVar[bool] = ContextVar("pocoflow_commit_sent", default=False)


class Op(NamedTuple):
    """One statement of a batch; ``params`` is a list for an executemany. (A named
    tuple: a step commit builds several per step, and a frozen dataclass costs about
    three times as much to build.)"""

    stmt: Executable
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    must_hit_one: bool = False
    #: A write with RETURNING whose rows ``run_reading`` returns, as a SELECT's.
    returns_rows: bool = False
    #: With ``must_hit_one``, on PostgreSQL: a miss aborts the transaction on the server
    #: (the write runs in a CTE that raises ``GUARD_MISSED`` unless it changed one row),
    #: so a batch that carries its COMMIT (``run_reading(commit=True)``) commits nothing
    #: when the guard missed. Not for an executemany, nor with ``returns_rows``.
    aborts_on_miss: bool = False


def aborting(ops: Sequence[Op]) -> list[Op]:
    """``ops`` with every guard made to abort the transaction when it misses: what a batch
    that carries its COMMIT (``run_reading(commit=True)``) needs, so that nothing of it
    lands when one guard missed."""
    return [op._replace(aborts_on_miss=True) if op.must_hit_one else op for op in ops]


#: The error text of a guard that aborted its transaction (``Op.aborts_on_miss``).
GUARD_MISSED = "pocoflow guard missed: rows changed "


def run(conn: Connection, ops: Sequence[Op], conflicts: tuple[str, ...] = ()) -> bool:
    """Run ``ops`` in the caller's transaction; False if a guard missed or a constraint in
    ``conflicts`` fired. After False the caller must roll back."""
    if conn.dialect.name == "postgresql":
        return _pipelined(conn, ops, conflicts, None)
    return _sqlite_direct(conn, ops, None)


def run_reading(
    conn: Connection,
    ops: Sequence[Op],
    conflicts: tuple[str, ...] = (),
    *,
    commit: bool = False,
    autocommit: bool = False,
) -> tuple[bool, list[list[tuple[Any, ...]]]]:
    """``run``, also returning, for each op in order, the rows (tuples, in column order)
    of a SELECT or of an op marked ``returns_rows`` (a write with RETURNING); ``[]`` for
    the other statements, for an executemany (whose rows are never read), for an empty
    one and for those a missed guard left unrun on SQLite.

    ``commit``: on PostgreSQL, a batch that opened its transaction (``BEGIN_OWED``) also
    sends its COMMIT, in the same round trip: the transaction's row locks are then held
    for no client round trip at all. Only for a batch whose writes may commit whatever its
    guards say (e.g. each write is its own guard: a miss wrote nothing), or whose guards
    abort on a miss (``Op.aborts_on_miss``); the caller's own COMMIT then finds no
    transaction and costs nothing. ``autocommit``: on PostgreSQL,
    no BEGIN nor COMMIT at all, each statement its own transaction: for a batch whose
    statements need not be atomic together."""
    rows: list[list[tuple[Any, ...]]] = [[] for _ in ops]
    if conn.dialect.name == "postgresql":
        ok = _pipelined(conn, ops, conflicts, rows, commit=commit, autocommit=autocommit)
    else:
        ok = _sqlite_direct(conn, ops, rows)
    return ok, rows


def _rows_of(cur: Any) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in cur.fetchall()]


def _sqlite_direct(
    conn: Connection, ops: Sequence[Op], out: list[list[tuple[Any, ...]]] | None
) -> bool:
    """The batch through the sqlite3 cursor with SQL compiled once per statement: the
    Core execute path costs more than SQLite's own insert here (about 20 us a statement),
    and a step commit runs seven of them."""
    import sqlite3

    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    cur = raw.cursor()
    sql = ""
    try:
        for index, op, plan, rows, many in _batches(conn, ops):
            sql = plan.sql
            if many:
                cur.executemany(sql, [plan.positional(r) for r in rows])
                continue
            cur.execute(sql, plan.positional(rows[0]))
            # A RETURNING statement's row count is known once its rows are read.
            found = _rows_of(cur) if plan.select or op.returns_rows else None
            if op.must_hit_one and cur.rowcount != 1:
                return False
            if out is not None and found is not None:
                out[index] = found
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc
    return True


class _Plan:
    """A statement compiled for one dialect and one set of parameter names, with how to
    build the driver's parameters from a row without SQLAlchemy's ``construct_params``
    (which costs more than the statement on SQLite): each bound name either takes a row
    key or is the statement's own constant (e.g. ``status='committed'``)."""

    __slots__ = ("_dollar", "named", "positional", "positions", "select", "sql")

    def __init__(self, compiled: Compiled, keys: tuple[str, ...], select: bool) -> None:
        self.sql: str = compiled.string
        #: A SELECT: its rows are read (a write's RETURNING only when its op asks).
        self.select = select
        # Every bound name -> (row key, None) or (None, constant), found by binding a
        # marker per row key: what construct_params itself would pick.
        markers = {key: _Marker(key) for key in keys}
        bound = compiled.construct_params(markers) or {}
        source = {
            name: (v.key, None) if isinstance(v, _Marker) else (None, v)
            for name, v in bound.items()
        }
        self.named = tuple((name, *source[name]) for name in bound)
        order = getattr(compiled, "positiontup", None) or ()  # qmark order of SQLite
        self.positions = tuple(source[name] for name in order)
        #: The driver's positional parameters (SQLite) from a row.
        self.positional = _values_in(self.positions)

    def dollar(self) -> tuple[bytes, Callable[[Mapping[str, Any]], Sequence[Any]]]:
        """PostgreSQL: the SQL with ``$n`` placeholders (``pgbatch``), and the values of a
        row in that order, from psycopg's ``%(name)s`` form (once per plan)."""
        found = getattr(self, "_dollar", None)
        if found is None:
            source = {name: (key, const) for name, key, const in self.named}
            order: list[str] = []

            def number(match: re.Match[str]) -> str:
                name = match.group(1)
                if name is None:  # ``%%``
                    return "%"
                if name not in order:
                    order.append(name)
                return f"${order.index(name) + 1}"

            sql = _PYFORMAT.sub(number, self.sql).encode()
            found = self._dollar = (sql, _values_in(tuple(source[name] for name in order)))
        return found


def _values_in(
    positions: tuple[tuple[str | None, Any], ...],
) -> Callable[[Mapping[str, Any]], Sequence[Any]]:
    """A row's values in ``positions`` order, each a row key or the statement's constant."""
    if len(positions) > 1 and all(key is not None for key, _ in positions):
        # Every parameter from the row (the common case): one C call per row.
        return itemgetter(*(key for key, _ in positions))
    return lambda row: [row[key] if key is not None else const for key, const in positions]


_PYFORMAT = re.compile(r"%\((\w+)\)s|%%")


class _Marker:
    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


def _batches(
    conn: Connection, ops: Sequence[Op]
) -> Iterator[tuple[int, Op, _Plan, Sequence[Mapping[str, Any]], bool]]:
    """Each op with its index, compiled plan and rows; empty executemanys are skipped."""
    dialect = conn.dialect
    for index, op in enumerate(ops):
        params = op.params
        # A dict first: the Mapping ABC check costs more than the rest of this loop.
        many = type(params) is list or (
            type(params) is not dict and not isinstance(params, Mapping)
        )
        rows: Sequence[Mapping[str, Any]] = params if many else [params]  # type: ignore[assignment, list-item]
        if rows:
            guarded = op.aborts_on_miss and dialect.name == "postgresql"
            if guarded and (many or op.returns_rows):
                raise ValueError(f"aborts_on_miss on an executemany or returns_rows op: {op}")
            yield index, op, _plan(op.stmt, dialect, tuple(rows[0]), guarded), rows, many


@lru_cache(maxsize=256)
def _plan(
    stmt: Executable, dialect: Dialect, keys: tuple[str, ...], guarded: bool = False
) -> _Plan:
    compiled = stmt.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
    plan = _Plan(compiled, keys, bool(getattr(stmt, "is_select", False)))
    if guarded:
        # The write (an INSERT or UPDATE) in a CTE, and an error of its own, which aborts
        # the transaction, unless it changed exactly one row. (An INSERT returns its key
        # already: SQLAlchemy's implicit RETURNING on PostgreSQL.)
        write = plan.sql if " RETURNING " in plan.sql else f"{plan.sql} RETURNING 1"
        plan.sql = (
            f"WITH guarded AS ({write}) SELECT CASE WHEN count(*) = 1 THEN 1 "
            f"ELSE ('{GUARD_MISSED}' || count(*))::int END FROM guarded"
        )
        plan.select = True
    return plan


_PG_IDLE = 0  # libpq's PQTRANS_IDLE


def _pipelined(
    conn: Connection,
    ops: Sequence[Op],
    conflicts: tuple[str, ...],
    out: list[list[tuple[Any, ...]]] | None,
    *,
    commit: bool = False,
    autocommit: bool = False,
) -> bool:
    import psycopg

    from pocoflow.ledger import pgbatch  # psycopg: only with PostgreSQL installed

    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    begin = BEGIN_OWED.get() is raw and raw.pgconn.transaction_status == _PG_IDLE
    if begin and autocommit:  # the driver connection is in autocommit (``BEGIN_OWED``)
        begin = False
        COMMIT_SENT.set(True)  # each statement commits as it runs
    idle = raw.pgconn.transaction_status == _PG_IDLE
    # psycopg's own rule too: a connection not in autocommit opens its transaction with
    # the first statement (the caller's COMMIT, or rollback, then ends it).
    opens = begin or (idle and not raw.autocommit)
    commands: list[pgbatch.Command] = [pgbatch.Command(b"BEGIN")] if opens else []
    # Per command: (op index, guarded, rows read) or None for BEGIN and COMMIT.
    slots: list[tuple[int, bool, bool] | None] = [None] * len(commands)
    sql = ""
    for index, op, plan, rows, many in _batches(conn, ops):
        sql = plan.sql
        dollar, values_of = plan.dollar()
        # Rows only of a single statement that asked for them (an INSERT's implicit
        # RETURNING of its key, SQLAlchemy's on PostgreSQL, is not asked).
        reads = not many and (plan.select or op.returns_rows)
        slot = (index, op.must_hit_one and not many, reads)
        for row in rows:
            commands.append(pgbatch.Command(dollar, values_of(row), reads))
            slots.append(slot)
    if commit and begin:  # the batch opened the transaction: it closes it
        commands.append(pgbatch.Command(b"COMMIT"))
        slots.append(None)
        COMMIT_SENT.set(True)
    try:
        outcomes = pgbatch.run(raw, commands)
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name in conflicts:
            return False
        raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    except psycopg.errors.InvalidTextRepresentation as exc:
        if GUARD_MISSED in (exc.diag.message_primary or ""):  # a guard missed (``_plan``)
            return False
        raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    except psycopg.Error as exc:
        # A connection the server dropped: ``txn.run`` retries once on a fresh one (and,
        # with the COMMIT sent, asks the call's ``confirm`` whether it landed).
        raise _driver_error(conn, raw, sql, exc) from exc
    hit = True
    for answered, outcome in zip(slots, outcomes, strict=True):
        if answered is None:
            continue
        index, guarded, reads = answered
        if guarded and outcome.rowcount != 1:
            hit = False
        if reads and out is not None and outcome.rows is not None:
            out[index] = outcome.rows
    return hit


def _driver_error(conn: Connection, raw: Any, sql: str, exc: Any) -> Exception:
    """SQLAlchemy's error for a driver error of a batch. A connection the server dropped
    (``pg_terminate_backend``, a restart, while it idled in the pool) is invalidated and
    the error flagged ``connection_invalidated``, as SQLAlchemy flags one on its own
    execute path, so ``txn.run`` retries once on a fresh connection: at once when the
    batch carried no COMMIT, after asking the call's ``confirm`` when it did."""
    import psycopg
    from psycopg import pq

    lost = (
        bool(conn.dialect.is_disconnect(exc, raw, None))
        or bool(getattr(raw, "broken", False))
        or raw.closed
        or raw.pgconn.status == pq.ConnStatus.BAD
    )
    if lost:
        conn.invalidate()
    return DBAPIError.instance(sql, None, exc, psycopg.Error, connection_invalidated=lost)
