"""Queries on ``pf_events``: the append-only lifecycle log of a run (0.2 columns + attempt)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Insert

from pocoflow.ledger.common import iso_ts
from pocoflow.ledger.pipeline import Op
from pocoflow.ledger.tables import pf_events

FIELDS = ("step", "node_name", "action", "elapsed_ms", "error_msg", "attempt")
"""Optional event fields besides ``event`` and ``ts`` (0.2's plus ``attempt``)."""

_INSERT = insert(pf_events)
_GET = (
    select(pf_events)
    .where(pf_events.c.run_id == bindparam("run_id"), pf_events.c.id > bindparam("after_id"))
    .order_by(pf_events.c.id)
)

_SAME = select(pf_events.c.id).where(
    *(pf_events.c[name].is_not_distinct_from(bindparam(name)) for name in FIELDS),
    pf_events.c.run_id == bindparam("run_id"),
    pf_events.c.event == bindparam("event"),
    pf_events.c.ts == bindparam("ts"),
)


def row(run_id: str, event: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """One insert row; every key present so a batch goes out as one executemany.

    Unknown keyword fields are ignored, as 0.2 did.
    """
    out = {name: fields.get(name) for name in FIELDS}
    out["run_id"] = run_id
    out["event"] = event
    out["ts"] = iso_ts(fields.get("ts"))
    return out


def rows_of(run_id: str, events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for events given as dicts with an ``event`` key (how a StepCommit carries them)."""
    return [row(run_id, e["event"], e) for e in events]


def insert_op(rows: list[dict[str, Any]], dialect: str | None = None) -> Op:
    """All the rows in one statement: on PostgreSQL a multi-row INSERT for up to
    ``_MULTI_ROWS`` rows (a step's node_start and node_end are one statement, not two, in
    its commit's pipeline), else one executemany (skipped when empty), which costs less
    CPU than building the multi-row parameters on SQLite, where a statement is cheap."""
    if dialect != "postgresql" or not 1 < len(rows) <= _MULTI_ROWS:
        return Op(_INSERT, rows)
    params = {f"{key}_{i}": value for i, r in enumerate(rows) for key, value in r.items()}
    return Op(_insert_multi(len(rows)), params)


_MULTI_ROWS = 8
_COLUMNS = ("run_id", "event", "ts", *FIELDS)


@cache
def _insert_multi(n: int) -> Insert:
    """``INSERT ... VALUES (...), (...)`` for ``n`` rows, bound as ``<column>_<row>``."""
    c = pf_events.c
    return insert(pf_events).values(
        [{col: bindparam(f"{col}_{i}", type_=c[col].type) for col in _COLUMNS} for i in range(n)]
    )


def insert_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(_INSERT, rows)


def exists(conn: Connection, row: Mapping[str, Any]) -> bool:
    """An event equal to ``row`` (same run, event, time stamp and fields) is recorded:
    how an append retried after a COMMIT whose outcome was lost finds its first try."""
    return conn.execute(_SAME, dict(row)).first() is not None


def get(conn: Connection, run_id: str, after_id: int = 0) -> list[dict[str, Any]]:
    params = {"run_id": run_id, "after_id": after_id}
    return [dict(r) for r in conn.execute(_GET, params).mappings()]
