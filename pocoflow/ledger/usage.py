"""Queries on ``pf_usage``: one row per ``report_usage`` call, and the totals read from it.

Totals are grouped in SQL (by node for ``show``, by run for ``runs``), so a run with
thousands of calls costs one small result, and listing runs costs one query, not one per
run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.engine import Connection

from pocoflow.ledger.common import iso_now
from pocoflow.ledger.tables import pf_usage

_u = pf_usage.c
COLUMNS = (
    "run_id",
    "step",
    "attempt",
    "node_name",
    "item",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
)
_INSERT = insert(pf_usage)
_SAME = select(_u.id).where(
    _u.run_id == bindparam("run_id"),
    _u.ts == bindparam("ts"),
    _u.node_name == bindparam("node_name"),
    _u.attempt == bindparam("attempt"),
)
_SUMS = (
    func.count().label("calls"),
    func.coalesce(func.sum(_u.input_tokens), 0).label("input_tokens"),
    func.coalesce(func.sum(_u.output_tokens), 0).label("output_tokens"),
    func.coalesce(func.sum(_u.cost_usd), 0.0).label("cost_usd"),
)
_TOTALS = select(
    func.coalesce(func.sum(_u.input_tokens + _u.output_tokens), 0),
    func.coalesce(func.sum(_u.cost_usd), 0.0),
).where(_u.run_id == bindparam("run_id"))
_BY_NODE = (
    select(_u.node_name, *_SUMS)
    .where(_u.run_id == bindparam("run_id"))
    .group_by(_u.node_name)
    .order_by(_u.node_name)
)
_IDS: Any = bindparam("ids", expanding=True)
_BY_RUN = select(_u.run_id, *_SUMS).where(_u.run_id.in_(_IDS)).group_by(_u.run_id)


def row(report: Any) -> dict[str, Any]:
    """The insert row of a ``pocoflow.usage.UsageReport``; its ``ts`` is also the write
    token a retried insert looks for (see ``exists``)."""
    out = {name: getattr(report, name) for name in COLUMNS}
    out["ts"] = iso_now()
    return out


def insert_row(conn: Connection, values: dict[str, Any]) -> None:
    conn.execute(_INSERT, values)


def exists(conn: Connection, values: dict[str, Any]) -> bool:
    """The row was written already: how an insert retried after a COMMIT whose outcome
    was lost finds its first try (no call is counted twice)."""
    return conn.execute(_SAME, values).first() is not None


def totals(conn: Connection, run_id: str) -> tuple[int, float]:
    """(tokens, cost_usd) of the run: what a budget guard reads, one aggregate row."""
    tokens, cost = conn.execute(_TOTALS, {"run_id": run_id}).one()
    return int(tokens or 0), float(cost or 0.0)


def by_node(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(_BY_NODE, {"run_id": run_id}).mappings()]


def by_run(conn: Connection, run_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Totals of each run in ``run_ids`` that reported anything: one grouped query."""
    ids = list(run_ids)
    if not ids:
        return {}
    result = conn.execute(_BY_RUN, {"ids": ids}).mappings()
    return {r["run_id"]: {k: v for k, v in r.items() if k != "run_id"} for r in result}
