"""Queries on ``pf_events``: the append-only lifecycle log of a run (0.2 columns + attempt)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.engine import Connection

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


def insert_op(rows: list[dict[str, Any]]) -> Op:
    """One executemany for all the rows (skipped when empty)."""
    return Op(_INSERT, rows)


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
