"""The cost of one budget check on a run that reported ``ROWS`` calls.

A run with a budget checks it before each node and, on workers, at each map item's
claim. The check reads the run's totals (``WorkflowDB.usage_totals``): since migration
0016 the two columns of its run row, which ``add_usage`` adds to; before, a SUM over
every ``pf_usage`` row of the run, so a budgeted fan-out of n items read O(n^2) rows.
Both are timed here in the same process on the same data (the old query rebuilt
beside the new read), each through the ledger's own read transaction: SQLite, and
PostgreSQL when given a URL. Beside them, what the change costs a report: one
``add_usage`` (its row and the addition to the run row) against the row's insert
alone, as before. Figures only (``info``), no target; about 5 s.

    python -m bench.budget_check [--rows 10000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection

sys.path.insert(0, ".")

from bench.common import alternate, report
from pocoflow.db import WorkflowDB
from pocoflow.ledger import usage as usage_rows
from pocoflow.ledger.common import iso_now
from pocoflow.ledger.tables import pf_runs, pf_usage
from pocoflow.usage import UsageReport

ROWS = 10_000
#: Checks per timed sample, and samples (medians of): the checks are tens of us each.
CHECKS = 50
SAMPLES = 15
#: Reports per timed sample of the write cost.
WRITES = 50

_u = pf_usage.c
# The query every check ran before 0016 (pocoflow/ledger/usage.py's old ``_TOTALS``).
_OLD_TOTALS = select(
    func.coalesce(func.sum(_u.input_tokens + _u.output_tokens), 0),
    func.coalesce(func.sum(_u.cost_usd), 0.0),
).where(_u.run_id == bindparam("run_id"))


def _seed(db: WorkflowDB, run_id: str, rows: int) -> None:
    """The run and its ``rows`` calls in one transaction (one executemany), its totals
    set to their sums: what ``rows`` reports through ``add_usage`` would leave."""
    db.create_run(run_id, "bench_budget", max_tokens=10**9)
    ts = iso_now()
    values: list[dict[str, Any]] = [
        {
            "run_id": run_id,
            "step": 0,
            "attempt": 1,
            "node_name": "Ask",
            "item": i,
            "model": "m",
            "input_tokens": 100,
            "output_tokens": 20,
            "cost_usd": 0.001 if i % 10 else None,  # a tenth unpriced
            "ts": ts,
        }
        for i in range(rows)
    ]
    tokens = sum(v["input_tokens"] + v["output_tokens"] for v in values)
    cost = sum(v["cost_usd"] or 0.0 for v in values)

    def write(conn: Connection) -> None:
        conn.execute(insert(pf_usage), values)
        conn.execute(
            update(pf_runs)
            .where(pf_runs.c.run_id == run_id)
            .values(used_tokens=tokens, used_cost_usd=cost)
        )

    db._write(write, "seeding the bench's usage rows", run_id)


def _old_check(db: WorkflowDB, run_id: str) -> tuple[int, float]:
    params = {"run_id": run_id}
    tokens, cost = db._read(lambda conn: conn.execute(_OLD_TOTALS, params).one(), run_id)
    return int(tokens), float(cost)


def _section(label: str, url: str, rows: int) -> None:
    db = WorkflowDB(url)
    run_id = f"bench_budget-{uuid.uuid4().hex[:8]}"
    try:
        _seed(db, run_id, rows)
        new_totals, old_totals = db.usage_totals(run_id), _old_check(db, run_id)
        assert new_totals[0] == old_totals[0], (new_totals, old_totals)
        assert abs(new_totals[1] - old_totals[1]) < 1e-6, (new_totals, old_totals)
        old_s, new_s = alternate(
            lambda: [_old_check(db, run_id) for _ in range(CHECKS)],
            lambda: [db.usage_totals(run_id) for _ in range(CHECKS)],
            SAMPLES,
        )
        old_us, new_us = old_s / CHECKS * 1e6, new_s / CHECKS * 1e6
        report(
            f"{label}: budget check ({rows:,} rows)",
            new_us,
            "us",
            f"info: old SUM over the rows {old_us:.1f} us (x{old_us / new_us:.0f})",
            None,
        )
        call = UsageReport(run_id, 0, 1, "Ask", None, "m", 100, 20, 0.001)

        # The write before 0016, the row alone (its rows leave this throwaway run's
        # totals behind; the run is deleted below).
        def insert_row(conn: Connection) -> None:
            conn.execute(insert(pf_usage), usage_rows.row(call))

        def insert_only() -> None:
            for _ in range(WRITES):
                db._write(insert_row, "bench", run_id)

        def add_usage() -> None:
            for _ in range(WRITES):
                db.add_usage(call)

        row_s, both_s = alternate(insert_only, add_usage, SAMPLES // 3)
        report(
            f"{label}: add_usage (row + run total)",
            both_s / WRITES * 1e6,
            "us",
            f"info: the row alone (before) {row_s / WRITES * 1e6:.1f} us",
            None,
        )
    finally:
        db._write(
            lambda conn: [
                conn.execute(delete(t).where(t.c.run_id == run_id)) for t in (pf_usage, pf_runs)
            ],
            "removing the bench's run",
            run_id,
        )
        db.close()


def main(pg_url: str | None = None, rows: int = ROWS) -> bool:
    print(f"budget check: one run with {rows:,} usage rows, median of {SAMPLES} x {CHECKS} checks")
    with tempfile.TemporaryDirectory() as tmp:
        _section("SQLite", f"sqlite:///{Path(tmp) / 'bench.db'}", rows)
    if pg_url is not None:
        _section("PostgreSQL", pg_url, rows)
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL (default: none)")
    args = parser.parse_args()
    sys.exit(0 if main(args.postgres, args.rows) else 1)
