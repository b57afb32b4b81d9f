"""bench/monitor.py's SQL seed writes a ledger the monitor reads like a real one, on both
backends: the figures it prints are about real pages."""

from __future__ import annotations

from bench.monitor import BIG_RUN, EVENTS_PER_RUN, seed
from pocoflow.db import WorkflowDB
from pocoflow.ui import queries
from pocoflow.ui.queries import RunFilter


def test_seeded_ledger_reads_like_a_real_one(ledger_url):
    seed(ledger_url, runs=50, big_steps=20)
    db = WorkflowDB(ledger_url)
    try:
        page = queries.runs_page(db, RunFilter(), limit=3)
        assert page.total == 51 and page.rows[0]["run_id"] == BIG_RUN
        assert [r["run_id"] for r in page.rows[1:]] == ["run-49", "run-48"]
        failed = queries.runs_page(db, RunFilter(statuses=("failed",), text="timed out"))
        assert failed.total == 5
        assert queries.events_page(db, "run-10", failures_only=True).total == 1
        assert queries.events_page(db, "run-11").total == EVENTS_PER_RUN
        assert queries.checkpoint_range(db, BIG_RUN) == (-1, 19, 21)
        store = db.load_checkpoint(BIG_RUN, 19).as_dict()
        assert store["n"] == 20 and store["text"].startswith("lorem ipsum")
        assert queries.attempts_page(db, BIG_RUN).total == 20
        assert sum(r["calls"] for r in queries.usage_by_node_model(db, BIG_RUN)) == 20
    finally:
        db.close()
