"""The monitor's queries (pocoflow.ui.queries) on SQLite and PostgreSQL: filters, pages,
counts, diffs, usage, workers, stuck runs and the optional map-items table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert

from pocoflow.ledger.tables import pf_items, pf_steps
from pocoflow.ui import queries
from pocoflow.ui.charts import graph_dot
from pocoflow.ui.queries import RunFilter
from tests.monitor_ledger import NASTY, fill


@pytest.fixture
def ledger(ledger_url):
    db = fill(ledger_url, extra=7)
    yield db
    db.close()


def ids(page):
    return [r["run_id"] for r in page.rows]


def test_runs_page_is_newest_first_paged_and_counted(ledger):
    first = queries.runs_page(ledger, RunFilter(), limit=4, offset=0)
    second = queries.runs_page(ledger, RunFilter(), limit=4, offset=4)
    assert first.total == second.total == 11
    assert ids(first)[:3] == ["many-006", "many-005", "many-004"]
    assert len(ids(second)) == 4 and not set(ids(first)) & set(ids(second))
    last = queries.runs_page(ledger, RunFilter(), limit=4, offset=8)
    assert ids(last)[-1] == "alpha-1" and len(last.rows) == 3


@pytest.mark.parametrize(
    ("filt", "expected"),
    [
        (RunFilter(statuses=("failed",)), {"beta-1"}),
        (RunFilter(statuses=("running", "failed")), {"beta-1", "live-1"}),
        (RunFilter(flows=("alpha",)), {"alpha-1", "gamma-1"}),
        (RunFilter(flows=("beta",), statuses=("running",)), {"live-1"}),
        (RunFilter(text="mma-"), {"gamma-1"}),
        (RunFilter(text="<script>"), {"beta-1"}),  # in the error message
        (RunFilter(text="%"), set()),  # LIKE wildcards are matched literally
        (RunFilter(text="_"), set()),
    ],
)
def test_runs_page_filters(ledger, filt, expected):
    page = queries.runs_page(ledger, filt, limit=100)
    assert set(ids(page)) == expected
    assert page.total == len(expected)


def test_runs_page_time_range(ledger):
    today = datetime.now(UTC).date()
    tomorrow = (today + timedelta(days=1)).isoformat()
    assert queries.runs_page(ledger, RunFilter(since=today.isoformat())).total == 11
    assert queries.runs_page(ledger, RunFilter(since=tomorrow)).total == 0
    assert queries.runs_page(ledger, RunFilter(until=today.isoformat())).total == 0


def test_filter_round_trips_through_url_params_and_drops_bad_values():
    filt = RunFilter(("failed", "running"), ("alpha",), "2026-01-01", None, "abc")
    back = RunFilter.from_params(filt.to_params())
    assert back.statuses == filt.statuses and back.flows == filt.flows and back.text == "abc"
    assert back.since == "2026-01-01T00:00:00+00:00"
    junk = RunFilter.from_params({"status": "failed,bogus", "since": "yesterday", "q": " x "})
    assert junk == RunFilter(statuses=("failed",), text="x")


def test_flow_names(ledger):
    assert queries.flow_names(ledger) == ["alpha", "beta", "bulk"]


def test_events_paged_and_failures_only(ledger):
    every = queries.events_page(ledger, "alpha-1", limit=2)
    assert every.total > 2 and len(every.rows) == 2
    rest = queries.events_page(ledger, "alpha-1", limit=100, offset=2)
    assert [r["id"] for r in every.rows + rest.rows] == sorted(
        r["id"] for r in every.rows + rest.rows
    )
    assert queries.events_page(ledger, "alpha-1", failures_only=True).total == 0
    failures = queries.events_page(ledger, "beta-1", failures_only=True)
    assert failures.total >= 1
    assert all(r["error_msg"] or r["event"] in queries.FAILURE_EVENTS for r in failures.rows)
    assert any(NASTY in (r["error_msg"] or "") for r in failures.rows)


def test_events_after_reads_only_new_events(ledger):
    last = queries.last_event_id(ledger, "alpha-1")
    assert queries.events_after(ledger, "alpha-1", last) == []
    ledger.save_event("alpha-1", "custom", node_name="Note")
    new = queries.events_after(ledger, "alpha-1", last)
    assert [e["event"] for e in new] == ["custom"]
    assert queries.last_event_id(ledger, "nope") == 0


def test_attempts_page(ledger):
    page = queries.attempts_page(ledger, "alpha-1")
    assert page.total == 2
    assert [(r["attempt"], r["worker"], r["outcome"]) for r in page.rows] == [
        (1, "w-1", "failed"),
        (2, "w-1", "committed"),
    ]
    assert page.rows[0]["error_msg"] == "provider hiccup" and page.rows[1]["ms"] == 250.0


def test_checkpoints_and_diffs(ledger):
    assert queries.checkpoint_range(ledger, "alpha-1") == (-1, 1, 3)
    assert queries.checkpoint_range(ledger, "nope") is None
    assert queries.checkpoint_node(ledger, "alpha-1", 1) == "Note"
    before = ledger.load_checkpoint("alpha-1", 0).as_dict()
    after = ledger.load_checkpoint("alpha-1", 1).as_dict()
    diff = {r.key: r for r in queries.diff_stores(before, after)}
    assert set(diff) == {"count", "note", "topic"}
    assert (diff["count"].change, diff["count"].before, diff["count"].after) == ("changed", 1, 2)
    assert diff["note"].change == "added" and diff["topic"].change == "removed"
    assert queries.diff_stores(before, before) == []


def test_usage_by_node_and_model(ledger):
    rows = queries.usage_by_node_model(ledger, "alpha-1")
    assert [(r["node_name"], r["model"], r["calls"]) for r in rows] == [
        ("Ask", "m-large", 1),
        ("Ask", "m-small", 1),
    ]
    assert rows[0]["input_tokens"] == 100 and rows[0]["cost_usd"] == pytest.approx(0.5)
    assert queries.usage_by_node_model(ledger, "beta-1") == []


def test_workers_seen_with_stale_flag(ledger):
    (worker,) = queries.workers_seen(ledger, dead_after_s=60)
    assert worker["worker"] == "w-1" and worker["host"] == "host-a"
    assert worker["last_step"] == "alpha-1 #0" and worker["stale"] is False
    (stale,) = queries.workers_seen(ledger, dead_after_s=-1)
    assert stale["stale"] is True


def test_stuck_runs_are_running_runs_idle_past_the_threshold(ledger):
    assert queries.stuck_runs(ledger, 3600) == []
    later = datetime.now(UTC) + timedelta(hours=2)
    stuck = queries.stuck_runs(ledger, 3600, now=later)
    assert [r["run_id"] for r in stuck] == ["live-1"]
    assert stuck[0]["idle_s"] >= 7200


def test_item_counts_by_node_and_status(ledger):
    """Map items counted by the node ``pf_steps`` names for their step (``step N`` when
    the step row is gone)."""
    assert queries.item_counts(ledger, "alpha-1") == {}

    def write(conn):
        conn.execute(
            insert(pf_steps),
            {"run_id": "alpha-1", "step": 5, "node_id": "Fan", "queued_at": 0, "created_at": 0},
        )
        items = [(5, "done"), (5, "done"), (5, "failed"), (5, "running"), (6, "queued")]
        conn.execute(
            insert(pf_items),
            [
                {
                    "run_id": "alpha-1",
                    "step": step,
                    "idx": idx,
                    "item_json": "1",
                    "status": status,
                    "queued_at": 0,
                }
                for idx, (step, status) in enumerate(items)
            ],
        )

    ledger._write(write, "adding map items", None)
    counts = queries.item_counts(ledger, "alpha-1")
    assert counts == {"Fan": {"done": 2, "failed": 1, "running": 1}, "step 6": {"queued": 1}}
    assert queries.item_counts(ledger, "beta-1") == {}
    dot = graph_dot({"nodes": {"Fan": {"edges": {}}}}, None, counts)
    assert r"Fan\n2 done / 1 failed / 1 running" in dot


def test_item_counts_of_a_local_run_name_the_node_its_checkpoints_name(ledger_url):
    """A local run has no pf_steps rows: a map step is named by the node the checkpoint
    before it named as next (in flight or done); a step past the run's end by none."""
    from pocoflow import Flow, MapNode
    from pocoflow.db import WorkflowDB

    class Squares(MapNode):
        def prep(self, store):
            return [1, 2, 3]

        def exec(self, item):
            return item * item

        def post(self, store, items, results):
            store["squares"] = results
            return "default"

    first, second = Squares(name="first"), Squares(name="second")
    first.then("default", second)
    flow = Flow(start=first, db_path=ledger_url, flow_name="local_items")
    flow.run({})
    db = WorkflowDB(ledger_url)
    run_id = flow.last_run_id
    db.keep_items(run_id, 2, [(0, "x", "1")])  # a step after the last: nothing names it
    assert queries.item_counts(db, run_id) == {
        "first": {"done": 3},
        flow.graph().id_of(second): {"done": 3},
        "step 2": {"done": 1},
    }
