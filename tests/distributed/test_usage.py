"""Usage and budgets with real workers: a retried attempt's usage is counted, a budget
pauses a run before its next node and a resume with a higher budget completes it, and
usage reported before a kill -9 of the worker is kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pocoflow.cli import main as cli
from pocoflow.usage import BUDGET_EXCEEDED
from tests.distributed import usage_flows  # noqa: F401  (registers the flows here too)
from tests.distributed.conftest import Cluster
from tests.distributed.faults import FLOWS_MODULE, attempts_of, worker_running
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

WORKER_ENV = {
    "POCOFLOW_FLOWS": f"{FLOWS_MODULE},tests.distributed.usage_flows",
    # Workers price the reports: the table must reach them (a file named by the env).
    "POCOFLOW_PRICES": str(Path(__file__).with_name("usage_prices.json")),
}
TIMEOUT_S = 60


def test_usage_totals_count_the_failed_attempt(live: Cluster) -> None:
    handle = live.submit("usage_retry")
    assert handle.wait(timeout=TIMEOUT_S)["summarised"]
    got = handle.usage()
    ask = got["by_node"]["FlakyAsk"]
    assert (ask["calls"], ask["input_tokens"], ask["output_tokens"]) == (2, 20, 10)
    assert ask["cost_usd"] == pytest.approx(2 * (10 * 0.001 + 5 * 0.002))  # priced on workers
    assert got["calls"] == 3 and got["input_tokens"] == 120 and got["output_tokens"] == 60
    assert got["cost_usd"] == pytest.approx(0.04 + 0.25)
    assert [a["outcome"] for a in attempts_of(live.db, handle.run_id, 0)] == [
        "retry",
        "committed",
    ]


def test_a_budget_pauses_the_run_and_a_higher_budget_completes_it(live: Cluster) -> None:
    handle = live.submit("usage_budget")
    run_id = handle.run_id
    wait_until(lambda: handle.status == "paused", TIMEOUT_S)
    events = [e["event"] for e in handle.events()]
    assert BUDGET_EXCEEDED in events and "summarised" not in handle.store()
    assert live.db.get_checkpoints(run_id)[-1]["step"] == 0  # paused before step 1
    # Resumed from the CLI with a budget still too low: it pauses again.
    settings = live.settings
    args = ["--db", settings.db_url, "--broker", settings.broker_url, "--no-wait"]
    result = CliRunner().invoke(cli, ["resume", run_id, "--max-tokens", "12", *args])
    assert result.exit_code == 0, result.output
    wait_until(lambda: [e["event"] for e in handle.events()].count(BUDGET_EXCEEDED) == 2, TIMEOUT_S)
    wait_until(lambda: handle.status == "paused", TIMEOUT_S)
    # Followed (--wait, the default), a resume that pauses again ends the command with
    # the reason, instead of following a paused run for ever.
    result = CliRunner().invoke(cli, ["resume", run_id, *args[:-1]])
    assert result.exit_code == 0, result.output
    assert f"run {run_id}: paused" in result.output and "max_tokens=12" in result.output
    assert [e["event"] for e in handle.events()].count(BUDGET_EXCEEDED) == 3
    handle.resume(max_tokens=1000)
    assert handle.wait(timeout=TIMEOUT_S)["summarised"]
    run = live.db.get_run(run_id)
    assert (run["status"], run["max_tokens"]) == ("completed", 1000)
    assert handle.usage()["calls"] == 2  # Ask ran once: a pause does not re-run a step


def test_a_budget_pauses_a_fan_out_between_items(live: Cluster) -> None:
    """Items claimed once the run has spent more go back unstarted and the run pauses;
    a higher budget runs the rest: every item ran exactly once (one report each)."""
    handle = live.submit("usage_map_budget")
    wait_until(lambda: handle.status == "paused", TIMEOUT_S)

    def settled() -> list[dict]:  # the pausing item's events, and no item left running
        items = live.db.get_items(handle.run_id, 0)
        stopped = "run_paused" in [e["event"] for e in handle.events()]
        return items if stopped and all(r["status"] != "running" for r in items) else []

    items = wait_until(settled, TIMEOUT_S)
    events = [e["event"] for e in handle.events()]
    assert events.count(BUDGET_EXCEEDED) == 1 and events.count("run_paused") == 1
    done = [r["idx"] for r in items if r["status"] == "done"]
    # Two calls of 100 tokens pass 150; with 2 workers at most 2 more were in flight.
    assert 2 <= len(done) <= 4, items
    handle.resume(max_tokens=10_000)
    assert handle.wait(timeout=TIMEOUT_S)["results"] == list(range(12))
    assert handle.usage()["calls"] == 12  # no item ran twice, none was skipped


def test_usage_reported_before_a_kill_9_is_kept(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("usage_hold", {"side_dir": str(side)})
    pid_file = side / f"{handle.run_id}.0.1.pid"
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), TIMEOUT_S))
    # The report is in the ledger while the attempt still runs, before any commit.
    assert wait_until(lambda: handle.usage()["calls"] == 1, TIMEOUT_S)
    worker_running(live.workers, pid).kill()
    assert handle.wait(timeout=TIMEOUT_S)["hold_attempt"] == 2
    got = handle.usage()
    assert (got["calls"], got["input_tokens"], got["output_tokens"]) == (2, 14, 6)
    assert got["cost_usd"] == pytest.approx(2 * (7 * 0.001 + 3 * 0.002))
