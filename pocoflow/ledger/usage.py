"""Queries on ``pf_usage``: one row per ``report_usage`` call, and the totals read from it.

A budget check reads the run's running totals (``pf_runs.used_tokens`` /
``used_cost_usd``), which ``add`` keeps equal to the sums over its rows: one row read
whatever the number of calls, where summing the rows made a budgeted fan-out of n items
read O(n^2) rows. Reports are grouped in SQL (by node for ``show``, by run for ``runs``),
so a run with thousands of calls costs one small result, and listing runs costs one
query, not one per run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger, Float, bindparam, func, insert, select, update
from sqlalchemy.engine import Connection

from pocoflow.ledger import pipeline
from pocoflow.ledger.common import iso_now
from pocoflow.ledger.pipeline import Op
from pocoflow.ledger.tables import pf_runs, pf_usage

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
# The step and the map item too: two items of one node may report in the same
# microsecond, and a retry must not take the other's row for its own.
_SAME = select(_u.id).where(
    _u.run_id == bindparam("run_id"),
    _u.ts == bindparam("ts"),
    _u.node_name == bindparam("node_name"),
    _u.attempt == bindparam("attempt"),
    _u.step.is_not_distinct_from(bindparam("step")),
    _u.item.is_not_distinct_from(bindparam("item")),
)
_SUMS = (
    func.count().label("calls"),
    func.coalesce(func.sum(_u.input_tokens), 0).label("input_tokens"),
    func.coalesce(func.sum(_u.output_tokens), 0).label("output_tokens"),
    func.coalesce(func.sum(_u.cost_usd), 0.0).label("cost_usd"),
)
_r = pf_runs.c
# In SQL, not read-modify-write in Python: concurrent reporters on PostgreSQL each add to
# the row they find after the one before them committed (the UPDATE's row lock), so none
# is lost. ``b_run_id`` because a bind named after a column is the one SET takes.
_ADD_TO_RUN = (
    update(pf_runs)
    .where(_r.run_id == bindparam("b_run_id"))
    .values(
        used_tokens=_r.used_tokens + bindparam("b_tokens", type_=BigInteger),
        used_cost_usd=_r.used_cost_usd + bindparam("b_cost", type_=Float),
    )
)
_TOTALS = select(_r.used_tokens, _r.used_cost_usd).where(_r.run_id == bindparam("run_id"))
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


def add_ops(values: dict[str, Any]) -> list[Op]:
    """Insert the row of ``values`` and add it to its run's totals, in one batch (one
    round trip on PostgreSQL, its COMMIT included, so the run row is locked for no client
    round trip), so the two never disagree. The addition is a guard that aborts the batch
    when no run row took it; the insert goes first, so an unknown run fails on its
    foreign key as it did before the totals existed."""
    addition = {
        "b_run_id": values["run_id"],
        "b_tokens": values["input_tokens"] + values["output_tokens"],
        "b_cost": values["cost_usd"] or 0.0,  # an unknown cost counts 0
    }
    return [Op(_INSERT, values), Op(_ADD_TO_RUN, addition, must_hit_one=True, aborts_on_miss=True)]


def exists(conn: Connection, values: dict[str, Any]) -> bool:
    """The row was written already: how an insert retried after a COMMIT whose outcome
    was lost finds its first try (no call is counted twice). A batch read, so it runs in
    a batched write (``txn.run(..., batched=True)``)."""
    return bool(pipeline.run_reading(conn, [Op(_SAME, values)])[1][0])


def totals(conn: Connection, run_id: str) -> tuple[int, float]:
    """(tokens, cost_usd) of the run: what a budget guard reads, one row by primary key.
    A run id with no run row has spent nothing, as a sum over no rows said before."""
    found = conn.execute(_TOTALS, {"run_id": run_id}).first()
    if found is None:
        return 0, 0.0
    return int(found[0]), float(found[1])


def by_node(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(_BY_NODE, {"run_id": run_id}).mappings()]


def by_run(conn: Connection, run_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Totals of each run in ``run_ids`` that reported anything: one grouped query."""
    ids = list(run_ids)
    if not ids:
        return {}
    result = conn.execute(_BY_RUN, {"ids": ids}).mappings()
    return {r["run_id"]: {k: v for k, v in r.items() if k != "run_id"} for r in result}
