"""The Streamlit monitor at scale: 100,000 runs, 1,000,000 events, one run of 10,000 steps.

Targets (issue 8): the first render of the runs page under 2 s, a filter change under
0.5 s, opening the run of 10,000 steps under 1.5 s, and the monitor process under 300 MB.

The ledger is seeded by a few ``INSERT ... SELECT`` statements over a number series (as
bench/ledger_scale.py does): ``--runs`` runs of five flows and every status, started one
second apart, with ten events each (one in ten failed, with an error), and one run of
``--big-steps`` steps with its checkpoints, values, two events per step, an attempt and a
usage row per step. The pages are rendered with ``streamlit.testing.v1.AppTest`` in this
process, the whole script each time (the page, not only its queries), timed as AppTest runs it
(its own set-up included) and, as info, the page script alone; Streamlit and
pandas are imported by a warm-up render on an empty ledger first, as a monitor server has
them loaded before its first visitor. The RSS is this process's after every render. With Debian's chromium installed the same pages
are then served by ``pocoflow monitor`` and loaded in headless Chromium: the seconds until
each shows its content, and the server process's RSS after them.

    python -m bench.monitor [--runs 100000] [--big-steps 10000] [--backend sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, ".")

from bench.common import report
from bench.ledger_scale import _series, run_seed

RUNS = 100_000
EVENTS_PER_RUN = 10
BIG_STEPS = 10_000
BIG_RUN = "big-run"
EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z
FIRST_RENDER_S, FILTER_S, BIG_RUN_S, RSS_MB = 2.0, 0.5, 1.5, 300.0

_STATUS = (
    "CASE k % 10 WHEN 0 THEN 'failed' WHEN 1 THEN 'running' WHEN 2 THEN 'cancelled' "
    "ELSE 'completed' END"
)


def _iso(dialect: str, seconds: str) -> str:
    """SQL for the ISO text (the ledger's format) of ``EPOCH + seconds``."""
    if dialect == "postgresql":
        return (
            f"to_char(to_timestamp({EPOCH} + {seconds}) AT TIME ZONE 'UTC', "
            "'YYYY-MM-DD\"T\"HH24:MI:SS') || '.000000+00:00'"
        )
    return f"strftime('%Y-%m-%dT%H:%M:%S', {EPOCH} + {seconds}, 'unixepoch') || '.000000+00:00'"


def seed_sql(dialect: str, runs: int, big_steps: int) -> list[str]:
    out = []
    w, src = _series(dialect, runs)
    started = _iso(dialect, "k")
    out.append(
        f"{w}INSERT INTO pf_runs (run_id, flow_name, status, started_at, completed_at, "
        "total_steps, current_node, error_msg, updated_at) "
        f"SELECT 'run-' || k, 'flow-' || (k % 5), {_STATUS}, {started}, "
        f"CASE WHEN k % 10 = 1 THEN NULL ELSE {_iso(dialect, 'k + 30')} END, "
        f"{EVENTS_PER_RUN}, 'node-' || (k % 7), "
        "CASE WHEN k % 10 = 0 THEN 'RuntimeError: provider timed out after 30s' END, "
        f"{started} FROM {src}"
    )
    w, src = _series(dialect, runs * EVENTS_PER_RUN)
    i, j = f"(k / {EVENTS_PER_RUN})", f"(k % {EVENTS_PER_RUN})"
    failed = f"({i} % 10 = 0 AND {j} = {EVENTS_PER_RUN - 1})"
    out.append(
        f"{w}INSERT INTO pf_events (run_id, step, node_name, event, action, elapsed_ms, "
        f"error_msg, ts, attempt) SELECT 'run-' || {i}, {j}, 'node-' || {j}, "
        f"CASE WHEN {failed} THEN 'node_error' ELSE 'node_end' END, 'default', 12.5, "
        f"CASE WHEN {failed} THEN 'provider timed out' END, {_iso(dialect, i)}, 1 FROM {src}"
    )
    # The big run: running, started after every other, one checkpoint/value/attempt/usage
    # row per step and two events per step.
    out.append(
        "INSERT INTO pf_runs (run_id, flow_name, status, started_at, total_steps, "
        f"current_node, updated_at) VALUES ('{BIG_RUN}', 'flow-big', 'running', "
        f"{_iso(dialect, str(runs + 60))}, {big_steps}, 'node-3', {_iso(dialect, str(runs + 60))})"
    )
    w, src = _series(dialect, big_steps + 1)
    step = "(k - 1)"
    out.append(
        f"{w}INSERT INTO pf_checkpoints (run_id, step, node_name, created_at, next_node, "
        f"action, manifest) SELECT '{BIG_RUN}', {step}, 'node-' || (k % 7), "
        f"{_iso(dialect, str(runs + 60))}, 'node-' || ((k + 1) % 7), 'default', "
        f"'{{\"n\":' || {step} || ',\"text\":-1}}' FROM {src}"
    )
    out.append(
        f"{w}INSERT INTO pf_values (run_id, step, key, value_json) "
        f"SELECT '{BIG_RUN}', {step}, 'n', '' || k FROM {src}"
    )
    out.append(
        f"INSERT INTO pf_values (run_id, step, key, value_json) VALUES "
        f"('{BIG_RUN}', -1, 'text', '\"{'lorem ipsum ' * 40}\"')"
    )
    w, src = _series(dialect, big_steps * 2)
    out.append(
        f"{w}INSERT INTO pf_events (run_id, step, node_name, event, action, elapsed_ms, ts, "
        f"attempt) SELECT '{BIG_RUN}', k / 2, 'node-' || (k / 2 % 7), "
        "CASE WHEN k % 2 = 0 THEN 'node_start' ELSE 'node_end' END, 'default', 3.0, "
        f"{_iso(dialect, str(runs + 60))}, 1 FROM {src}"
    )
    w, src = _series(dialect, big_steps)
    out.append(
        f"{w}INSERT INTO pf_attempts (run_id, step, attempt, worker, started_at, ended_at, "
        f"outcome) SELECT '{BIG_RUN}', k, 1, 'w-' || (k % 4), {EPOCH} + k, {EPOCH} + k + 0.2, "
        f"'committed' FROM {src}"
    )
    out.append(
        f"{w}INSERT INTO pf_usage (run_id, step, attempt, node_name, model, input_tokens, "
        f"output_tokens, cost_usd, ts) SELECT '{BIG_RUN}', k, 1, 'node-' || (k % 7), "
        f"CASE WHEN k % 2 = 0 THEN 'large' ELSE 'small' END, 100, 20, 0.001, "
        f"{_iso(dialect, str(runs + 60))} FROM {src}"
    )
    return out


def seed(db_url: str, runs: int, big_steps: int) -> float:
    return run_seed(db_url, lambda dialect: seed_sql(dialect, runs, big_steps))


SCRIPT_S: list[float] = []
"""Seconds of each render of the page script itself, without AppTest's own work."""


def _app(location: str) -> None:
    # AppTest runs a copy of this function's source: the list is reached by import.
    import time

    import bench.monitor
    from pocoflow.ui.monitor import render_workflow_monitor

    started = time.perf_counter()
    render_workflow_monitor(location)
    bench.monitor.SCRIPT_S.append(time.perf_counter() - started)


def _last_script_s() -> float:
    # Through the import, as _app does: under ``python -m`` this module is ``__main__``.
    import bench.monitor

    return bench.monitor.SCRIPT_S[-1]


def _apptest(url: str, **params: str) -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_app, args=(url,), default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    return at


def _timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def _checked(at: Any) -> Any:
    if at.exception or at.error:
        raise RuntimeError(f"the page failed: {at.exception or at.error[0].value}")
    return at


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@contextlib.contextmanager
def ledger_url(backend: str, pg_server_url: str | None, tmp: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'monitor.db'}"
        return
    from tests.conftest import fresh_postgres_database

    assert pg_server_url is not None
    with fresh_postgres_database(pg_server_url) as url:
        yield url


def measure(backend: str, runs: int, big_steps: int, pg_server_url: str | None) -> bool:
    print(f"  {backend}:")
    with (
        tempfile.TemporaryDirectory(prefix="pocoflow-bench-") as tmp,
        ledger_url(backend, pg_server_url, Path(tmp)) as url,
    ):
        seconds = seed(url, runs, big_steps)
        events = runs * EVENTS_PER_RUN + 2 * big_steps
        print(
            f"    seeded {runs} runs, {events} events, a run of {big_steps} steps in {seconds:.1f}s"
        )
        # Warm-up: Streamlit, pandas and the page's modules loaded, as in a running server.
        with tempfile.TemporaryDirectory() as warm:
            from pocoflow.db import WorkflowDB

            WorkflowDB(f"sqlite:///{warm}/w.db").close()
            _checked(_apptest(f"sqlite:///{warm}/w.db").run())

        at = _apptest(url)
        first, _ = _timed(lambda: _checked(at.run()))
        first_script = _last_script_s()
        assert len(at.dataframe[0].value) == 50, "the runs page shows one page of 50"
        changes = {
            "status=failed": lambda: at.multiselect[0].set_value(["failed"]).run(),
            "flow=flow-3": lambda: at.multiselect[1].set_value(["flow-3"]).run(),
            "text 'timed out'": lambda: at.text_input[0].set_value("timed out").run(),
            "all cleared": lambda: (
                at.multiselect[0].set_value([]),
                at.multiselect[1].set_value([]),
                at.text_input[0].set_value(""),
            )[-1].run(),
        }
        times: dict[str, float] = {}
        script: dict[str, float] = {}
        for name, change in changes.items():
            times[name], _ = _timed(lambda change=change: _checked(change()))
            script[name] = _last_script_s()
        slowest = max(times, key=lambda k: times[k])
        big, page = _timed(lambda: _checked(_apptest(url, run=BIG_RUN).run()))
        big_script = _last_script_s()
        assert any("outcome" in d.value.columns for d in page.dataframe), "attempts shown"
        rss = rss_mb()
        ok = report(
            "runs page, first render",
            first,
            "s",
            f"target < {FIRST_RENDER_S}",
            first < FIRST_RENDER_S,
            3,
        )
        report("  of which the page script", first_script, "s", "info", None, 3)
        for name, value in times.items():
            print(
                f"           filter change {name:<28} {value:.3f} s (script {script[name]:.3f} s)"
            )
        ok &= report(
            f"filter change, slowest ({slowest})",
            times[slowest],
            "s",
            f"target < {FILTER_S}",
            times[slowest] < FILTER_S,
            3,
        )
        ok &= report(
            f"open the run of {big_steps} steps",
            big,
            "s",
            f"target < {BIG_RUN_S}",
            big < BIG_RUN_S,
            3,
        )
        report("  of which the page script", big_script, "s", "info", None, 3)
        ok &= report("AppTest process RSS", rss, "MB", f"target < {RSS_MB:.0f}", rss < RSS_MB)
        return ok & served(url, big_steps)


def served(url: str, big_steps: int) -> bool:
    """The same pages from ``pocoflow monitor`` in headless Chromium, when it is installed:
    seconds from navigation to the content on screen, and the server's RSS after them."""
    from tests.e2e.browser import CHROMIUM, Browser, serve_monitor

    if not CHROMIUM.exists():
        print(f"    (no {CHROMIUM}: `make e2e-deps` to also time the pages in a browser)")
        return True
    import psutil

    pages = {
        "runs page": ("", ("run-99999", "100001 runs")),
        "filter status=failed": ("?status=failed", ("run-99990", "10000 runs")),
        f"run of {big_steps} steps": (f"?run={BIG_RUN}", ("Run big", "node_start", "Attempts")),
    }
    with serve_monitor(url) as (base, proc), Browser() as browser:
        for name, (query, texts) in pages.items():
            started = time.perf_counter()
            browser.open(f"{base}/{query}")
            browser.wait_for(*texts)
            report(f"in Chromium: {name}", time.perf_counter() - started, "s", "info", None, 3)
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
    return report("pocoflow monitor server RSS", rss, "MB", f"target < {RSS_MB:.0f}", rss < RSS_MB)


def main(
    pg_server_url: str | None,
    runs: int = RUNS,
    big_steps: int = BIG_STEPS,
    backends: tuple[str, ...] = ("sqlite", "postgresql"),
) -> bool:
    print(
        f"monitor at scale: {runs} runs, {runs * EVENTS_PER_RUN} events and a run of "
        f"{big_steps} steps, pages rendered with AppTest"
    )
    ok = True
    for backend in backends:
        ok &= measure(backend, runs, big_steps, pg_server_url)
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--big-steps", type=int, default=BIG_STEPS)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="sqlite")
    args = parser.parse_args()
    chosen = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    from bench.__main__ import postgres_url

    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres_url()) if "postgresql" in chosen else None
        sys.exit(0 if main(pg, args.runs, args.big_steps, chosen) else 1)
