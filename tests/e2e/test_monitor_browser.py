"""The monitor end to end: ``pocoflow monitor`` serving a real ledger, read by headless
Chromium. Screenshots of the main pages are kept as artifacts, in
``$POCOFLOW_TEST_ARTIFACTS`` if set, else under pytest's temp dir (never the checkout).

Skipped, saying why, when Debian's chromium is not installed (``make e2e-deps``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pocoflow.db import WorkflowDB
from tests.e2e.browser import CHROMIUM, Browser, serve_monitor
from tests.monitor_ledger import fill

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing: `make e2e-deps` (apt-get install chromium) to run it",
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    given = os.environ.get("POCOFLOW_TEST_ARTIFACTS")
    path = Path(given) if given else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nmonitor screenshots in {path}")
    return path


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("e2e") / "ledger.db"
    fill(str(path), extra=12).close()
    return str(path)


@pytest.fixture(scope="module")
def monitor(ledger):
    """``pocoflow monitor`` on a filled SQLite ledger, on a free port; its base URL."""
    with serve_monitor(ledger) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def test_runs_page_shows_the_runs(monitor, browser, artifacts):
    browser.open(monitor)
    # The grid draws only the rows in view: the newest runs, the oldest a scroll away.
    html = browser.wait_for("stDataFrame", "16 runs", "many-011", "many-009")
    assert "Auto-refresh" in html and "Traceback" not in html
    assert browser.screenshot(artifacts / "monitor-runs.png").stat().st_size > 10_000


def test_filter_in_the_url(monitor, browser, artifacts):
    browser.open(f"{monitor}/?status=failed")
    html = browser.wait_for("stDataFrame", "beta-1", "1 runs")
    assert "many-011" not in html
    browser.screenshot(artifacts / "monitor-runs-failed.png")
    browser.open(f"{monitor}/?flow=alpha")
    html = browser.wait_for("stDataFrame", "alpha-1", "gamma-1", "2 runs")
    assert "beta-1" not in html


def test_run_page(monitor, browser, artifacts):
    browser.open(f"{monitor}/?run=alpha-1")
    html = browser.wait_for(
        "Run alpha", "completed", "Current node", "Timeline", "Resume", "node_start", "6 events"
    )
    assert "Traceback" not in html
    browser.screenshot(artifacts / "monitor-run.png")


def test_attempts_tab_draws_a_gantt_chart(monitor, browser, artifacts):
    browser.open(f"{monitor}/?run=alpha-1")
    browser.wait_for("Run alpha", "node_start")
    clicked = browser.evaluate(
        "(() => { const tab = [...document.querySelectorAll('[role=tab]')]"
        ".find(t => t.innerText.trim() === 'Attempts'); tab.click(); return !!tab; })()"
    )
    assert clicked
    browser.wait_for("Gantt of the steps", "provider hiccup", "marks")  # vega's SVG/canvas
    browser.screenshot(artifacts / "monitor-gantt.png")


def test_workers_page(monitor, browser, artifacts):
    browser.open(f"{monitor}/?view=workers")
    browser.wait_for("Workers seen in the ledger", "Stuck runs", "stDataFrame")
    browser.screenshot(artifacts / "monitor-workers.png")


def test_unknown_run_is_a_message_not_a_traceback(monitor, browser):
    browser.open(f"{monitor}/?run=no-such-run")
    html = browser.wait_for("Unknown run id")
    assert "Traceback" not in html


def test_auto_refresh_shows_new_events_without_a_reload(monitor, browser, ledger):
    browser.open(f"{monitor}/?run=live-1&refresh=5")
    browser.wait_for("Run live", "Auto-refresh", "5 s")
    db = WorkflowDB(ledger)
    try:
        db.save_event("live-1", "heartbeat_from_test", node_name="Waiter")
    finally:
        db.close()
    html = browser.wait_for(
        "1 new events since this page opened", "heartbeat_from_test", timeout=30
    )
    assert "Traceback" not in html
