"""Usage rows and budgets on both ledgers: the queries, local runs with a ledger, the
executor's budget guard (driven in-process, as test_distributed_executor does) and the
CLI's show / runs / resume --max-tokens."""

from __future__ import annotations

import sqlite3
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from sqlalchemy import delete

from pocoflow import Flow, flow, set_prices
from pocoflow.cli import main as cli
from pocoflow.db import WorkflowDB
from pocoflow.distributed import lifecycle
from pocoflow.distributed.client import record_run
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.ledger import pgbatch, pipeline
from pocoflow.ledger.tables import pf_usage
from pocoflow.registry import build_flow
from pocoflow.store import Store
from pocoflow.usage import BUDGET_EXCEEDED, UsageReport
from tests.conftest import fresh_postgres_database
from tests.ledger.test_distributed_executor import LEASE_S, Publish, drain
from tests.ledger.test_unknown_outcome import BatchCommitKiller
from tests.usage_nodes import Ask, ask_then_summarise


@pytest.fixture(autouse=True)
def prices():
    set_prices({"m": {"input": 0.001, "output": 0.002}}, replace=True)
    yield
    set_prices({}, replace=True)


@flow("usage_two")
def usage_two() -> Flow:
    return ask_then_summarise()


@flow("usage_two_budget")
def usage_two_budget() -> Flow:
    return ask_then_summarise("usage_two_budget", max_tokens=10)


def report(run_id: str, node: str, tokens: int, cost: float | None, step: int = 0) -> UsageReport:
    return UsageReport(run_id, step, 1, node, None, "m", tokens, 1, cost)


# ── queries ───────────────────────────────────────────────────────────────────


def test_usage_rows_totals_by_node_and_by_run(db: WorkflowDB) -> None:
    db.create_run("r1", "f", max_tokens=50, max_cost_usd=1.5)
    db.create_run("r2", "f")
    db.create_run("r3", "f")
    db.add_usage(report("r1", "A", 10, 0.5))
    db.add_usage(report("r1", "A", 20, None))  # unknown cost counts 0
    db.add_usage(report("r1", "B", 5, 0.25, step=1))
    db.add_usage(report("r2", "A", 1, 0.1))
    assert db.usage_totals("r1") == (38, 0.75)
    assert db.usage_totals("r3") == (0, 0.0)
    got = db.get_usage("r1")
    assert (got["calls"], got["input_tokens"], got["output_tokens"]) == (3, 35, 3)
    assert got["cost_usd"] == pytest.approx(0.75)
    assert got["by_node"]["A"]["calls"] == 2 and got["by_node"]["B"]["input_tokens"] == 5
    by_run = db.usage_by_run(["r1", "r2", "r3"])
    assert set(by_run) == {"r1", "r2"} and by_run["r2"]["calls"] == 1
    run = db.get_run("r1")
    assert (run["max_tokens"], run["max_cost_usd"]) == (50, 1.5)
    db.set_budget("r1", max_tokens=500)
    assert (db.get_run("r1")["max_tokens"], db.get_run("r1")["max_cost_usd"]) == (500, 1.5)


def test_usage_of_an_unknown_run_is_refused(db: WorkflowDB) -> None:
    with pytest.raises(KeyError, match="nope"):
        db.add_usage(report("nope", "A", 1, None))


def spent(db: WorkflowDB, run_id: str) -> tuple[int, float]:
    """The run row's totals, read as columns (not through ``usage_totals``)."""
    run = db.get_run(run_id)
    return run["used_tokens"], run["used_cost_usd"]


def summed(db: WorkflowDB, run_id: str) -> tuple[int, float]:
    """The sums over the run's pf_usage rows (the reporting query)."""
    got = db.get_usage(run_id)
    return got["input_tokens"] + got["output_tokens"], got["cost_usd"]


def test_run_totals_are_kept_on_the_run_row_and_read_from_it(db: WorkflowDB) -> None:
    """A budget check reads the run row, so it costs the same at any number of calls:
    the row's totals equal the sums over the rows after every report, and usage_totals
    no longer reads the rows (deleted by hand here only to show where it reads)."""
    db.create_run("r1", "f")
    db.create_run("r2", "f")
    assert spent(db, "r1") == (0, 0.0)
    for each in (
        report("r1", "A", 10, 0.5),
        report("r1", "A", 20, None),  # unknown cost counts 0
        report("r2", "A", 7, 1.0),
        report("r1", "B", 5, 0.25, step=1),
    ):
        db.add_usage(each)
        tokens, cost = spent(db, each.run_id)
        assert (tokens, pytest.approx(cost)) == summed(db, each.run_id)
    assert spent(db, "r1") == (38, 0.75) and spent(db, "r2") == (8, 1.0)
    db._write(lambda conn: conn.execute(delete(pf_usage)), "emptying pf_usage", None)
    assert db.usage_totals("r1") == (38, 0.75) and db.usage_totals("r2") == (8, 1.0)
    assert db.usage_totals("no-such-run") == (0, 0.0)


def test_a_run_total_past_two_billion_tokens_is_kept(db: WorkflowDB) -> None:
    """A big fan-out passes 2**31 tokens, PostgreSQL's INTEGER; the SUM the totals replace
    was a bigint, so the column is one too."""
    db.create_run("r-big", "f")
    for _ in range(2):
        db.add_usage(UsageReport("r-big", 0, 1, "A", None, "m", 2_000_000_000, 0, None))
    assert spent(db, "r-big") == (4_000_000_000, 0.0) == db.usage_totals("r-big")


def test_concurrent_reporters_lose_no_addition(db: WorkflowDB) -> None:
    """Reporters on threads of their own (their own pooled connections), started at once:
    on PostgreSQL each UPDATE adds to the total the one before it committed, so the total
    equals the sum of the rows (a read-modify-write in Python would lose additions)."""
    db.create_run("r-race", "f")
    threads, calls = 8, 25
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def reporter(i: int) -> None:
        barrier.wait(30)
        try:
            for n in range(calls):
                db.add_usage(UsageReport("r-race", 0, 1, f"N{i}", n, "m", i + 1, n, 0.001))
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    workers = [threading.Thread(target=reporter, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert errors == [] and not any(w.is_alive() for w in workers)
    assert db.get_usage("r-race")["calls"] == threads * calls
    expected = sum(i + 1 + n for i in range(threads) for n in range(calls))
    tokens, cost = spent(db, "r-race")
    assert (tokens, cost) == (expected, pytest.approx(threads * calls * 0.001))
    assert (tokens, pytest.approx(cost)) == summed(db, "r-race")


def test_a_retry_never_takes_another_items_row_of_the_same_instant_for_its_own(
    db: WorkflowDB,
) -> None:
    """The rows of two map items of one node, reported in the same microsecond: the row a
    retried report looks for (its write after a lost COMMIT) is its own item's, or the
    second item's call would be dropped, and its tokens with it."""
    from pocoflow.ledger import usage as usage_rows

    db.create_run("r-same", "f")
    first = usage_rows.row(UsageReport("r-same", 0, 1, "n", 0, "m", 1, 1, None))
    with db._ledger.engine.begin() as conn:
        assert pipeline.run(conn, usage_rows.add_ops(first))
        assert usage_rows.exists(conn, first)
        assert not usage_rows.exists(conn, {**first, "item": 1})
        assert not usage_rows.exists(conn, {**first, "item": None})
        assert not usage_rows.exists(conn, {**first, "step": 1})


@pytest.fixture
def pg_db(database_url: str) -> Iterator[tuple[WorkflowDB, str]]:
    with fresh_postgres_database(database_url) as url:
        ledger = WorkflowDB(url)
        yield ledger, url
        ledger.close()


@pytest.mark.parametrize("landed", [True, False], ids=["commit-landed", "commit-lost"])
def test_a_report_whose_commit_outcome_was_unknown_counts_once(
    pg_db: tuple[WorkflowDB, str], monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """PostgreSQL: the connection dies at the report's COMMIT (sent in its batch), which
    either landed or not; the retry then finds its row (and adds nothing) or writes row
    and addition once."""
    db, url = pg_db
    killer = BatchCommitKiller(url, monkeypatch)
    killer.before = not landed
    db.create_run("r-lost", "f")
    killer.arm()
    db.add_usage(report("r-lost", "A", 10, 0.5))
    assert killer.fired == 1
    assert db.get_usage("r-lost")["calls"] == 1
    assert spent(db, "r-lost") == (11, 0.5) == summed(db, "r-lost")
    db.add_usage(report("r-lost", "A", 10, 0.5))  # a new call counts
    assert spent(db, "r-lost") == (22, 1.0) == summed(db, "r-lost")


# ── local runs with a ledger ──────────────────────────────────────────────────


def test_local_run_keeps_every_tries_usage(ledger_url: str) -> None:
    Ask.fail_tries = 1
    try:
        built = ask_then_summarise(db_path=ledger_url)
        built.run({})
    finally:
        Ask.fail_tries = 0
    got = WorkflowDB(ledger_url).get_usage(built.last_run_id)
    assert got["by_node"]["Ask"]["calls"] == 2  # the failed try was billed too
    assert got["calls"] == 3 and got["cost_usd"] == pytest.approx(0.04 + 0.25)
    assert built.usage() == got


def test_local_budget_pauses_and_resume_with_more_completes(ledger_url: str) -> None:
    built = ask_then_summarise(db_path=ledger_url, max_tokens=10)
    store = built.run({})
    run_id = built.last_run_id
    db = WorkflowDB(ledger_url)
    run = db.get_run(run_id)
    assert run["status"] == "paused" and run["max_tokens"] == 10
    assert "summarised" not in store
    (exceeded,) = [e for e in db.get_events(run_id) if e["event"] == BUDGET_EXCEEDED]
    assert exceeded["step"] == 1 and "max_tokens=10" in exceeded["error_msg"]
    # Still over the budget: it pauses again before the same node.
    again = ask_then_summarise(db_path=ledger_url)
    again.resume(run_id, max_tokens=12)
    assert db.get_run(run_id)["status"] == "paused"
    final = again.resume(run_id, max_tokens=1000)
    assert final["summarised"] and db.get_run(run_id)["status"] == "completed"
    assert db.get_run(run_id)["max_tokens"] == 1000


def test_background_run_with_ledger_waits_for_handle_resume(ledger_url: str) -> None:
    from tests.helpers import wait_until

    built = ask_then_summarise(db_path=ledger_url, max_cost_usd=0.01)
    handle = built.run_background({})
    wait_until(lambda: handle.status == "paused", timeout=10)
    handle.resume(max_cost_usd=5.0)
    assert handle.wait(timeout=10)["summarised"]
    assert WorkflowDB(ledger_url).get_run(handle.run_id)["max_cost_usd"] == 5.0
    assert handle.usage()["calls"] == 2


# ── the executor's budget guard ───────────────────────────────────────────────


def test_executor_records_usage_and_pauses_over_budget(db: WorkflowDB) -> None:
    publish = Publish(db)
    ctx = WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]
    first = record_run(db, build_flow("usage_two_budget"), Store({}), lease_s=LEASE_S)
    assert db.get_run(first.run_id)["max_tokens"] == 10
    assert drain(ctx, publish, first) == ["committed", "paused"]
    run_id = first.run_id
    assert db.get_run(run_id)["status"] == "paused"
    events = [e["event"] for e in db.get_events(run_id)]
    assert events[-2:] == [BUDGET_EXCEEDED, "run_paused"]
    assert db.get_usage(run_id)["by_node"]["Ask"]["calls"] == 1
    # A resume with a higher budget sends the step again; it completes.
    db.set_budget(run_id, max_tokens=1000)
    assert lifecycle.resume_paused(db, run_id, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
    (again,) = publish.take()
    assert drain(ctx, publish, again) == ["committed"]
    assert db.get_run(run_id)["status"] == "completed"
    assert db.get_usage(run_id)["calls"] == 2


def test_a_resume_landing_as_the_budget_guard_pauses_lets_the_step_run(
    db: WorkflowDB, monkeypatch
) -> None:
    """The guard found the run over budget and asked for a pause, but a resume with a
    higher budget withdrew the request before the guard could park the run. Before, the
    guard returned ``paused`` anyway, still holding the step's claim: the run showed
    ``running`` while nobody ran the step until its lease expired. Now it goes on."""
    publish = Publish(db)
    ctx = WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]
    first = record_run(db, build_flow("usage_two_budget"), Store({}), lease_s=LEASE_S)
    run_id = first.run_id
    real_request = lifecycle.request_pause

    def request_then_resume(db_: WorkflowDB, run: str) -> bool:
        done = real_request(db_, run)
        db.set_budget(run, max_tokens=1000)  # the user's resume, between request and park
        assert not lifecycle.resume_paused(db, run, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
        return done

    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "committed"
    (second,) = publish.take()
    monkeypatch.setattr(lifecycle, "request_pause", request_then_resume)
    assert execute_step(second.to_dict(), worker_id="h:1", context=ctx) == "committed"
    assert db.get_run(run_id)["status"] == "completed"


def test_executor_keeps_usage_of_a_retried_attempt(db: WorkflowDB) -> None:
    publish = Publish(db)
    ctx = WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]
    Ask.fail_tries = 1
    try:
        first = record_run(db, build_flow("usage_two"), Store({}), lease_s=LEASE_S)
        assert drain(ctx, publish, first) == ["retry", "committed", "committed"]
    finally:
        Ask.fail_tries = 0
    rows = db.get_usage(first.run_id)
    assert rows["by_node"]["Ask"]["calls"] == 2 and rows["calls"] == 3


def test_a_run_without_budget_does_not_read_its_usage(db: WorkflowDB, monkeypatch) -> None:
    """The hot path: only runs with a budget pay for the totals query."""
    publish = Publish(db)
    ctx = WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]
    reads: list[str] = []
    monkeypatch.setattr(db, "usage_totals", lambda run_id: reads.append(run_id) or (0, 0.0))
    first = record_run(db, build_flow("usage_two"), Store({}), lease_s=LEASE_S)
    assert drain(ctx, publish, first) == ["committed", "committed"]
    assert reads == []


# ── CLI ───────────────────────────────────────────────────────────────────────


def test_cli_runs_show_and_resume_with_a_higher_budget(ledger_url: str, monkeypatch) -> None:
    built = ask_then_summarise(db_path=ledger_url, max_tokens=10)
    built.run({})
    run_id = built.last_run_id
    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "200")
    listed = runner.invoke(cli, ["runs", "--db", ledger_url])
    assert listed.exit_code == 0, listed.output
    line = next(ln for ln in listed.output.splitlines() if run_id in ln)
    assert "15" in line and "0.0200" in line and "paused" in line
    shown = runner.invoke(cli, ["show", run_id, "--db", ledger_url])
    assert shown.exit_code == 0, shown.output
    assert "max_tokens=10" in shown.output and "budget_exceeded" in shown.output
    usage_lines = [ln for ln in shown.output.splitlines() if "Ask" in ln and "0.020000" in ln]
    assert usage_lines, shown.output
    bad = runner.invoke(cli, ["resume", run_id, "--max-tokens", "-5", "--db", ledger_url])
    assert bad.exit_code == 2
    monkeypatch.setattr("pocoflow.cli.flow_for_run", lambda *a: ask_then_summarise())
    resumed = runner.invoke(
        cli, ["resume", run_id, "--max-tokens", "500", "--max-cost-usd", "2", "--db", ledger_url]
    )
    assert resumed.exit_code == 0, resumed.output
    run = WorkflowDB(ledger_url).get_run(run_id)
    assert (run["status"], run["max_tokens"], run["max_cost_usd"]) == ("completed", 500, 2.0)
    shown = runner.invoke(cli, ["show", run_id, "--db", ledger_url])
    assert "Summarise" in shown.output and "total" in shown.output


def test_a_fork_gets_the_flows_budget_and_its_own_usage(ledger_url: str) -> None:
    built = ask_then_summarise(db_path=ledger_url)
    built.run({})
    parent = built.last_run_id
    limited = ask_then_summarise(db_path=ledger_url, max_tokens=0)
    limited.fork(parent, 0)  # from after Ask: Summarise runs, then nothing is left
    fork_id = limited.last_run_id
    db = WorkflowDB(ledger_url)
    assert db.get_run(fork_id)["max_tokens"] == 0
    assert db.get_usage(fork_id)["by_node"].keys() == {"Summarise"}
    assert db.get_usage(parent)["calls"] == 2


def test_a_report_for_an_unknown_run_raises_keyerror_and_writes_nothing(db: WorkflowDB) -> None:
    db.create_run("known", "f")
    with pytest.raises(KeyError, match="nope"):
        db.add_usage(report("nope", "A", 1, 0.5))
    assert db.get_usage("nope")["calls"] == 0
    db.add_usage(report("known", "A", 1, 0.5))
    assert spent(db, "known") == (2, 0.5) == summed(db, "known")


def test_a_report_retried_after_a_conflict_reads_first_then_writes_once(
    pg_db: tuple[WorkflowDB, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, _url = pg_db
    db.create_run("r-c", "f")
    real = pgbatch.run
    seen: list[list[bytes]] = []
    fail = [1]

    def hooked(conn: Any, commands: Any) -> Any:
        seen.append([c.sql[:12] for c in commands])
        if fail[0]:
            fail[0] -= 1
            raise psycopg.errors.SerializationFailure("forced")
        return real(conn, commands)

    monkeypatch.setattr(pgbatch, "run", hooked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db.add_usage(report("r-c", "A", 10, 0.5))
    assert spent(db, "r-c") == (11, 0.5) == summed(db, "r-c")
    assert db.get_usage("r-c")["calls"] == 1
    assert seen[0][0] == b"BEGIN" and seen[0][-1] == b"COMMIT"
    assert seen[1][0] == b"BEGIN" and len(seen[1]) == 2
    assert b"BEGIN" not in seen[2] and b"COMMIT" not in seen[2]


def test_threads_reporting_at_once_each_count_once(db: WorkflowDB) -> None:
    n = 16
    db.create_run("r-t", "f")
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait(30)
        try:
            for k in range(20):
                db.add_usage(UsageReport("r-t", 0, 1, "M", i, "m", k, 1, 0.001))
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    tokens, cost = spent(db, "r-t")
    assert db.get_usage("r-t")["calls"] == n * 20
    assert (tokens, pytest.approx(cost)) == summed(db, "r-t")


def test_a_locked_retry_on_sqlite_counts_once(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:

    from pocoflow.ledger import pipeline

    db = WorkflowDB(f"sqlite:///{tmp_path / 'l.db'}")
    db.create_run("r-l", "f")
    real = pipeline._sqlite_direct
    calls: list[int] = []

    def flaky(conn: Any, ops: Any, out: Any) -> bool:
        calls.append(len(ops))
        ok = real(conn, ops, out)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")  # after writing: rolled back
        return ok

    monkeypatch.setattr(pipeline, "_sqlite_direct", flaky)
    db.add_usage(report("r-l", "A", 10, 0.5))
    assert calls == [2, 1, 2]
    assert spent(db, "r-l") == (11, 0.5) == summed(db, "r-l")
    db.close()
