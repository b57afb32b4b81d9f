"""The ledger at scale, on both backends: on a ledger seeded with old runs (finished, and
paused or cancelled ones holding queued step rows), the sweeper's and the claim's queries
are answered from indexes, the sweeper's from the live runs only, so their cost follows
the work in flight and not the history (G3 stays cheap however long the ledger grows).

The plans come from the databases themselves (EXPLAIN QUERY PLAN / EXPLAIN), so dropping
an index, or a query reshaped so the planner can no longer use it, fails here."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import Executable

from bench.ledger_scale import seed
from pocoflow.db import WorkflowDB
from pocoflow.distributed.client import record_run
from pocoflow.distributed.sweeper import sweep
from pocoflow.ledger import liveness, runs, signals, steps
from pocoflow.registry import build_flow
from pocoflow.store import Store
from tests.ledger.test_sweeper import Sent

pytestmark = pytest.mark.ledger

SEEDED_RUNS = 3000
LEASE_S = 2.0


def plan(db: Any, stmt: Executable, params: dict[str, Any]) -> str:
    """The database's plan for ``stmt`` with ``params``, one line per node."""
    engine = db._ledger.engine
    compiled = stmt.compile(dialect=engine.dialect)
    # Expanded: an IN of a list parameter is written out, one placeholder per value.
    state = compiled.construct_expanded_state(params)
    values: Any = state.parameters
    if compiled.positional:
        values = tuple(values[name] for name in state.positiontup or ())
    prefix = "EXPLAIN QUERY PLAN " if db.dialect == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + state.statement, values).all()
        conn.rollback()
    return "\n".join(str(row[-1]) for row in rows)


def full_scans(db: Any, text: str) -> list[str]:
    """Plan lines that read a whole table (SQLite ``SCAN t`` without an index, PostgreSQL
    ``Seq Scan``)."""
    if db.dialect == "sqlite":
        return [
            line
            for line in text.splitlines()
            if line.startswith("SCAN ") and "INDEX" not in line and "SUBQUERY" not in line
        ]
    return [line for line in text.splitlines() if "Seq Scan" in line]


def unkeyed_seeks(db: Any, text: str) -> list[str]:
    """Plan lines that seek steps or items by something other than their run: SQLite
    prints ``received_by IS NULL`` as ``(received_by=?)``, a seek into every finished row;
    PostgreSQL names the condition."""
    if db.dialect == "sqlite":
        return [
            line
            for line in text.splitlines()
            if line.startswith(("SEARCH pf_items", "SEARCH pf_steps")) and "(run_id=" not in line
        ]
    return [line for line in text.splitlines() if "Index Cond" in line and "IS NULL" in line]


@pytest.fixture
def seeded(db: Any) -> Any:
    seed(str(db._ledger.url.render_as_string(hide_password=False)), SEEDED_RUNS)
    return db


def test_the_seed_holds_finished_and_parked_runs(seeded: Any) -> None:
    parked = seeded.get_run("old-10")
    assert parked["status"] == "cancelled"
    row = seeded.get_step("old-10", 2)
    assert row["status"] == "queued" and row["lease_expires_at"] < time.time()
    assert seeded.get_run("old-11")["status"] == "paused"
    assert seeded.get_run("old-13")["status"] == "completed"
    assert seeded.load_checkpoint("old-13", 2).as_dict() == {"n": 3}


def test_the_sweepers_queries_start_from_the_live_runs(seeded: Any) -> None:
    for stmt, params in (
        (steps._EXPIRED, {"now": time.time(), "limit": 100}),
        (steps._UNSENT, {"now": time.time(), "older_than": 1.0, "limit": 100}),
    ):
        text = plan(seeded, stmt, params)
        assert "ix_pf_runs_live" in text, text
        assert "ix_pf_steps_active" in text, text
        assert full_scans(seeded, text) == [], text


def test_the_timed_out_waits_query_starts_from_the_live_runs(seeded: Any) -> None:
    """Every sweep looks for waits past their timeout (``wait_for``): from the live runs
    and the signal rows' primary key, never the signals of the whole history."""
    text = plan(seeded, signals._EXPIRED_WAITS, {"now": time.time(), "limit": 100})
    assert "ix_pf_runs_live" in text, text
    assert full_scans(seeded, text) == [], text


def test_the_item_sweeps_gate_starts_from_the_live_runs(seeded: Any) -> None:
    """Every sweep first asks whether any live run fanned out: from the live runs and the
    join rows' primary key, not the joins of the whole history (every seeded run has one)."""
    from pocoflow.ledger import itemrecovery

    text = plan(seeded, itemrecovery._ANY_LIVE_JOIN, {})
    assert "ix_pf_runs_live" in text, text
    assert full_scans(seeded, text) == [], text
    assert seeded.any_live_fan_out() is False


def test_the_dead_worker_queries_start_from_the_live_runs(seeded: Any) -> None:
    """The heartbeat sweep runs every second in every worker: its steps come from the live
    runs too, whatever the ledger keeps (a scan of the few worker rows is fine)."""
    for stmt in liveness.dead_holder_queries(3.0, time.time()):
        text = plan(seeded, stmt, {})
        assert "ix_pf_runs_live" in text, text
        # The active steps, or the held messages' index (only rows held unstarted).
        assert "ix_pf_steps_active" in text or "ix_pf_steps_received_by" in text, text
        scans = [line for line in full_scans(seeded, text) if "pf_workers" not in line]
        assert scans == [], text


def test_the_claim_and_the_run_read_seek_their_primary_keys(seeded: Any) -> None:
    key = {"b_run_id": "old-10", "b_step": 2, "b_attempt": 1}
    claim = {**key, "holder": "w#1", "now": time.time(), "lease_s": 10.0, "b_node_id": "n0"}
    claim["b_flow"] = "f"
    ended = {**key, "b_worker": "w", "now": 1.0, "outcome": "committed", "err": None}
    for stmt, params in (
        (steps._CLAIMS[(True, True, True)], claim),  # the executor's
        (steps._END_ATTEMPT, ended),
        (runs._GET, {"run_id": "old-10"}),
    ):
        text = plan(seeded, stmt, params)
        assert "INDEX" in text.upper(), text
        assert full_scans(seeded, text) == [], text


def test_on_a_seeded_ledger_the_sweep_finds_live_work_and_leaves_parked_rows(
    seeded: Any,
) -> None:
    first = record_run(seeded, build_flow("sweep_two"), Store({}), lease_s=LEASE_S)
    sent = Sent(seeded)
    now = time.time() + LEASE_S + 5  # the live run's lease has run out, never sent
    report = sweep(seeded, sent, lease_s=LEASE_S, now=now)
    assert set(report.resent) == {(first.run_id, 0)} and not report.taken_over
    assert {m.run_id for m, _ in sent.messages} == {first.run_id}
    # The seeded parked rows' leases ran out long ago; still only the live run's shows.
    later = seeded.expired_steps(now=now + 100)
    assert [(row["run_id"], row["step"]) for row in later] == [(first.run_id, 0)]


def test_every_query_of_a_sweep_starts_from_the_live_runs(seeded: Any) -> None:
    """Each statement one sweep runs that reads steps or items is planned from the live
    runs, with no full scan: a sweep's cost follows the work in flight, not the history.
    (A full index on ``received_by`` once steered SQLite onto every finished item for
    ``received_by IS NULL``: 20 ms a sweep at 100,000 old runs.)"""
    from sqlalchemy import event

    record_run(seeded, build_flow("sweep_two"), Store({}), lease_s=LEASE_S)
    engine = seeded._ledger.engine
    ran: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        ran.append((statement, params))

    def one_sweep() -> None:
        ran.clear()
        event.listen(engine, "before_cursor_execute", capture)
        try:
            sweep(seeded, Sent(seeded), lease_s=LEASE_S, now=time.time() + LEASE_S + 5)
        finally:
            event.remove(engine, "before_cursor_execute", capture)

    one_sweep()  # no live run fanned out: the item sweep is one seek of the join rows
    item_reads = [s for s, _ in ran if "FROM pf_items" in s]
    assert item_reads == [], item_reads
    seeded.create_run("fanned", "f", initial_store={}, status="running", queue="celery")
    seeded.insert_step("fanned", 0, "M", lease_s=LEASE_S)
    assert seeded.claim_step("fanned", 0, 1, "w0", LEASE_S, holder="w0#1")
    assert seeded.fan_out("fanned", 0, 1, "w0#1", "w0", ['"a"', '"b"'], [])
    one_sweep()
    reads = [
        (statement, params)
        for statement, params in ran
        if statement.lstrip().upper().startswith(("SELECT", "WITH"))
        and ("pf_items" in statement or "pf_steps" in statement)
    ]
    assert any("pf_items" in statement for statement, _ in reads), "no item query ran"
    prefix = "EXPLAIN QUERY PLAN " if seeded.dialect == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        for statement, params in reads:
            rows = conn.exec_driver_sql(prefix + statement, params).all()
            text = "\n".join(str(row[-1]) for row in rows)
            assert "ix_pf_runs_live" in text, f"{statement}\n{text}"
            assert unkeyed_seeks(seeded, text) == [], f"{statement}\n{text}"
            # The few worker rows (one per process) are scanned; nothing else is.
            scans = [line for line in full_scans(seeded, text) if "pf_workers" not in line]
            assert scans == [], f"{statement}\n{text}"
        conn.rollback()


def test_a_sweep_with_nothing_to_recover_writes_nothing(seeded: Any) -> None:
    """The sweeper's steady state is a few reads: with live runs whose steps wait
    unexpired (and the seeded parked rows), one pass writes no row."""
    from sqlalchemy import event

    record_run(seeded, build_flow("sweep_two"), Store({}), lease_s=60.0)
    engine = seeded._ledger.engine
    writes: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not statement.lstrip().upper().startswith(("SELECT", "WITH")):
            writes.append(statement)

    event.listen(engine, "before_cursor_execute", capture)
    try:
        report = sweep(seeded, Sent(seeded), lease_s=60.0)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert not report
    assert writes == []


def test_bench_seeds_keep_the_run_totals_equal_to_their_usage_rows(ledger_url):
    """The benches' SQL seeds write usage rows by hand: they keep each run's totals equal
    to its rows' sums, as add_usage does, so a seeded ledger reads like a real one."""
    from bench.monitor import BIG_RUN, seed as monitor_seed

    monitor_seed(ledger_url, runs=3, big_steps=5)
    seed(ledger_url, runs=2, prefix="old-")
    db = WorkflowDB(ledger_url)
    try:
        for run_id in (BIG_RUN, "old-0"):
            got = db.get_usage(run_id)
            assert got["calls"] > 0
            summed = (got["input_tokens"] + got["output_tokens"], got["cost_usd"])
            tokens, cost = db.usage_totals(run_id)
            assert (tokens, pytest.approx(cost)) == summed, run_id
    finally:
        db.close()
